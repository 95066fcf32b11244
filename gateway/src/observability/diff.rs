//! What changed between two applied configurations, for the one summary line logged per applied
//! configuration.

use std::fmt;

use tagway_config::Dynamic;
use tagway_config::resources::{Change, Resources, diff};

/// Names added, removed and changed for one kind of resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KindDiff {
    /// New names.
    pub added: Vec<String>,
    /// Names gone.
    pub removed: Vec<String>,
    /// Names whose definition changed.
    pub changed: Vec<String>,
}

impl KindDiff {
    fn of<T: PartialEq>(prev: Option<&Resources<T>>, next: &Resources<T>) -> Self {
        let mut d = KindDiff::default();
        let empty = Resources::new();
        diff(prev.unwrap_or(&empty), next, |name, change| {
            let list = match change {
                Change::Added => &mut d.added,
                Change::Removed => &mut d.removed,
                Change::Changed => &mut d.changed,
            };
            list.push(name.to_owned());
        });
        d
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The differences between two configurations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// `tcp.routers`.
    pub routers: KindDiff,
    /// `tcp.services`.
    pub services: KindDiff,
    /// `tcp.middlewares`.
    pub middlewares: KindDiff,
    /// `tcp.serversTransports`.
    pub servers_transports: KindDiff,
    /// `tls` changed (certificates, options, stores).
    pub tls_changed: bool,
}

impl ConfigDiff {
    /// Compares `next` with `prev` (None: everything is new).
    pub fn between(prev: Option<&Dynamic>, next: &Dynamic) -> Self {
        ConfigDiff {
            routers: KindDiff::of(prev.map(|p| &p.tcp.routers), &next.tcp.routers),
            services: KindDiff::of(prev.map(|p| &p.tcp.services), &next.tcp.services),
            middlewares: KindDiff::of(prev.map(|p| &p.tcp.middlewares), &next.tcp.middlewares),
            servers_transports: KindDiff::of(
                prev.map(|p| &p.tcp.servers_transports),
                &next.tcp.servers_transports,
            ),
            tls_changed: match prev {
                Some(p) => p.tls != next.tls,
                None => next.tls != tagway_config::TlsSection::default(),
            },
        }
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.routers.is_empty()
            && self.services.is_empty()
            && self.middlewares.is_empty()
            && self.servers_transports.is_empty()
            && !self.tls_changed
    }
}

/// At most this many names are listed per group; the rest are counted.
const MAX_NAMES: usize = 8;

fn list(out: &mut Vec<String>, sign: char, what: &str, names: &[String]) {
    if names.is_empty() {
        return;
    }
    let mut s = format!("{sign}{} {what} (", names.len());
    s.push_str(&names[..names.len().min(MAX_NAMES)].join(", "));
    if names.len() > MAX_NAMES {
        s.push_str(&format!(", … {} more", names.len() - MAX_NAMES));
    }
    s.push(')');
    out.push(s);
}

impl fmt::Display for ConfigDiff {
    /// `+2 routers (a@file, b@file) -1 services (old@file) ~1 routers (c@file)`, or `no change`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let kinds = [
            ("routers", &self.routers),
            ("services", &self.services),
            ("middlewares", &self.middlewares),
            ("serversTransports", &self.servers_transports),
        ];
        let mut parts = Vec::new();
        for (what, d) in kinds {
            list(&mut parts, '+', what, &d.added);
        }
        for (what, d) in kinds {
            list(&mut parts, '-', what, &d.removed);
        }
        for (what, d) in kinds {
            list(&mut parts, '~', what, &d.changed);
        }
        if self.tls_changed {
            parts.push("~tls".into());
        }
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tagway_config::Router;

    fn router(rule: &str) -> Router {
        Router {
            rule: rule.into(),
            service: "s@file".into(),
            ..Default::default()
        }
    }

    #[test]
    fn added_removed_changed() {
        let mut a = Dynamic::default();
        a.tcp
            .routers
            .insert("keep@file".into(), router("HostSNI(`*`)"));
        a.tcp
            .routers
            .insert("gone@file".into(), router("HostSNI(`*`)"));
        a.tcp
            .routers
            .insert("edit@file".into(), router("HostSNI(`*`)"));
        let mut b = a.clone();
        b.tcp.routers.remove("gone@file");
        b.tcp
            .routers
            .insert("edit@file".into(), router("ClientIP(`10.0.0.0/8`)"));
        b.tcp
            .routers
            .insert("new@file".into(), router("HostSNI(`*`)"));
        let d = ConfigDiff::between(Some(&a), &b);
        assert_eq!(d.routers.added, ["new@file"]);
        assert_eq!(d.routers.removed, ["gone@file"]);
        assert_eq!(d.routers.changed, ["edit@file"]);
        assert_eq!(
            d.to_string(),
            "+1 routers (new@file) -1 routers (gone@file) ~1 routers (edit@file)"
        );
        assert_eq!(ConfigDiff::between(Some(&b), &b).to_string(), "no change");
        assert_eq!(
            ConfigDiff::between(None, &Dynamic::default()).to_string(),
            "no change"
        );
    }
}
