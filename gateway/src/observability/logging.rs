//! Logging set-up: `tracing` to stderr, text or JSON (`log.format`), level from `log.level` unless
//! `RUST_LOG` is set. Logs go to stderr so that an access log on stdout stays clean.

use tagway_config::{Log, LogFormat};
use tracing_subscriber::EnvFilter;

/// `log.level` as a filter directive (`warning` is read as `warn`; case-insensitive).
pub fn level_directive(level: &str) -> String {
    match level.trim().to_ascii_lowercase().as_str() {
        "" => "info".to_owned(),
        "warning" => "warn".to_owned(),
        "fatal" | "panic" => "error".to_owned(),
        l => l.to_owned(),
    }
}

/// The filter: `RUST_LOG` when set and valid, else `log.level`.
pub fn env_filter(log: &Log) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::try_new(level_directive(&log.level)).unwrap_or_else(|_| EnvFilter::new("info"))
    })
}

/// Installs the global subscriber (stderr, `log.format`, [`env_filter`]). False when one was
/// already installed (calling it twice is harmless).
pub fn init(log: &Log) -> bool {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter(log))
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().try_init().is_ok(),
        LogFormat::Text => builder.try_init().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(level_directive("WARNING"), "warn");
        assert_eq!(level_directive(" Debug "), "debug");
        assert_eq!(level_directive(""), "info");
        assert_eq!(level_directive("fatal"), "error");
    }
}
