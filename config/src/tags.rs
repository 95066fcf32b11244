//! The tag (label) decoder: `<prefix>.tcp.…=value` strings → dynamic configuration.
//!
//! Traefik's label grammar: `<prefix>.tcp.routers.<r>.<key>=v`, `<prefix>.tcp.services.<s>.…`,
//! `<prefix>.tcp.middlewares.<m>.…` and (beyond Traefik) `<prefix>.tcp.serversTransports.<t>.…`;
//! list indices (`weighted.services[0].name`); comma-separated values for list fields
//! (`entrypoints=a,b`); keys case-insensitive; `<prefix>.enable`; the Consul-only keys
//! `<prefix>.consulcatalog.connect` and `.canary`. The tags become a node tree (each node's origin
//! is its tag) read by the same deserializer as files, so files and tags accept the same keys.

use std::collections::BTreeMap;

use crate::de::{Ctx, from_node, parse_bool};
use crate::dynamic::Dynamic;
use crate::error::Warning;
use crate::node::{Entry, Node, Value};
use crate::origin::Origin;

/// What a set of tags decodes to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decoded {
    /// The dynamic configuration (unqualified names, as the tags wrote them).
    pub config: Dynamic,
    /// `<prefix>.enable`, when given.
    pub enable: Option<bool>,
    /// Consul-only keys.
    pub consul: ConsulTags,
    /// One error per bad tag; the other tags still decode.
    pub errors: Vec<TagError>,
    /// Tags accepted but ignored (`<prefix>.http.…`, `<prefix>.udp.…`).
    pub warnings: Vec<Warning>,
}

/// Consul-only tags (`<prefix>.consulcatalog.*`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConsulTags {
    /// `<prefix>.consulcatalog.connect`: the service is reached through Consul Connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<bool>,
    /// `<prefix>.consulcatalog.canary`: the instance is a canary (Nomad canary tags).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<bool>,
}

/// A tag that could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("tag `{tag}`: {}{message}", key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct TagError {
    /// The tag as written.
    pub tag: String,
    /// The configuration key concerned (`tcp.routers.r.rule`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// Decodes the tags of one service. Tags outside `prefix` are ignored; a tag under the prefix
/// that names no known key is an error naming the tag (the other tags still decode).
pub fn decode(prefix: &str, tags: &[impl AsRef<str>]) -> Decoded {
    let mut out = Decoded::default();
    let prefix = prefix.trim().trim_end_matches('.');
    let mut config_tags: Vec<(String, Vec<Seg>, String)> = Vec::new();
    for tag in tags {
        let tag = tag.as_ref();
        let (key, value) = match tag.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (tag.trim(), ""),
        };
        let Some(rest) = strip_prefix_ci(key, prefix) else {
            continue;
        };
        let err = |message: String| TagError {
            tag: tag.to_owned(),
            key: None,
            message,
        };
        if !tag.contains('=') {
            out.errors
                .push(err("no `=` in the tag: write <key>=<value>".to_owned()));
            continue;
        }
        let parts: Vec<&str> = rest.split('.').collect();
        let first = parts[0].to_ascii_lowercase();
        match (first.as_str(), parts.len()) {
            ("enable", 1) => match parse_bool(value) {
                Some(b) => out.enable = Some(b),
                None => out
                    .errors
                    .push(err(format!("expected true or false, found `{value}`"))),
            },
            ("consulcatalog", 2) => {
                let slot = match parts[1].to_ascii_lowercase().as_str() {
                    "connect" => &mut out.consul.connect,
                    "canary" => &mut out.consul.canary,
                    other => {
                        out.errors.push(err(format!(
                            "unknown key `{other}`: expected `{prefix}.consulcatalog.connect` or `{prefix}.consulcatalog.canary`"
                        )));
                        continue;
                    }
                };
                match parse_bool(value) {
                    Some(b) => *slot = Some(b),
                    None => out
                        .errors
                        .push(err(format!("expected true or false, found `{value}`"))),
                }
            }
            ("http" | "udp", _) => out.warnings.push(Warning {
                origin: Some(Origin::tag(tag)),
                key: key.to_owned(),
                message: format!(
                    "ignored: tagway is a TCP gateway and has no {} routers, services or middlewares",
                    first.to_ascii_uppercase()
                ),
            }),
            ("tcp", n) if n >= 2 => match parse_segments(&parts) {
                Ok(segs) => config_tags.push((tag.to_owned(), segs, value.to_owned())),
                Err(m) => out.errors.push(err(m)),
            },
            _ => out.errors.push(err(format!(
                "unknown key `{rest}`: expected `{prefix}.enable`, `{prefix}.tcp.<routers|services|middlewares|serversTransports>.<name>.<key>` or `{prefix}.consulcatalog.<connect|canary>`"
            ))),
        }
    }

    // Build, deserialize; on an error, drop the tag it names and retry: one bad tag must not hide
    // the others.
    let mut active: Vec<bool> = vec![true; config_tags.len()];
    for _ in 0..=config_tags.len() {
        let mut tree = Tree::default();
        let mut build_errors = Vec::new();
        for (i, (tag, segs, value)) in config_tags.iter().enumerate() {
            if !active[i] {
                continue;
            }
            if let Err(m) = tree.insert(segs, value, tag) {
                build_errors.push(i);
                out.errors.push(TagError {
                    tag: tag.clone(),
                    key: Some(render(segs)),
                    message: m,
                });
            }
        }
        for i in build_errors {
            active[i] = false;
        }
        let mut list_errors = Vec::new();
        let root = tree.into_node(&mut list_errors);
        if !list_errors.is_empty() {
            for (tag, message) in list_errors {
                for (i, (t, segs, _)) in config_tags.iter().enumerate() {
                    if *t == tag && active[i] {
                        active[i] = false;
                        out.errors.push(TagError {
                            tag: tag.clone(),
                            key: Some(render(segs)),
                            message: message.clone(),
                        });
                    }
                }
            }
            continue;
        }
        let ctx = Ctx::default();
        match from_node::<Dynamic>(&root, "", &ctx) {
            Ok(mut d) => {
                d.meta.set_origins(ctx.into_origins());
                out.config = d;
                return out;
            }
            Err(e) => {
                let culprit = e.origin.as_ref().and_then(Origin::as_tag).and_then(|t| {
                    config_tags
                        .iter()
                        .position(|(tag, _, _)| tag.as_str() == t)
                        .filter(|&i| active[i])
                });
                let Some(i) = culprit else {
                    // Not attributable to a tag (should not happen): report and give up.
                    out.errors.push(TagError {
                        tag: String::new(),
                        key: e.path.clone(),
                        message: e.message.clone(),
                    });
                    return out;
                };
                // Every copy of the tag (the same text twice) goes.
                let culprit_text = config_tags[i].0.clone();
                for (j, (t, _, _)) in config_tags.iter().enumerate() {
                    if *t == culprit_text {
                        active[j] = false;
                    }
                }
                out.errors.push(TagError {
                    tag: culprit_text,
                    key: e.path.clone(),
                    message: e.message.clone(),
                });
            }
        }
    }
    out
}

fn strip_prefix_ci<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    let head = key.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    key[prefix.len()..].strip_prefix('.')
}

/// One path segment: a key, optionally indexed (`services[0]`).
#[derive(Clone, Debug)]
struct Seg {
    key: String,
    index: Option<usize>,
}

fn parse_segments(parts: &[&str]) -> Result<Vec<Seg>, String> {
    let mut segs = Vec::new();
    for p in parts {
        if p.is_empty() {
            return Err("empty key segment (two dots in a row, or a trailing dot)".to_owned());
        }
        match p.split_once('[') {
            None => segs.push(Seg {
                key: (*p).to_owned(),
                index: None,
            }),
            Some((k, rest)) => {
                let idx = rest
                    .strip_suffix(']')
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|_| !k.is_empty());
                match idx {
                    Some(i) if i < 1000 => segs.push(Seg {
                        key: k.to_owned(),
                        index: Some(i),
                    }),
                    _ => {
                        return Err(format!(
                            "invalid list index in `{p}`: write `name[0]`, `name[1]`, …"
                        ));
                    }
                }
            }
        }
    }
    Ok(segs)
}

fn render(segs: &[Seg]) -> String {
    segs.iter()
        .map(|s| match s.index {
            Some(i) => format!("{}[{i}]", s.key),
            None => s.key.clone(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The tag tree being built.
#[derive(Default)]
struct Tree {
    root: Vec<(String, String, Item)>, // (key, tag that created it, item)
}

enum Item {
    Leaf { value: String, tag: String },
    Map(Vec<(String, String, Item)>),
    List(BTreeMap<usize, (String, Item)>),
}

impl Tree {
    fn insert(&mut self, segs: &[Seg], value: &str, tag: &str) -> Result<(), String> {
        insert_in(&mut self.root, segs, value, tag)
    }

    fn into_node(self, errors: &mut Vec<(String, String)>) -> Node {
        let origin = Origin::tag("");
        map_node(self.root, origin, errors)
    }
}

fn is_true_or_empty(v: &str) -> bool {
    v.is_empty() || parse_bool(v) == Some(true)
}

fn insert_in(
    entries: &mut Vec<(String, String, Item)>,
    segs: &[Seg],
    value: &str,
    tag: &str,
) -> Result<(), String> {
    let (seg, rest) = segs.split_first().expect("non-empty path");
    // Keys merge case-insensitively: `loadbalancer.…` and `loadBalancer.…` are one section.
    let pos = entries
        .iter()
        .position(|(k, _, _)| k.eq_ignore_ascii_case(&seg.key));
    let pos = match pos {
        Some(p) => p,
        None => {
            let item = if seg.index.is_some() {
                Item::List(BTreeMap::new())
            } else if rest.is_empty() {
                Item::Leaf {
                    value: value.to_owned(),
                    tag: tag.to_owned(),
                }
            } else {
                Item::Map(Vec::new())
            };
            entries.push((seg.key.clone(), tag.to_owned(), item));
            if seg.index.is_none() && rest.is_empty() {
                return Ok(());
            }
            entries.len() - 1
        }
    };
    let slot = &mut entries[pos].2;
    match seg.index {
        Some(i) => {
            let Item::List(list) = slot else {
                return Err(format!(
                    "`{}` is used both with and without a list index",
                    seg.key
                ));
            };
            if rest.is_empty() {
                match list.get(&i) {
                    Some((_, Item::Leaf { value: v, tag: t })) if v != value => Err(format!(
                        "conflicts with tag `{t}`, which gives another value"
                    )),
                    Some((_, Item::Leaf { .. })) => Ok(()),
                    Some(_) => Err("is a section; give its keys instead of a value".to_owned()),
                    None => {
                        list.insert(
                            i,
                            (
                                tag.to_owned(),
                                Item::Leaf {
                                    value: value.to_owned(),
                                    tag: tag.to_owned(),
                                },
                            ),
                        );
                        Ok(())
                    }
                }
            } else {
                let (_, item) = list
                    .entry(i)
                    .or_insert_with(|| (tag.to_owned(), Item::Map(Vec::new())));
                match item {
                    Item::Map(m) => insert_in(m, rest, value, tag),
                    Item::Leaf { value: v, .. } if is_true_or_empty(v) => {
                        *item = Item::Map(Vec::new());
                        let Item::Map(m) = item else { unreachable!() };
                        insert_in(m, rest, value, tag)
                    }
                    _ => Err(format!("`{}[{i}]` is given both a value and keys", seg.key)),
                }
            }
        }
        None if rest.is_empty() => match slot {
            Item::Leaf { value: v, tag: t } if v != value => Err(format!(
                "conflicts with tag `{t}`, which gives another value"
            )),
            Item::Leaf { .. } => Ok(()),
            // `tls=true` beside `tls.passthrough=true`: the section is enabled either way.
            Item::Map(_) if is_true_or_empty(value) => Ok(()),
            _ => Err(format!(
                "`{}` is a section: give its keys (`{}.<key>=…`) or true/false",
                seg.key, seg.key
            )),
        },
        None => match slot {
            Item::Map(m) => insert_in(m, rest, value, tag),
            Item::Leaf { value: v, .. } if is_true_or_empty(v) => {
                *slot = Item::Map(Vec::new());
                let Item::Map(m) = slot else { unreachable!() };
                insert_in(m, rest, value, tag)
            }
            Item::Leaf { tag: t, .. } => Err(format!(
                "`{}` is given a value by tag `{t}` and keys by this one",
                seg.key
            )),
            Item::List(_) => Err(format!(
                "`{}` is a list: give an index, e.g. `{}[0]`",
                seg.key, seg.key
            )),
        },
    }
}

fn item_node(item: Item, origin: Origin, errors: &mut Vec<(String, String)>) -> Node {
    match item {
        Item::Leaf { value, tag } => Node::str(value, Origin::tag(tag)),
        Item::Map(entries) => map_node(entries, origin, errors),
        Item::List(list) => {
            let mut items = Vec::new();
            let mut expected = 0;
            for (i, (tag, item)) in list {
                if i != expected {
                    errors.push((
                        tag,
                        format!(
                            "list index {i} without index {expected}: number the items from 0 without gaps"
                        ),
                    ));
                    continue;
                }
                expected += 1;
                let o = Origin::tag(&tag);
                items.push(item_node(item, o, errors));
            }
            Node::new(Value::Seq(items), origin)
        }
    }
}

fn map_node(
    entries: Vec<(String, String, Item)>,
    origin: Origin,
    errors: &mut Vec<(String, String)>,
) -> Node {
    let entries = entries
        .into_iter()
        .map(|(key, tag, item)| {
            let o = Origin::tag(&tag);
            Entry {
                key,
                key_origin: o.clone(),
                value: item_node(item, o, errors),
            }
        })
        .collect();
    Node::new(Value::Map(entries), origin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamic::*;

    #[test]
    fn seed_tag() {
        let d = decode(
            "traefik",
            &["traefik.tcp.services.Service01.loadBalancer.serversTransport=mytransport"],
        );
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        let lb = d.config.tcp.services["Service01"]
            .load_balancer
            .as_ref()
            .unwrap();
        assert_eq!(lb.servers_transport.as_deref(), Some("mytransport"));
    }

    #[test]
    fn full_grammar() {
        let tags = [
            "traefik.enable=true",
            "traefik.consulcatalog.connect=true",
            "traefik.consulcatalog.canary=false",
            "traefik.tcp.routers.db.rule=HostSNI(`db.example.com`)",
            "traefik.tcp.routers.db.entrypoints=web, db",
            "traefik.tcp.routers.db.priority=10",
            "traefik.tcp.routers.db.service=db",
            "traefik.tcp.routers.db.middlewares=allow,limit",
            "traefik.tcp.routers.db.tls=true",
            "traefik.tcp.routers.db.tls.passthrough=true",
            "traefik.tcp.services.db.loadbalancer.server.port=5432",
            "traefik.tcp.services.db.loadbalancer.server.weight=5",
            "traefik.tcp.services.db.loadbalancer.server.tls=false",
            "traefik.tcp.services.db.loadBalancer.serversTransport=mtls",
            "traefik.tcp.services.db.loadbalancer.proxyprotocol.version=1",
            "traefik.tcp.services.db.loadbalancer.healthcheck.interval=5s",
            "traefik.tcp.services.w.weighted.services[0].name=db",
            "traefik.tcp.services.w.weighted.services[0].weight=3",
            "traefik.tcp.services.w.weighted.services[1].name=other@file",
            "traefik.tcp.middlewares.allow.ipallowlist.sourcerange=10.0.0.0/8,1.2.3.4",
            "traefik.tcp.middlewares.limit.inflightconn.amount=10",
            "traefik.tcp.serverstransports.mtls.dialtimeout=5s",
            "traefik.tcp.serverstransports.mtls.tls.servername=db.internal",
            "traefik.tcp.serverstransports.mtls.tls.rootcas=/ca.pem",
            "traefik.tcp.serverstransports.mtls.spiffe.ids[0]=spiffe://example.org/db",
            "traefik.tcp.serverstransports.mtls.proxyprotocol=true",
            "other.tag=1",
            "primary",
        ];
        let d = decode("traefik", &tags);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.enable, Some(true));
        assert_eq!(
            d.consul,
            ConsulTags {
                connect: Some(true),
                canary: Some(false)
            }
        );
        let r = &d.config.tcp.routers["db"];
        assert_eq!(r.rule, "HostSNI(`db.example.com`)");
        assert_eq!(r.entry_points, ["web", "db"]);
        assert_eq!(r.priority, Some(10));
        assert_eq!(r.middlewares, ["allow", "limit"]);
        assert_eq!(
            r.tls,
            Some(RouterTls {
                passthrough: true,
                ..Default::default()
            })
        );
        let lb = d.config.tcp.services["db"].load_balancer.as_ref().unwrap();
        assert_eq!(
            lb.server,
            Some(ServerTemplate {
                port: Some("5432".into()),
                weight: Some(5),
                tls: Some(false)
            })
        );
        assert_eq!(lb.servers_transport.as_deref(), Some("mtls"));
        assert_eq!(
            lb.proxy_protocol,
            Some(ProxyProtocol {
                version: 1,
                ..Default::default()
            })
        );
        assert_eq!(
            lb.health_check.as_ref().unwrap().interval(),
            crate::Duration::from_secs(5)
        );
        let w = d.config.tcp.services["w"].weighted.as_ref().unwrap();
        assert_eq!(w.services.len(), 2);
        assert_eq!(w.services[0].weight, Some(3));
        assert_eq!(w.services[1].name, "other@file");
        let m = &d.config.tcp.middlewares;
        assert_eq!(
            m["allow"].ip_allow_list.as_ref().unwrap().source_range,
            ["10.0.0.0/8", "1.2.3.4"]
        );
        assert_eq!(m["limit"].in_flight_conn.as_ref().unwrap().amount, 10);
        let t = &d.config.tcp.servers_transports["mtls"];
        assert_eq!(t.dial_timeout, crate::Duration::from_secs(5));
        assert_eq!(
            t.tls.as_ref().unwrap().server_name.as_deref(),
            Some("db.internal")
        );
        assert_eq!(
            t.tls.as_ref().unwrap().root_cas,
            [crate::FileOrContent::from("/ca.pem")]
        );
        assert_eq!(t.spiffe.as_ref().unwrap().ids, ["spiffe://example.org/db"]);
        assert_eq!(
            t.proxy_protocol,
            Some(ProxyProtocol {
                version: 2,
                ..Default::default()
            })
        );
        assert_eq!(
            d.config
                .meta
                .origin("tcp.routers.db.rule")
                .unwrap()
                .as_tag(),
            Some("traefik.tcp.routers.db.rule=HostSNI(`db.example.com`)")
        );
    }

    #[test]
    fn bad_tags_are_errors_naming_the_tag_and_others_still_decode() {
        let tags = [
            "traefik.tcp.routers.r.rule=HostSNI(`*`)",
            "traefik.tcp.routers.r.foo=1",
            "traefik.tcp.routers.r.service=s",
            "traefik.tcp.routers.r.priority=high",
            "traefik.tcp.services.s.weighted.services[1].name=x",
            "traefik.tcp.serverstransports.t.dialtimeout=soon",
            "traefik.tls.stores.default=1",
            "traefik.enable=maybe",
            "traefik.consulcatalog.other=1",
            "traefik.tcp.routers.r.rule=HostSNI(`a`)",
            "traefik.tcp.routers",
        ];
        let d = decode("traefik", &tags);
        let by_tag: BTreeMap<&str, String> = d
            .errors
            .iter()
            .map(|e| (e.tag.as_str(), e.to_string()))
            .collect();
        assert_eq!(d.errors.len(), 9, "{:#?}", d.errors);
        assert!(
            by_tag["traefik.tcp.routers.r.foo=1"].contains("tcp.routers.r.foo: unknown key `foo`")
        );
        assert!(
            by_tag["traefik.tcp.routers.r.priority=high"]
                .contains("tcp.routers.r.priority: expected an integer, found `high`")
        );
        assert!(
            by_tag["traefik.tcp.services.s.weighted.services[1].name=x"]
                .contains("without index 0")
        );
        assert!(
            by_tag["traefik.tcp.serverstransports.t.dialtimeout=soon"].contains("invalid duration")
        );
        assert!(
            by_tag["traefik.tls.stores.default=1"].contains("unknown key `tls.stores.default`")
        );
        assert!(by_tag["traefik.enable=maybe"].contains("expected true or false"));
        assert!(by_tag["traefik.consulcatalog.other=1"].contains("unknown key `other`"));
        assert!(
            by_tag["traefik.tcp.routers.r.rule=HostSNI(`a`)"]
                .contains("conflicts with tag `traefik.tcp.routers.r.rule=HostSNI(`*`)`")
        );
        assert!(by_tag["traefik.tcp.routers"].contains("no `=`"));
        let r = &d.config.tcp.routers["r"];
        assert_eq!(r.rule, "HostSNI(`*`)");
        assert_eq!(r.service, "s");
    }

    #[test]
    fn http_and_udp_are_warnings_and_other_prefixes_are_ignored() {
        let d = decode(
            "tagway",
            &[
                "tagway.http.routers.r.rule=Host(`a`)",
                "tagway.udp.services.u.loadbalancer.server.port=53",
                "traefik.tcp.routers.r.foo=1",
                "TAGWAY.TCP.ROUTERS.R.SERVICE=s",
            ],
        );
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.warnings.len(), 2);
        assert!(d.warnings[0].to_string().contains("ignored"));
        assert_eq!(d.config.tcp.routers["R"].service, "s");
    }
}
