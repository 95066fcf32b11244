//! tagway's configuration model.
//!
//! Static configuration (entry points, providers, the default servers transport, admin, logging)
//! and dynamic configuration (TCP routers, services, servers transports, middlewares, TLS
//! certificates), the file formats that carry them, the tag decoder and validation.
//!
//! Every reader (TOML, YAML, tags) produces one node tree whose nodes carry their origin
//! (`file:line:column`, or the tag), and one serde deserializer reads the model from it: keys
//! are case-insensitive, unknown keys are errors naming the key, its path and its origin.
#![warn(missing_docs)]

pub mod checks;
mod de;
pub mod duration;
pub mod dynamic;
pub mod error;
mod load;
pub mod meta;
mod node;
pub mod origin;
pub mod resources;
pub mod rule;
pub mod static_config;
pub mod tags;
pub mod tls;
mod toml_reader;
mod validate;
mod yaml_reader;

pub use duration::Duration;
pub use dynamic::*;
pub use error::{ConfigError, Warning};
pub use load::{Format, from_str, load_dynamic_file, load_dynamic_str, load_static};
pub use meta::Meta;
pub use origin::Origin;
pub use resources::Resources;
pub use rule::Rule;
pub use static_config::*;
pub use tls::{ClientCertificate, FileOrContent};
pub use validate::{
    DEFAULT_TRANSPORT, MergeCache, ResourceError, ResourceKind, Validated, by_resource, merge,
    provider_of, qualify, summary, validate, validate_changes, validate_owned,
    validate_without_static,
};
