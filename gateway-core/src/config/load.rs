//! Reading a config from YAML or JSON text, and the error type every config problem uses.

use std::fmt;
use std::path::Path;

use super::Config;

/// One problem in a config: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The entity and field, e.g. `services[0] (name "echo").routes[1].paths[0]`.
    pub at: String,
    /// What is wrong.
    pub message: String,
    /// 1-based line in the source, when the parser knows it.
    pub line: Option<usize>,
    /// 1-based column in the source, when the parser knows it.
    pub column: Option<usize>,
}

/// A config that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the config came from, when it came from a file.
    pub source_name: Option<String>,
    /// The problems, in the order found.
    pub problems: Vec<Problem>,
}

impl ConfigError {
    /// An error with a single problem.
    pub fn single(at: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            source_name: None,
            problems: vec![Problem { at: at.into(), message: message.into(), line: None, column: None }],
        }
    }

    /// Names the file the config came from.
    #[must_use]
    pub fn in_file(mut self, name: impl Into<String>) -> Self {
        self.source_name = Some(name.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if let Some(name) = &self.source_name {
                write!(f, "{name}:")?;
            }
            if let (Some(l), Some(c)) = (p.line, p.column) {
                write!(f, "{l}:{c}:")?;
            }
            if self.source_name.is_some() || p.line.is_some() {
                write!(f, " ")?;
            }
            if p.at.is_empty() {
                write!(f, "{}", p.message)?;
            } else {
                write!(f, "{}: {}", p.at, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Splits serde's "... at line L column C" suffix off a message.
fn split_location(message: String) -> (String, Option<usize>, Option<usize>) {
    if let Some(i) = message.rfind(" at line ") {
        let tail = &message[i + " at line ".len()..];
        let mut parts = tail.split(" column ");
        let line = parts.next().and_then(|l| l.trim().parse().ok());
        let column = parts.next().and_then(|c| c.trim().parse().ok());
        if line.is_some() {
            return (message[..i].to_string(), line, column);
        }
    }
    (message, None, None)
}

/// Serde's messages start with the path to the field (`services[0].routes[0]: unknown field ...`):
/// keep it as `at`.
fn split_path(message: String) -> (String, String) {
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') && !path.is_empty() => (path.to_string(), rest.to_string()),
        _ => (String::new(), message),
    }
}

impl Config {
    /// Parses a config from YAML text (JSON is YAML too, but [`Config::from_json`] gives better
    /// messages for it).
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        serde_norway::from_str(text).map_err(|e| {
            let (line, column) = e.location().map(|l| (Some(l.line()), Some(l.column()))).unwrap_or((None, None));
            let (message, l2, c2) = split_location(e.to_string());
            let (at, message) = split_path(message);
            ConfigError {
                source_name: None,
                problems: vec![Problem { at, message, line: line.or(l2), column: column.or(c2) }],
            }
        })
    }

    /// Parses a config from JSON text.
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        serde_json::from_str(text).map_err(|e| {
            let (message, _, _) = split_location(e.to_string());
            ConfigError {
                source_name: None,
                problems: vec![Problem { at: String::new(), message, line: Some(e.line()), column: Some(e.column()) }],
            }
        })
    }

    /// Parses text as JSON when it starts with `{`, YAML otherwise.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        if text.trim_start().starts_with('{') { Config::from_json(text) } else { Config::from_yaml(text) }
    }

    /// Reads and parses a file (JSON for `*.json`, YAML otherwise). Errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::single("", format!("cannot read the file: {e}")).in_file(&name))?;
        let parsed = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
            Config::from_json(&text)
        } else {
            Config::parse(&text)
        };
        parsed.map_err(|e| e.in_file(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused_by_name_with_their_location() {
        let err = Config::from_yaml(
            "_format_version: \"3.0\"\nservices:\n  - name: a\n    url: http://x\n    colour: blue\n",
        )
        .unwrap_err();
        let p = &err.problems[0];
        assert!(p.message.contains("unknown field `colour`"), "{p:?}");
        assert_eq!(p.at, "services[0]");
        assert_eq!(p.line, Some(5), "{p:?}");
        assert!(err.to_string().starts_with("5:"), "{err}");
    }

    #[test]
    fn json_errors_carry_line_and_column() {
        let err = Config::from_json("{\n \"_format_version\": \"3.0\",\n \"services\": 7\n}").unwrap_err();
        let p = &err.problems[0];
        assert_eq!(p.line, Some(3));
        assert!(p.message.contains("invalid type"), "{p:?}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let err = Config::from_file("/nonexistent/kong.yml").unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/kong.yml: cannot read the file"), "{err}");
    }
}
