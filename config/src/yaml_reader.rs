//! YAML text → node tree, with the line and column of every key and value.
//!
//! serde_norway does not expose positions of values, only of errors, so this reads the event
//! stream of the same parser serde_norway uses (`unsafe-libyaml-norway`) and keeps each event's
//! start mark. The unsafe code is confined to [`Events`], which mirrors serde_norway's own wrapper.

use std::collections::HashMap;
use std::ffi::CStr;
use std::mem::MaybeUninit;

use unsafe_libyaml_norway as unsafe_sys;

use crate::error::ConfigError;
use crate::node::{Entry, Kind, Node, Value};
use crate::origin::{Origin, Source};

/// One parser event with its start position (0-based line and column).
enum Event {
    StreamStart,
    StreamEnd,
    DocumentStart,
    DocumentEnd,
    Alias(String),
    Scalar {
        anchor: Option<String>,
        tag: Option<String>,
        value: String,
        plain: bool,
    },
    SequenceStart(Option<String>),
    SequenceEnd,
    MappingStart(Option<String>),
    MappingEnd,
}

struct Mark {
    line: u64,
    column: u64,
}

struct YamlError {
    problem: String,
    context: Option<String>,
    mark: Mark,
}

/// Safe iterator over libyaml events of a borrowed input.
struct Events<'a> {
    parser: Box<MaybeUninit<unsafe_sys::yaml_parser_t>>,
    // The parser reads from this buffer until it is deleted in `drop`.
    _input: &'a [u8],
    done: bool,
}

impl<'a> Events<'a> {
    fn new(input: &'a str) -> Events<'a> {
        let mut parser = Box::new(MaybeUninit::<unsafe_sys::yaml_parser_t>::uninit());
        // SAFETY: `parser` is a valid, heap-pinned allocation for a yaml_parser_t;
        // yaml_parser_initialize fully initialises it (it only fails on allocation failure).
        // The input buffer outlives the parser: it is borrowed for 'a and the parser is
        // deleted in `drop`, before the borrow ends.
        unsafe {
            let p = parser.as_mut_ptr();
            if unsafe_sys::yaml_parser_initialize(p).fail {
                panic!("libyaml: out of memory initialising the parser");
            }
            unsafe_sys::yaml_parser_set_encoding(p, unsafe_sys::YAML_UTF8_ENCODING);
            unsafe_sys::yaml_parser_set_input_string(p, input.as_ptr(), input.len() as u64);
        }
        Events {
            parser,
            _input: input.as_bytes(),
            done: false,
        }
    }

    fn next(&mut self) -> Result<(Event, Mark), YamlError> {
        let mut event = MaybeUninit::<unsafe_sys::yaml_event_t>::uninit();
        // SAFETY: the parser was initialised in `new`; `event` is written by yaml_parser_parse
        // on success and deleted right after being converted (all data is copied out).
        unsafe {
            let p = self.parser.as_mut_ptr();
            if self.done || unsafe_sys::yaml_parser_parse(p, event.as_mut_ptr()).fail {
                self.done = true;
                return Err(error_of(&*p));
            }
            let ev = &*event.as_ptr();
            let mark = Mark {
                line: ev.start_mark.line,
                column: ev.start_mark.column,
            };
            let converted = convert(ev);
            unsafe_sys::yaml_event_delete(event.as_mut_ptr());
            if matches!(converted, Event::StreamEnd) {
                self.done = true;
            }
            Ok((converted, mark))
        }
    }
}

impl Drop for Events<'_> {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, deleted exactly once here.
        unsafe { unsafe_sys::yaml_parser_delete(self.parser.as_mut_ptr()) }
    }
}

/// # Safety
/// `p` must be a null pointer or a NUL-terminated string.
unsafe fn opt_string(p: *const u8) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null libyaml strings are NUL-terminated.
        Some(
            unsafe { CStr::from_ptr(p.cast()) }
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// # Safety
/// `ev` must be an event produced by yaml_parser_parse and not yet deleted.
unsafe fn convert(ev: &unsafe_sys::yaml_event_t) -> Event {
    // SAFETY: each union field is read only for the event type that defines it.
    unsafe {
        match ev.type_ {
            unsafe_sys::YAML_STREAM_START_EVENT => Event::StreamStart,
            unsafe_sys::YAML_STREAM_END_EVENT => Event::StreamEnd,
            unsafe_sys::YAML_DOCUMENT_START_EVENT => Event::DocumentStart,
            unsafe_sys::YAML_DOCUMENT_END_EVENT => Event::DocumentEnd,
            unsafe_sys::YAML_ALIAS_EVENT => {
                Event::Alias(opt_string(ev.data.alias.anchor).unwrap_or_default())
            }
            unsafe_sys::YAML_SCALAR_EVENT => {
                let s = ev.data.scalar;
                let bytes = if s.value.is_null() {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(s.value, s.length as usize)
                };
                Event::Scalar {
                    anchor: opt_string(s.anchor),
                    tag: opt_string(s.tag),
                    value: String::from_utf8_lossy(bytes).into_owned(),
                    plain: s.style == unsafe_sys::YAML_PLAIN_SCALAR_STYLE,
                }
            }
            unsafe_sys::YAML_SEQUENCE_START_EVENT => {
                Event::SequenceStart(opt_string(ev.data.sequence_start.anchor))
            }
            unsafe_sys::YAML_SEQUENCE_END_EVENT => Event::SequenceEnd,
            unsafe_sys::YAML_MAPPING_START_EVENT => {
                Event::MappingStart(opt_string(ev.data.mapping_start.anchor))
            }
            unsafe_sys::YAML_MAPPING_END_EVENT => Event::MappingEnd,
            _ => Event::StreamEnd,
        }
    }
}

/// # Safety
/// `p` must be an initialised parser.
unsafe fn error_of(p: &unsafe_sys::yaml_parser_t) -> YamlError {
    // SAFETY: problem/context are null or NUL-terminated static strings of libyaml.
    unsafe {
        YamlError {
            problem: opt_string(p.problem.cast()).unwrap_or_else(|| "invalid YAML".to_owned()),
            context: opt_string(p.context.cast()),
            mark: Mark {
                line: p.problem_mark.line,
                column: p.problem_mark.column,
            },
        }
    }
}

/// Parses a YAML document (the first of the stream; more than one is an error).
pub(crate) fn read(text: &str, source: &Source) -> Result<Node, ConfigError> {
    let mut events = Events::new(text);
    let mut reader = Reader {
        source,
        anchors: HashMap::new(),
    };
    let origin = |m: &Mark| {
        source.origin(
            u32::try_from(m.line + 1).unwrap_or(u32::MAX),
            u32::try_from(m.column + 1).unwrap_or(u32::MAX),
        )
    };
    let syntax = |e: YamlError| ConfigError::Syntax {
        origin: origin(&e.mark),
        format: "YAML",
        message: match e.context {
            Some(c) => format!("{} {}", e.problem, c),
            None => e.problem,
        },
        hint: None,
    };
    let mut root: Option<Node> = None;
    loop {
        let (ev, mark) = events.next().map_err(syntax)?;
        match ev {
            Event::StreamStart | Event::DocumentEnd => {}
            Event::StreamEnd => break,
            Event::DocumentStart => {
                if root.is_some() {
                    return Err(ConfigError::Syntax {
                        origin: origin(&mark),
                        format: "YAML",
                        message: "more than one YAML document in the file".to_owned(),
                        hint: Some("keep one document per file (remove `---`)".to_owned()),
                    });
                }
                let (ev, mark) = events.next().map_err(syntax)?;
                root = Some(reader.node(&mut events, ev, mark).map_err(|e| match e {
                    ReadError::Yaml(y) => syntax(y),
                    ReadError::Config(c) => c,
                })?);
            }
            _ => {}
        }
    }
    Ok(root.unwrap_or_else(|| Node::new(Value::Null, source.origin(1, 1))))
}

enum ReadError {
    Yaml(YamlError),
    Config(ConfigError),
}

impl From<YamlError> for ReadError {
    fn from(e: YamlError) -> Self {
        ReadError::Yaml(e)
    }
}

struct Reader<'s> {
    source: &'s Source,
    anchors: HashMap<String, Node>,
}

impl Reader<'_> {
    fn origin(&self, m: &Mark) -> Origin {
        self.source.origin(
            u32::try_from(m.line + 1).unwrap_or(u32::MAX),
            u32::try_from(m.column + 1).unwrap_or(u32::MAX),
        )
    }

    fn node(&mut self, events: &mut Events<'_>, ev: Event, mark: Mark) -> Result<Node, ReadError> {
        let origin = self.origin(&mark);
        let (node, anchor) = match ev {
            Event::Alias(name) => {
                return match self.anchors.get(&name) {
                    Some(n) => {
                        let mut n = n.clone();
                        n.origin = origin;
                        Ok(n)
                    }
                    None => Err(ReadError::Config(ConfigError::Syntax {
                        origin,
                        format: "YAML",
                        message: format!("unknown anchor `*{name}`"),
                        hint: None,
                    })),
                };
            }
            Event::Scalar {
                anchor,
                tag,
                value,
                plain,
            } => (
                Node::new(resolve(value, plain, tag.as_deref()), origin),
                anchor,
            ),
            Event::SequenceStart(anchor) => {
                let mut items = Vec::new();
                loop {
                    let (ev, mark) = events.next()?;
                    if matches!(ev, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.node(events, ev, mark)?);
                }
                (Node::new(Value::Seq(items), origin), anchor)
            }
            Event::MappingStart(anchor) => {
                let mut entries: Vec<Entry> = Vec::new();
                // Entries from merge keys (`<<: *base`, `<<: [*a, *b]`), added after the
                // explicit ones: an explicit key wins, then the first merged mapping that has it.
                let mut merged: Vec<Entry> = Vec::new();
                loop {
                    let (ev, mark) = events.next()?;
                    if matches!(ev, Event::MappingEnd) {
                        break;
                    }
                    let key = self.node(events, ev, mark)?;
                    let key_text = match key.value {
                        Value::Scalar(s, _) => s,
                        Value::Null => String::new(),
                        _ => {
                            return Err(ReadError::Config(ConfigError::Syntax {
                                origin: key.origin,
                                format: "YAML",
                                message: "a key must be a plain value, not a list or a table"
                                    .to_owned(),
                                hint: None,
                            }));
                        }
                    };
                    let (ev, mark) = events.next()?;
                    let value = self.node(events, ev, mark)?;
                    if key_text == MERGE_KEY {
                        merge_into(&mut merged, value)?;
                        continue;
                    }
                    if let Some(prev) = entries.iter().find(|e| e.key == key_text) {
                        return Err(ReadError::Config(ConfigError::Syntax {
                            origin: key.origin,
                            format: "YAML",
                            message: format!(
                                "duplicate key `{key_text}` (first defined at line {})",
                                prev.key_origin.line().unwrap_or(0)
                            ),
                            hint: Some("remove one of the two definitions".to_owned()),
                        }));
                    }
                    entries.push(Entry {
                        key: key_text,
                        key_origin: key.origin,
                        value,
                    });
                }
                for m in merged {
                    if !entries.iter().any(|e| e.key == m.key) {
                        entries.push(m);
                    }
                }
                (Node::new(Value::Map(entries), origin), anchor)
            }
            _ => (Node::new(Value::Null, origin), None),
        };
        if let Some(a) = anchor {
            self.anchors.insert(a, node.clone());
        }
        Ok(node)
    }
}

/// The YAML merge key (as Traefik's YAML library, go-yaml, supports it).
const MERGE_KEY: &str = "<<";

/// Adds the entries of a merge key's value (a mapping, or a list of mappings) to `merged`, keeping
/// the first definition of each key.
fn merge_into(merged: &mut Vec<Entry>, value: Node) -> Result<(), ReadError> {
    let sources = match value.value {
        Value::Map(entries) => vec![entries],
        Value::Seq(items) => {
            let mut maps = Vec::with_capacity(items.len());
            for item in items {
                match item.value {
                    Value::Map(entries) => maps.push(entries),
                    _ => return Err(merge_error(&item)),
                }
            }
            maps
        }
        _ => return Err(merge_error(&value)),
    };
    for entry in sources.into_iter().flatten() {
        if !merged.iter().any(|e| e.key == entry.key) {
            merged.push(entry);
        }
    }
    Ok(())
}

fn merge_error(node: &Node) -> ReadError {
    ReadError::Config(ConfigError::Syntax {
        origin: node.origin.clone(),
        format: "YAML",
        message: format!(
            "the merge key `<<` takes a mapping or a list of mappings, not {}",
            node.type_name()
        ),
        hint: Some("write `<<: *anchor` or `<<: [*a, *b]`".to_owned()),
    })
}

/// YAML 1.2 core schema resolution of a scalar.
fn resolve(value: String, plain: bool, tag: Option<&str>) -> Value {
    match tag {
        Some("tag:yaml.org,2002:str") => return Value::Scalar(value, Kind::Str),
        Some("tag:yaml.org,2002:null") => return Value::Null,
        _ => {}
    }
    if !plain {
        return Value::Scalar(value, Kind::Str);
    }
    match value.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" => {
            return Value::Scalar(value.to_ascii_lowercase(), Kind::Bool);
        }
        _ => {}
    }
    let digits = value.strip_prefix(['-', '+']).unwrap_or(&value);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Value::Scalar(value, Kind::Int);
    }
    if let Some(hex) = value.strip_prefix("0x")
        && let Ok(n) = i64::from_str_radix(hex, 16)
    {
        return Value::Scalar(n.to_string(), Kind::Int);
    }
    if let Some(oct) = value.strip_prefix("0o")
        && let Ok(n) = i64::from_str_radix(oct, 8)
    {
        return Value::Scalar(n.to_string(), Kind::Int);
    }
    if value.parse::<f64>().is_ok()
        && value.bytes().any(|b| b.is_ascii_digit())
        && !value
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
    {
        return Value::Scalar(value, Kind::Float);
    }
    Value::Scalar(value, Kind::Str)
}
