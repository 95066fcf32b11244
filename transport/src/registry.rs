//! All the transports of a configuration by name, with `default@internal` from the static
//! configuration.

use std::collections::HashMap;

use tagway_config::{Resources, ServersTransport};

use crate::dial::Transport;
use crate::error::TransportError;
use crate::identity::IdentitySource;

/// The name of the default transport, built from the static `tcpServersTransport`.
pub const DEFAULT_TRANSPORT: &str = "default@internal";

/// The transports of one configuration. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Transports {
    default: Transport,
    by_name: HashMap<String, Transport>,
}

impl Transports {
    /// Builds every transport of `transports` (names as merged, `name@provider`). A transport that
    /// cannot be built is left out and its error returned; services naming it are then in error
    /// (see [`Transports::get`]), the others are not affected. A transport whose configuration is
    /// unchanged since `previous` is reused as is (certificates are not re-read).
    pub fn build(
        default: Transport,
        transports: &Resources<ServersTransport>,
        identity: Option<&IdentitySource>,
        previous: Option<&Transports>,
    ) -> (Transports, Vec<TransportError>) {
        let mut by_name = HashMap::with_capacity(transports.len());
        let mut errors = Vec::new();
        for (name, cfg) in transports {
            if name == DEFAULT_TRANSPORT {
                continue;
            }
            if let Some(old) = previous.and_then(|p| p.by_name.get(name))
                && old.config() == &**cfg
                && (cfg.spiffe.is_none() || old.has_identity_source() == identity.is_some())
            {
                by_name.insert(name.clone(), old.clone());
                continue;
            }
            match Transport::new(name, cfg, identity.cloned()) {
                Ok(transport) => {
                    by_name.insert(name.clone(), transport);
                }
                Err(error) => errors.push(error),
            }
        }
        (Transports { default, by_name }, errors)
    }

    /// The transport a service names: `None` or `default@internal` is the default one; `None` is
    /// returned for a name that does not exist (or failed to build).
    pub fn get(&self, name: Option<&str>) -> Option<&Transport> {
        match name {
            None | Some(DEFAULT_TRANSPORT) => Some(&self.default),
            Some(name) => self.by_name.get(name),
        }
    }

    /// The default transport.
    pub fn default_transport(&self) -> &Transport {
        &self.default
    }

    /// The names of the transports built (the default one excepted).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}
