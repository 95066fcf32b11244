//! The generic node tree every reader produces (TOML, YAML, tags), each node carrying its origin.

use crate::origin::Origin;

/// A value with the place it was read from.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub value: Value,
    pub origin: Origin,
}

/// What a scalar was written as. Readers keep the text; the deserializer converts it to what the
/// target field wants (Traefik reads `"true"` as a bool and `"30"` as an integer, since tags are
/// strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Str,
    Int,
    Float,
    Bool,
}

/// A node's value.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    /// An absent value (`key:` or `~` in YAML): an empty section or a default.
    Null,
    /// A scalar, as text, with how it was written.
    Scalar(String, Kind),
    /// A list.
    Seq(Vec<Node>),
    /// A table, keys in document order.
    Map(Vec<Entry>),
}

/// One key of a table.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub key: String,
    pub key_origin: Origin,
    pub value: Node,
}

impl Node {
    pub(crate) fn new(value: Value, origin: Origin) -> Node {
        Node { value, origin }
    }

    /// A string scalar.
    pub(crate) fn str(text: impl Into<String>, origin: Origin) -> Node {
        Node::new(Value::Scalar(text.into(), Kind::Str), origin)
    }

    /// A short description of the value's type, for errors.
    pub(crate) fn type_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "an empty value",
            Value::Scalar(_, Kind::Str) => "a string",
            Value::Scalar(_, Kind::Int) => "an integer",
            Value::Scalar(_, Kind::Float) => "a number",
            Value::Scalar(_, Kind::Bool) => "a boolean",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a table",
        }
    }
}
