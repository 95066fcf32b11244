//! TOML text → node tree, with the line and column of every key and value.

use toml::de::{DeTable, DeValue};

use crate::error::ConfigError;
use crate::node::{Entry, Kind, Node, Value};
use crate::origin::Source;

/// Parses a TOML document.
pub(crate) fn read(text: &str, source: &Source) -> Result<Node, ConfigError> {
    let table = DeTable::parse(text).map_err(|e| syntax_error(text, source, &e))?;
    let span = table.span();
    Ok(Node::new(
        convert_table(text, source, table.into_inner()),
        source.origin_at(text, span.start),
    ))
}

fn convert_table(text: &str, source: &Source, table: DeTable<'_>) -> Value {
    let mut entries = Vec::with_capacity(table.len());
    for (key, value) in table {
        let key_origin = source.origin_at(text, key.span().start);
        let value_span = value.span();
        let node = Node::new(
            convert(text, source, value.into_inner()),
            source.origin_at(text, value_span.start),
        );
        entries.push(Entry {
            key: key.into_inner().into_owned(),
            key_origin,
            value: node,
        });
    }
    // Keys come sorted from the parser; put them back in document order.
    entries.sort_by(|a, b| a.key_origin.cmp(&b.key_origin));
    Value::Map(entries)
}

fn convert(text: &str, source: &Source, value: DeValue<'_>) -> Value {
    match value {
        DeValue::String(s) => Value::Scalar(s.into_owned(), Kind::Str),
        DeValue::Integer(i) => {
            // Normalise radix-prefixed integers to decimal.
            let t = i.as_str().replace('_', "");
            let parsed = match i.radix() {
                10 => t.parse::<i64>().ok(),
                r => i64::from_str_radix(t.get(2..).unwrap_or(""), r).ok(),
            };
            Value::Scalar(
                parsed.map_or_else(|| i.as_str().to_owned(), |n| n.to_string()),
                Kind::Int,
            )
        }
        DeValue::Float(f) => Value::Scalar(f.as_str().replace('_', ""), Kind::Float),
        DeValue::Boolean(b) => Value::Scalar(b.to_string(), Kind::Bool),
        DeValue::Datetime(d) => Value::Scalar(d.to_string(), Kind::Str),
        DeValue::Array(a) => Value::Seq(
            a.into_iter()
                .map(|v| {
                    let span = v.span();
                    Node::new(
                        convert(text, source, v.into_inner()),
                        source.origin_at(text, span.start),
                    )
                })
                .collect(),
        ),
        DeValue::Table(t) => convert_table(text, source, t),
    }
}

fn syntax_error(text: &str, source: &Source, e: &toml::de::Error) -> ConfigError {
    let offset = e.span().map_or(0, |s| s.start);
    let origin = source.origin_at(text, offset);
    let message = e.message().trim().to_owned();
    let line_no = origin.line().unwrap_or(1) as usize;
    let line = text.lines().nth(line_no.saturating_sub(1)).unwrap_or("");
    ConfigError::Syntax {
        origin,
        format: "TOML",
        message,
        hint: hint(text, line_no, line.trim()),
    }
}

/// A how-to-fix for the TOML mistakes people make with Traefik's examples.
fn hint(text: &str, line_no: usize, line: &str) -> Option<String> {
    if let Some(name) = line
        .strip_prefix("[[")
        .and_then(|l| l.split("]]").next())
        .map(str::trim)
    {
        // `[[x]]` after `[x]`: an array of tables where a table was declared.
        let table_header = format!("[{name}]");
        let earlier = text
            .lines()
            .take(line_no.saturating_sub(1))
            .position(|l| l.trim().starts_with(&table_header));
        let last = name.rsplit('.').next().unwrap_or(name);
        return Some(match earlier {
            Some(i) => format!(
                "`[[{name}]]` declares a list of tables, but `{name}` is a single table (declared with `{table_header}` on line {}); `{last}` is not a list: remove the `[[{name}]]` line and put its keys under `{table_header}`",
                i + 1
            ),
            None => format!(
                "`[[{name}]]` declares a list of tables; `{last}` is not a list: write `{table_header}`"
            ),
        });
    }
    None
}
