//! [`Resources`]: a configuration section's resources by name, each shared behind an [`Arc`].
//!
//! A gateway fed by a large Consul catalog holds the same configuration in several places at once
//! (the provider's output, the merged and validated configuration, the configuration the runtime
//! tables were compiled from, the one observability reports). The collection is a persistent
//! B-tree ([`imbl::OrdMap`]): copying it copies one pointer, a change copies the path to the
//! changed name (a few nodes, not the 10,000 names), and two generations share every node that
//! did not change. Comparing two generations skips the shared nodes, and each resource is an
//! [`Arc`] too, so a copy-on-write copies one resource, not the configuration.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use imbl::OrdMap;
use imbl::ordmap::{DiffItem, Entry};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Resources of one kind (`tcp.routers`, `tcp.services`, …) by name, sorted by name.
///
/// Reads go through [`Deref`] to the underlying persistent map `OrdMap<String, Arc<T>>` (`get`,
/// `iter`, `keys`, `contains_key`, `len`, …). Writes take plain values (`insert(name, Router { …
/// })`) and copy a shared resource only when it is changed ([`Resources::get_mut`] is
/// [`Arc::make_mut`]). Cloning is O(1). Two collections are equal when they have the same names
/// and each pair of resources is the same allocation or compares equal.
pub struct Resources<T>(OrdMap<String, Arc<T>>);

impl<T> Resources<T> {
    /// An empty collection.
    pub fn new() -> Self {
        Resources(OrdMap::new())
    }

    /// True when there is no resource.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The number of resources.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds or replaces `name`; returns the previous resource.
    pub fn insert(&mut self, name: String, resource: impl Into<Arc<T>>) -> Option<Arc<T>> {
        self.0.insert(name, resource.into())
    }

    /// Removes `name`; returns the resource.
    pub fn remove(&mut self, name: &str) -> Option<Arc<T>> {
        self.0.remove(name)
    }

    /// Keeps the resources for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &T) -> bool) {
        retain_names(&mut self.0, |k, v| keep(k, v));
    }

    /// The entry of `name`, to insert or update shared values in place.
    pub fn entry(
        &mut self,
        name: String,
    ) -> Entry<'_, String, Arc<T>, imbl::shared_ptr::DefaultSharedPtr> {
        self.0.entry(name)
    }

    /// The underlying map, mutably.
    pub fn as_map_mut(&mut self) -> &mut OrdMap<String, Arc<T>> {
        &mut self.0
    }
}

impl<T: Clone> Resources<T> {
    /// `name`'s resource, for changing it (copied first when it is shared).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut T> {
        self.0.get_mut(name).map(Arc::make_mut)
    }

    /// Calls `f` with every resource, for changing it (the shared ones are copied first).
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&str, &mut T)) {
        let names: Vec<String> = self.0.keys().cloned().collect();
        for n in names {
            if let Some(v) = self.0.get_mut(&n) {
                f(&n, Arc::make_mut(v));
            }
        }
    }
}

impl<T> Deref for Resources<T> {
    type Target = OrdMap<String, Arc<T>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<T> Default for Resources<T> {
    fn default() -> Self {
        Resources(OrdMap::new())
    }
}

impl<T> Clone for Resources<T> {
    /// Shares the whole collection (O(1)); the copies part at their first change.
    fn clone(&self) -> Self {
        Resources(self.0.clone())
    }
}

impl<T: fmt::Debug> fmt::Debug for Resources<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl<T: PartialEq> PartialEq for Resources<T> {
    fn eq(&self, other: &Self) -> bool {
        if self.0.ptr_eq(&other.0) {
            return true;
        }
        if self.0.len() != other.0.len() {
            return false;
        }
        let mut equal = true;
        diff_until(self, other, |_, _| {
            equal = false;
            false
        });
        equal
    }
}

/// Keeps the entries of a persistent name map for which `keep` is true (`imbl::OrdMap` has no
/// `retain`: the other names are removed one by one, each copying only its path).
pub fn retain_names<V: Clone>(map: &mut OrdMap<String, V>, mut keep: impl FnMut(&str, &V) -> bool) {
    let gone: Vec<String> = map
        .iter()
        .filter(|(k, v)| !keep(k, v))
        .map(|(k, _)| k.clone())
        .collect();
    for k in gone {
        map.remove(&k);
    }
}

/// True when `a` and `b` are the same allocation or equal.
pub fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

/// True when both are absent, or both present and [`same`].
pub fn same_opt<T: PartialEq>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => same(a, b),
        _ => false,
    }
}

/// How a name differs between two collections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Only in the second.
    Added,
    /// Only in the first.
    Removed,
    /// In both, not [`same`].
    Changed,
}

/// Calls `f` for every name `a` and `b` disagree on, in name order. The walk skips the nodes both
/// collections share, so comparing two generations of a 10,000-name collection that differ in
/// one name visits a few nodes, and compares shared resources by pointer.
pub fn diff<'a, T: PartialEq>(
    a: &'a Resources<T>,
    b: &'a Resources<T>,
    mut f: impl FnMut(&'a str, Change),
) {
    diff_until(a, b, |n, c| {
        f(n, c);
        true
    });
}

/// [`diff`] that stops when `f` returns false.
fn diff_until<'a, T: PartialEq>(
    a: &'a Resources<T>,
    b: &'a Resources<T>,
    mut f: impl FnMut(&'a str, Change) -> bool,
) {
    for item in a.0.diff(&b.0) {
        let go = match item {
            DiffItem::Add(k, _) => f(k, Change::Added),
            DiffItem::Remove(k, _) => f(k, Change::Removed),
            DiffItem::Update {
                old: (k, va),
                new: (_, vb),
            } => same(va, vb) || f(k, Change::Changed),
        };
        if !go {
            return;
        }
    }
}

/// The names `a` and `b` disagree on (added, removed or changed).
fn changed_names<'a, T: PartialEq>(a: &'a Resources<T>, b: &'a Resources<T>) -> HashSet<&'a str> {
    let mut out = HashSet::new();
    diff(a, b, |n, _| {
        out.insert(n);
    });
    out
}

/// What a change between two configurations touches among routers and services: the ones
/// added, removed or changed, the weighted services over a touched service, and the routers
/// sending to a touched service. Everything else is unaffected as long as the middlewares,
/// servers transports and TLS sections are the same.
#[derive(Debug, Default)]
pub struct Changes<'a> {
    /// Touched routers.
    pub routers: HashSet<&'a str>,
    /// Touched services.
    pub services: HashSet<&'a str>,
}

impl<'a> Changes<'a> {
    /// The changes from `prev` to `next`.
    pub fn between(prev: &'a crate::Dynamic, next: &'a crate::Dynamic) -> Changes<'a> {
        let mut services = changed_names(&prev.tcp.services, &next.tcp.services);
        let weighted: Vec<(&String, &crate::Weighted)> = next
            .tcp
            .services
            .iter()
            .filter_map(|(n, s)| s.weighted.as_ref().map(|w| (n, w)))
            .collect();
        loop {
            let before = services.len();
            for (n, w) in &weighted {
                if w.services
                    .iter()
                    .any(|ws| services.contains(ws.name.as_str()))
                {
                    services.insert(n.as_str());
                }
            }
            if services.len() == before {
                break;
            }
        }
        let mut routers = changed_names(&prev.tcp.routers, &next.tcp.routers);
        if !services.is_empty() {
            // A change usually touches one or two services: comparing with each is cheaper than
            // hashing every router's service name.
            let few: Vec<&str> = services.iter().copied().collect();
            let touched = |s: &str| {
                if few.len() <= 8 {
                    few.contains(&s)
                } else {
                    services.contains(s)
                }
            };
            // `next`'s routers suffice: a router of `prev` alone, or changed, is already in.
            for (n, r) in &next.tcp.routers {
                if touched(&r.service) {
                    routers.insert(n.as_str());
                }
            }
        }
        Changes { routers, services }
    }

    /// True when `prev` and `next` agree on everything but routers and services, so that
    /// [`Changes::between`] tells everything a change touches.
    pub fn confined(prev: &crate::Dynamic, next: &crate::Dynamic) -> bool {
        prev.tls == next.tls
            && prev.tcp.middlewares == next.tcp.middlewares
            && prev.tcp.servers_transports == next.tcp.servers_transports
    }
}

impl<K: Into<String>, V: Into<Arc<T>>, T> FromIterator<(K, V)> for Resources<T> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Resources(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<K: Into<String>, V: Into<Arc<T>>, T> Extend<(K, V)> for Resources<T> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.0
            .extend(iter.into_iter().map(|(k, v)| (k.into(), v.into())));
    }
}

impl<K: Into<String>, V: Into<Arc<T>>, T, const N: usize> From<[(K, V); N]> for Resources<T> {
    fn from(items: [(K, V); N]) -> Self {
        items.into_iter().collect()
    }
}

impl<T> From<BTreeMap<String, T>> for Resources<T> {
    fn from(map: BTreeMap<String, T>) -> Self {
        map.into_iter().collect()
    }
}

impl<T> IntoIterator for Resources<T> {
    type Item = (String, Arc<T>);
    type IntoIter = imbl::ordmap::ConsumingIter<String, Arc<T>, imbl::shared_ptr::DefaultSharedPtr>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a, T> IntoIterator for &'a Resources<T> {
    type Item = (&'a String, &'a Arc<T>);
    type IntoIter = imbl::ordmap::Iter<'a, String, Arc<T>, imbl::shared_ptr::DefaultSharedPtr>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T: Serialize> Serialize for Resources<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, &**v)))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Resources<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<String, T>::deserialize(d).map(Resources::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_on_clone_and_copies_on_write() {
        let mut a: Resources<String> = [("x", "1".to_owned()), ("y", "2".to_owned())].into();
        let b = a.clone();
        assert!(Arc::ptr_eq(&a["x"], &b["x"]));
        assert_eq!(a, b);
        a.get_mut("x").unwrap().push('!');
        assert_eq!(*b["x"], "1", "the other holder keeps its value");
        assert_eq!(*a["x"], "1!");
        assert!(
            Arc::ptr_eq(&a["y"], &b["y"]),
            "untouched resources stay shared"
        );
        assert_ne!(a, b);
        let mut c = b.clone();
        c.insert("x".into(), "1".to_owned());
        assert!(!Arc::ptr_eq(&c["x"], &b["x"]));
        assert_eq!(c, b, "equal values in other allocations compare equal");
        c.remove("y");
        assert_ne!(c, b);
    }

    #[test]
    fn diff_of_two_generations_lists_exactly_what_changed() {
        // Large enough for a tree of several levels, so that shared nodes are skipped.
        let a: Resources<u32> = (0..2000u32).map(|i| (format!("n{i:04}"), i)).collect();
        let mut b = a.clone();
        assert_eq!(a, b);
        b.insert("n0500".into(), 7u32);
        b.remove("n1500");
        b.insert("n9999".into(), 1u32);
        b.insert("n0042".into(), 42u32); // equal value in a new allocation: not a change
        let mut seen = Vec::new();
        diff(&a, &b, |n, c| seen.push((n.to_owned(), c)));
        assert_eq!(
            seen,
            [
                ("n0500".to_owned(), Change::Changed),
                ("n1500".to_owned(), Change::Removed),
                ("n9999".to_owned(), Change::Added),
            ]
        );
        assert_ne!(a, b);
        let mut c = b.clone();
        c.insert("n0500".into(), 500u32);
        c.insert("n1500".into(), 1500u32);
        c.remove("n9999");
        assert_eq!(
            a, c,
            "equal again, though no node is shared with `a` on those paths"
        );
        let mut kept = a.clone();
        kept.retain(|n, v| n < "n1000" && v % 2 == 0);
        assert_eq!(kept.len(), 500);
    }

    #[test]
    fn serializes_as_a_plain_map() {
        let r: Resources<u32> = [("b", 2u32), ("a", 1)].into();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"{"a":1,"b":2}"#);
        let back: Resources<u32> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
