//! Provenance of a dynamic configuration: where each key was read, and the readers' warnings.

use std::collections::BTreeMap;

use crate::error::Warning;
use crate::origin::Origin;

/// Where each key of a [`crate::Dynamic`] was read, and the warnings raised while reading it.
///
/// Keys are full paths such as `tcp.routers.r.service` or
/// `tcp.services.app.weighted.services[0].name`. Two `Meta` always compare equal, so that two
/// configurations with the same content are equal wherever they were read from.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    origins: BTreeMap<String, Origin>,
    /// Warnings raised while reading (ignored `http`/`udp` sections, …).
    pub warnings: Vec<Warning>,
}

impl PartialEq for Meta {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

/// The parent of a key path (`a.b[0].c` → `a.b[0]` → `a.b` → `a`), if any.
pub fn parent_path(path: &str) -> Option<&str> {
    let cut = path.rfind(['.', '['])?;
    Some(&path[..cut])
}

impl Meta {
    /// The origin of `path`, or of its closest recorded ancestor.
    pub fn origin(&self, path: &str) -> Option<&Origin> {
        let mut p = path;
        loop {
            if let Some(o) = self.origins.get(p) {
                return Some(o);
            }
            p = parent_path(p)?;
        }
    }

    /// The origin recorded for exactly `path`.
    pub fn origin_exact(&self, path: &str) -> Option<&Origin> {
        self.origins.get(path)
    }

    /// Records the origin of `path` (the first record wins).
    pub fn insert(&mut self, path: impl Into<String>, origin: Origin) {
        self.origins.entry(path.into()).or_insert(origin);
    }

    /// Every recorded `(path, origin)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Origin)> {
        self.origins.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The recorded paths under `prefix` (the prefix itself, `prefix.…` and `prefix[…`).
    pub fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Origin)> {
        self.origins
            .range(prefix.to_owned()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .filter(move |(k, _)| {
                let rest = &k[prefix.len()..];
                rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
            })
            .map(|(k, v)| (k.as_str(), v))
    }

    /// Adds every origin and warning of `other` (existing records win).
    pub fn extend(&mut self, other: Meta) {
        for (k, v) in other.origins {
            self.origins.entry(k).or_insert(v);
        }
        self.warnings.extend(other.warnings);
    }

    /// Moves the records under `from` to `to` (used when a resource is renamed).
    pub fn rename_prefix(&mut self, from: &str, to: &str) {
        let moved: Vec<(String, Origin)> = self
            .under(from)
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect();
        for (k, v) in moved {
            self.origins.remove(&k);
            self.origins.insert(format!("{to}{}", &k[from.len()..]), v);
        }
    }

    /// Renames every record whose key `rename` maps to a new key, in one pass (renaming resource
    /// by resource with [`Meta::rename_prefix`] costs a tree walk per resource).
    pub(crate) fn rename_keys(&mut self, mut rename: impl FnMut(&str) -> Option<String>) {
        let old = std::mem::take(&mut self.origins);
        self.origins = old
            .into_iter()
            .map(|(k, v)| match rename(&k) {
                Some(n) => (n, v),
                None => (k, v),
            })
            .collect();
    }

    pub(crate) fn set_origins(&mut self, origins: BTreeMap<String, Origin>) {
        self.origins = origins;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_up_and_renames() {
        let mut m = Meta::default();
        m.insert("tcp.routers.r", Origin::tag("a"));
        m.insert("tcp.routers.r.rule", Origin::tag("b"));
        m.insert("tcp.routers.rr.rule", Origin::tag("c"));
        assert_eq!(m.origin("tcp.routers.r.service"), Some(&Origin::tag("a")));
        assert_eq!(m.origin("tcp.routers.r.rule"), Some(&Origin::tag("b")));
        assert_eq!(m.under("tcp.routers.r").count(), 2);
        m.rename_prefix("tcp.routers.r", "tcp.routers.r@file");
        assert_eq!(m.origin("tcp.routers.r@file.rule"), Some(&Origin::tag("b")));
        assert_eq!(m.origin("tcp.routers.rr.rule"), Some(&Origin::tag("c")));
        assert_eq!(parent_path("a.b[0].c"), Some("a.b[0]"));
        assert_eq!(parent_path("a.b[0]"), Some("a.b"));
        assert_eq!(parent_path("a"), None);
    }
}
