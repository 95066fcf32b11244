//! A serde `Deserializer` over the node tree.
//!
//! - struct fields match case-insensitively, using the field list serde passes to
//!   `deserialize_struct` (so `rootcas`, `ROOTCAS` and `rootCAs` all read `rootCAs`); map keys
//!   (resource names) keep their case;
//! - unknown keys are errors naming the key, its full path and where it was written;
//! - scalars convert as Traefik converts them (`"true"` is a bool, `"30"` an integer), since tags
//!   are all strings; a tag value for a list field is split on commas;
//! - a section read through [`section`] (an `Option<struct>`) is present when written empty
//!   (`tls:`, `[….tls]`, `tls=true`) and absent when `false`;
//! - every key's origin is recorded under its path, for later validation errors.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor,
    value::{MapAccessDeserializer, StrDeserializer, StringDeserializer},
};
use serde::{Deserialize, Deserializer};

use crate::error::ConfigError;
use crate::node::{Entry, Kind, Node, Value};
use crate::origin::Origin;

/// The newtype name [`section`] asks for; the node deserializer recognises it.
const SECTION: &str = "$tagway::section";

/// Reads an optional section (`Option<T>` of a struct): `tls:` / `[x.tls]` / `tls = {}` /
/// `tls=true` give `Some(T::default())`, `tls=false` gives `None`, a table gives `Some(T)`.
/// Use it as `#[serde(deserialize_with = "crate::de::section")]`.
pub(crate) fn section<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    struct V<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de> + Default> Visitor<'de> for V<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table, or true/false")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Some(T::default()))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(v.then(T::default))
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            T::deserialize(d).map(Some)
        }
        fn visit_newtype_struct<D2: Deserializer<'de>>(
            self,
            d: D2,
        ) -> Result<Self::Value, D2::Error> {
            // Other formats (JSON): a plain `Option<T>`.
            Option::<T>::deserialize(d)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_newtype_struct(SECTION, V(PhantomData))
}

/// A deserialization error, located at a key path and origin.
#[derive(Debug, Clone)]
pub(crate) struct DeError {
    pub path: Option<String>,
    pub origin: Option<Origin>,
    pub message: String,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.origin {
            write!(f, "{o}: ")?;
        }
        if let Some(p) = &self.path {
            write!(f, "{p}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            path: None,
            origin: None,
            message: msg.to_string(),
        }
    }
}

impl DeError {
    fn at(path: &str, origin: &Origin, message: impl Into<String>) -> DeError {
        DeError {
            path: Some(path.to_owned()),
            origin: Some(origin.clone()),
            message: message.into(),
        }
    }

    /// Attaches a location if the error has none yet.
    fn locate(mut self, path: &str, origin: &Origin) -> DeError {
        if self.origin.is_none() {
            self.origin = Some(origin.clone());
            if self.path.is_none() {
                self.path = Some(path.to_owned());
            }
        }
        self
    }
}

impl From<DeError> for ConfigError {
    fn from(e: DeError) -> Self {
        ConfigError::Invalid {
            key: e.path.unwrap_or_default(),
            origin: e.origin,
            message: e.message,
        }
    }
}

/// Shared state of one deserialization: the origins recorded per key path.
#[derive(Default)]
pub(crate) struct Ctx {
    origins: RefCell<BTreeMap<String, Origin>>,
}

impl Ctx {
    fn record(&self, path: &str, origin: &Origin) {
        self.origins
            .borrow_mut()
            .entry(path.to_owned())
            .or_insert_with(|| origin.clone());
    }

    /// The origins recorded so far, by key path.
    pub(crate) fn into_origins(self) -> BTreeMap<String, Origin> {
        self.origins.into_inner()
    }
}

/// Deserializes `T` from `node`, recording origins in `ctx`. `path` is the node's key path.
pub(crate) fn from_node<T: for<'de> Deserialize<'de>>(
    node: &Node,
    path: &str,
    ctx: &Ctx,
) -> Result<T, DeError> {
    T::deserialize(NodeDe {
        node,
        path: path.to_owned(),
        ctx,
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Go's `strconv.ParseBool`, as Traefik reads booleans.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        s if s.eq_ignore_ascii_case("true") => Some(true),
        s if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

struct NodeDe<'a> {
    node: &'a Node,
    path: String,
    ctx: &'a Ctx,
}

impl<'a> NodeDe<'a> {
    fn err(&self, message: impl Into<String>) -> DeError {
        DeError::at(&self.path, &self.node.origin, message)
    }

    fn locate<T>(&self, r: Result<T, DeError>) -> Result<T, DeError> {
        r.map_err(|e| e.locate(&self.path, &self.node.origin))
    }

    fn describe(&self) -> String {
        match &self.node.value {
            Value::Scalar(s, _) => format!("`{s}`"),
            _ => self.node.type_name().to_owned(),
        }
    }

    fn int(&self) -> Result<i128, DeError> {
        match &self.node.value {
            Value::Scalar(s, Kind::Int | Kind::Str) => s
                .trim()
                .parse::<i128>()
                .map_err(|_| self.err(format!("expected an integer, found {}", self.describe()))),
            Value::Scalar(s, Kind::Float) => match s.parse::<f64>() {
                Ok(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => Ok(f as i128),
                _ => Err(self.err(format!("expected an integer, found `{s}`"))),
            },
            _ => Err(self.err(format!("expected an integer, found {}", self.describe()))),
        }
    }

    fn map<'de, V: Visitor<'de>>(
        self,
        entries: &'a [Entry],
        fields: Option<&'static [&'static str]>,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let mut access = MapDe {
            entries: entries.iter(),
            fields,
            path: &self.path,
            ctx: self.ctx,
            current: None,
        };
        let r = visitor.visit_map(&mut access);
        let (path, origin) = match &access.current {
            Some((p, o)) => (p.clone(), o.clone()),
            None => (self.path.clone(), self.node.origin.clone()),
        };
        r.map_err(|e| e.locate(&path, &origin))
    }

    fn seq<'de, V: Visitor<'de>>(self, items: Vec<&Node>, visitor: V) -> Result<V::Value, DeError> {
        let mut access = SeqDe {
            items: items.into_iter(),
            index: 0,
            path: &self.path,
            ctx: self.ctx,
        };
        let r = visitor.visit_seq(&mut access);
        self.locate(r)
    }
}

/// Splits a tag's value for a list field: `a,b` → [`a`, `b`].
fn split_list(node: &Node) -> Option<Vec<Node>> {
    match (&node.value, &node.origin) {
        (Value::Scalar(s, _), Origin::Tag { .. }) => Some(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Node::str(s, node.origin.clone()))
                .collect(),
        ),
        _ => None,
    }
}

macro_rules! deserialize_int {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let n = self.int()?;
            let r = if n < 0 {
                match i64::try_from(n) {
                    Ok(v) => visitor.visit_i64(v),
                    Err(_) => return Err(self.err(format!("integer {n} out of range"))),
                }
            } else {
                match u64::try_from(n) {
                    Ok(v) => visitor.visit_u64(v),
                    Err(_) => return Err(self.err(format!("integer {n} out of range"))),
                }
            };
            self.locate(r)
        }
    )*};
}

impl<'de> Deserializer<'de> for NodeDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Scalar(s, Kind::Bool) => visitor.visit_bool(s == "true"),
            Value::Scalar(s, Kind::Int) => match s.parse::<i64>() {
                Ok(n) => visitor.visit_i64(n),
                Err(_) => match s.parse::<u64>() {
                    Ok(n) => visitor.visit_u64(n),
                    Err(_) => visitor.visit_str(s),
                },
            },
            Value::Scalar(s, Kind::Float) => match s.parse::<f64>() {
                Ok(f) => visitor.visit_f64(f),
                Err(_) => visitor.visit_str(s),
            },
            Value::Scalar(s, Kind::Str) => visitor.visit_str(s),
            Value::Seq(items) => return self.seq(items.iter().collect(), visitor),
            Value::Map(entries) => return self.map(entries, None, visitor),
        };
        self.locate(r)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let b = match &self.node.value {
            Value::Scalar(s, _) => parse_bool(s),
            _ => None,
        };
        match b {
            Some(b) => {
                let r = visitor.visit_bool(b);
                self.locate(r)
            }
            None => Err(self.err(format!("expected true or false, found {}", self.describe()))),
        }
    }

    deserialize_int!(deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64);

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Scalar(s, Kind::Int | Kind::Float | Kind::Str) => {
                match s.trim().parse::<f64>() {
                    Ok(f) => {
                        let r = visitor.visit_f64(f);
                        self.locate(r)
                    }
                    Err(_) => Err(self.err(format!("expected a number, found `{s}`"))),
                }
            }
            _ => Err(self.err(format!("expected a number, found {}", self.describe()))),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Scalar(s, _) => visitor.visit_str(s),
            Value::Null => visitor.visit_str(""),
            _ => {
                return Err(self.err(format!(
                    "expected a string, found {}",
                    self.node.type_name()
                )));
            }
        };
        self.locate(r)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Null => visitor.visit_none(),
            _ => return visitor.visit_some(self),
        };
        self.locate(r)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = visitor.visit_unit();
        self.locate(r)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if name != SECTION {
            return visitor.visit_newtype_struct(self);
        }
        let r = match &self.node.value {
            Value::Map(_) => return visitor.visit_some(self),
            Value::Null => visitor.visit_unit(),
            Value::Scalar(s, _) if s.trim().is_empty() => visitor.visit_unit(),
            Value::Scalar(s, _) => match parse_bool(s) {
                Some(true) => visitor.visit_unit(),
                Some(false) => visitor.visit_none(),
                None => {
                    return Err(self.err(format!(
                        "expected a table, or true/false to enable/disable the section, found `{s}`"
                    )));
                }
            },
            Value::Seq(_) => {
                return Err(self.err(
                    "expected a table, found a list (in TOML, write [a.b] rather than [[a.b]])",
                ));
            }
        };
        self.locate(r)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Seq(items) => self.seq(items.iter().collect(), visitor),
            Value::Null => self.seq(Vec::new(), visitor),
            Value::Map(_) => Err(self.err("expected a list, found a table")),
            Value::Scalar(..) => {
                // A tag value is a comma-separated list; a file's scalar is a one-item list.
                let split = split_list(self.node);
                match split {
                    Some(nodes) => {
                        let mut access = SeqDe {
                            items: nodes.iter().collect::<Vec<_>>().into_iter(),
                            index: 0,
                            path: &self.path,
                            ctx: self.ctx,
                        };
                        let r = visitor.visit_seq(&mut access);
                        self.locate(r)
                    }
                    None => {
                        let node = self.node;
                        self.seq(vec![node], visitor)
                    }
                }
            }
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(entries) => self.map(entries, None, visitor),
            Value::Null => self.map(&[], None, visitor),
            _ => Err(self.err(format!("expected a table, found {}", self.describe()))),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(entries) => self.map(entries, Some(fields), visitor),
            Value::Null => self.map(&[], Some(fields), visitor),
            Value::Scalar(s, _) if s.trim().is_empty() || parse_bool(s) == Some(true) => {
                self.map(&[], Some(fields), visitor)
            }
            Value::Seq(_) => Err(self
                .err("expected a table, found a list (in TOML, write [a.b] rather than [[a.b]])")),
            Value::Scalar(..) => Err(self.err(format!(
                "expected a table with keys {}, found {}",
                expected(fields),
                self.describe()
            ))),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Scalar(s, _) => {
                let s = s.trim();
                match variants.iter().find(|v| v.eq_ignore_ascii_case(s)) {
                    Some(v) => {
                        let d: StrDeserializer<'_, DeError> = v.into_deserializer();
                        let r = visitor.visit_enum(d);
                        self.locate(r)
                    }
                    None => Err(self.err(format!(
                        "unknown value `{s}`: expected {}",
                        expected(variants)
                    ))),
                }
            }
            _ => Err(self.err(format!(
                "expected one of {}, found {}",
                expected(variants),
                self.node.type_name()
            ))),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

/// `a, b or c` (case-insensitive duplicates such as serde aliases removed).
fn expected(names: &[&str]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for n in names {
        if !seen.iter().any(|s| s.eq_ignore_ascii_case(n)) {
            seen.push(n);
        }
    }
    match seen.len() {
        0 => "nothing".to_owned(),
        1 => format!("`{}`", seen[0]),
        _ => {
            let (last, rest) = seen.split_last().unwrap_or((&"", &[]));
            format!(
                "{} or `{last}`",
                rest.iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
}

struct MapDe<'a, 'p> {
    entries: std::slice::Iter<'a, Entry>,
    fields: Option<&'static [&'static str]>,
    path: &'p str,
    ctx: &'a Ctx,
    /// The entry being read: its value's path and the key's origin.
    current: Option<(String, Origin)>,
}

impl<'de> MapAccess<'de> for MapDe<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.as_slice().first() else {
            return Ok(None);
        };
        let key: &str = match self.fields {
            Some(fields) => {
                match fields
                    .iter()
                    .find(|f| f.eq_ignore_ascii_case(entry.key.trim()))
                {
                    Some(f) => f,
                    None => {
                        let path = join(self.path, &entry.key);
                        return Err(DeError::at(
                            &path,
                            &entry.key_origin,
                            format!("unknown key `{}`: expected {}", entry.key, expected(fields)),
                        ));
                    }
                }
            }
            None => &entry.key,
        };
        let path = join(self.path, key);
        self.ctx.record(&path, &entry.key_origin);
        self.current = Some((path, entry.key_origin.clone()));
        let r = match self.fields {
            Some(_) => {
                let d: StrDeserializer<'_, DeError> = key.into_deserializer();
                seed.deserialize(d)
            }
            None => {
                let d: StringDeserializer<DeError> = key.to_owned().into_deserializer();
                seed.deserialize(d)
            }
        };
        r.map(Some)
            .map_err(|e| e.locate(&join(self.path, key), &entry.key_origin))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let entry = self
            .entries
            .next()
            .ok_or_else(|| <DeError as de::Error>::custom("value without a key"))?;
        let path = self
            .current
            .as_ref()
            .map(|(p, _)| p.clone())
            .unwrap_or_else(|| join(self.path, &entry.key));
        seed.deserialize(NodeDe {
            node: &entry.value,
            path,
            ctx: self.ctx,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct SeqDe<'a, 'p> {
    items: std::vec::IntoIter<&'a Node>,
    index: usize,
    path: &'p str,
    ctx: &'a Ctx,
}

impl<'de> SeqAccess<'de> for SeqDe<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        self.ctx.record(&path, &node.origin);
        seed.deserialize(NodeDe {
            node,
            path,
            ctx: self.ctx,
        })
        .map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}
