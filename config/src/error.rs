//! Errors of reading configuration files, and the warnings readers raise.

use std::fmt;
use std::path::PathBuf;

use crate::origin::Origin;

/// Why a configuration file (or text) could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file's extension names no known format.
    #[error(
        "{}: unknown configuration format: use a .toml, .yaml or .yml file",
        path.display()
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// The text is not valid TOML or YAML.
    #[error("{origin}: invalid {format}: {message}{}", hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default())]
    Syntax {
        /// Where the parser stopped.
        origin: Origin,
        /// `TOML` or `YAML`.
        format: &'static str,
        /// The parser's message.
        message: String,
        /// How to fix it, when known.
        hint: Option<String>,
    },
    /// A key is unknown or its value is invalid.
    #[error("{}{key}: {message}", origin.as_ref().map(|o| format!("{o}: ")).unwrap_or_default())]
    Invalid {
        /// The full key path (`tcp.serversTransports.t.tls.serverName`).
        key: String,
        /// Where the key was written.
        origin: Option<Origin>,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The same key is defined in two places (two files of the file provider's directory).
    #[error("{second}: {key} is already defined at {first}: define it in one file only")]
    Duplicate {
        /// The key defined twice (`tcp.routers.r`).
        key: String,
        /// The first definition.
        first: Origin,
        /// The second definition.
        second: Origin,
    },
    /// Several errors (each on its own line).
    #[error("{}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Many {
        /// The errors.
        errors: Vec<ConfigError>,
    },
}

impl ConfigError {
    /// The errors as a flat list (a [`ConfigError::Many`] is expanded).
    pub fn flatten(self) -> Vec<ConfigError> {
        match self {
            ConfigError::Many { errors } => errors.into_iter().flat_map(Self::flatten).collect(),
            e => vec![e],
        }
    }

    /// One error from a non-empty list (the only one, or [`ConfigError::Many`]).
    pub(crate) fn from_list(mut errors: Vec<ConfigError>) -> Option<ConfigError> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ConfigError::Many { errors }),
        }
    }

    /// Where the error is, when known.
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            ConfigError::Syntax { origin, .. } => Some(origin),
            ConfigError::Invalid { origin, .. } => origin.as_ref(),
            ConfigError::Duplicate { second, .. } => Some(second),
            _ => None,
        }
    }
}

/// Something accepted but worth telling the user (an ignored `http` section, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Where, when known.
    pub origin: Option<Origin>,
    /// The key concerned.
    pub key: String,
    /// What was done and why.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.origin {
            write!(f, "{o}: ")?;
        }
        write!(f, "{}: {}", self.key, self.message)
    }
}
