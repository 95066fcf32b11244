//! Where a configuration value came from: a place in a file, or a Consul tag.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The origin of a configuration value, named in every error about it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Origin {
    /// A position in a configuration file (1-based line and column).
    File {
        /// The file (as given, or as found in the provider's directory).
        path: Arc<Path>,
        /// 1-based line.
        line: u32,
        /// 1-based column.
        column: u32,
    },
    /// A tag (`traefik.tcp.routers.r.rule=…`), as written.
    Tag {
        /// The whole tag text.
        tag: Arc<str>,
    },
    /// Text given without a file (e.g. [`crate::load_dynamic_str`]), with a name for it.
    Text {
        /// The name the caller gave the text.
        name: Arc<str>,
        /// 1-based line.
        line: u32,
        /// 1-based column.
        column: u32,
    },
}

impl Origin {
    /// A position in `path`.
    pub fn file(path: impl Into<PathBuf>, line: u32, column: u32) -> Origin {
        Origin::File {
            path: Arc::from(path.into().as_path()),
            line,
            column,
        }
    }

    /// A tag.
    pub fn tag(tag: impl AsRef<str>) -> Origin {
        Origin::Tag {
            tag: Arc::from(tag.as_ref()),
        }
    }

    /// The tag text when the origin is a tag.
    pub fn as_tag(&self) -> Option<&str> {
        match self {
            Origin::Tag { tag } => Some(tag),
            _ => None,
        }
    }

    /// The file when the origin is a place in a file.
    pub fn file_path(&self) -> Option<&Path> {
        match self {
            Origin::File { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The 1-based line, for file and text origins.
    pub fn line(&self) -> Option<u32> {
        match self {
            Origin::File { line, .. } | Origin::Text { line, .. } => Some(*line),
            Origin::Tag { .. } => None,
        }
    }
}

impl fmt::Display for Origin {
    /// `path:line:column`, `name:line:column` or ``tag `…` ``.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            Origin::Text { name, line, column } => write!(f, "{name}:{line}:{column}"),
            Origin::Tag { tag } => write!(f, "tag `{tag}`"),
        }
    }
}

/// The source a reader reads from, used to build origins.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    File(Arc<Path>),
    Text(Arc<str>),
}

impl Source {
    pub(crate) fn origin(&self, line: u32, column: u32) -> Origin {
        match self {
            Source::File(path) => Origin::File {
                path: path.clone(),
                line,
                column,
            },
            Source::Text(name) => Origin::Text {
                name: name.clone(),
                line,
                column,
            },
        }
    }

    /// 1-based line and column of a byte offset in `text`.
    pub(crate) fn origin_at(&self, text: &str, offset: usize) -> Origin {
        let (line, column) = line_col(text, offset);
        self.origin(line, column)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let offset = offset.min(text.len());
    let mut cut = offset;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let before = &text[..cut];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(column).unwrap_or(u32::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column() {
        let t = "a\nbc\nd";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 2), (2, 1));
        assert_eq!(line_col(t, 3), (2, 2));
        assert_eq!(line_col(t, 5), (3, 1));
    }

    #[test]
    fn displays() {
        assert_eq!(Origin::file("/a/b.toml", 3, 4).to_string(), "/a/b.toml:3:4");
        assert_eq!(
            Origin::tag("traefik.enable=true").to_string(),
            "tag `traefik.enable=true`"
        );
    }
}
