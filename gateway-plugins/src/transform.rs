//! What the transformer plugins share: Kong's `remove / rename / replace / add / append`
//! blocks, value templates, and the operations on headers, query strings and bodies, all
//! parsed once when the plugin is built.
//!
//! Templates (Kong's syntax, the forms that are plain lookups): `$(headers.x-name)`,
//! `$(headers["x-name"])`, `$(query_params.name)`, `$(query_params["name"])`,
//! `$(uri_captures.name)`, `$(uri_captures["name"])`, `$(uri_captures[1])`. A lookup that
//! finds nothing gives an empty string. Anything else inside `$(...)` is refused when the
//! config is compiled.
//!
//! Body field names that start with `/` are JSON Pointers (RFC 6901) into nested objects, an
//! extension of Kong's top-level fields.

use std::borrow::Cow;

use gateway_core::body::ProxyBody;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};
use serde::Deserialize;
use serde_json::Value;

/// One of Kong's transform blocks: lists of `name` or `name:value` strings per target.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Block {
    /// Header entries.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Query-string entries (request only).
    #[serde(default)]
    pub querystring: Vec<String>,
    /// Body entries (JSON or form on requests, JSON on responses).
    #[serde(default)]
    pub body: Vec<String>,
    /// JSON body: how values are typed (`boolean`, `number`, `string`), one per body entry.
    #[serde(default)]
    pub json_types: Vec<JsonType>,
    /// JSON body entries (response-transformer's name for `body`).
    #[serde(default)]
    pub json: Vec<String>,
    /// `replace` only: the new upstream path (request-transformer).
    #[serde(default)]
    pub uri: Option<String>,
}

/// The JSON type a body value is written as.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JsonType {
    /// A string (the default).
    #[default]
    String,
    /// `true` or `false`.
    Boolean,
    /// A number.
    Number,
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Header(HeaderName),
    Query(String),
    CaptureName(String),
    CaptureIndex(usize),
}

/// A value with `$(...)` lookups, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

/// What templates look values up in.
pub struct Lookup<'a> {
    /// The client's request headers.
    pub headers: &'a HeaderMap,
    /// The client's query string.
    pub query: Option<&'a str>,
    /// The route's regex captures.
    pub captures: Option<gateway_core::regex::Captures<'a>>,
}

impl Template {
    /// Parses `text`; errors name the bad expression.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("$(") {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after.find(')').ok_or_else(|| format!("unclosed `$(` in `{text}`"))?;
            parts.push(parse_expr(after[..end].trim()).ok_or_else(|| {
                format!(
                    "`$({})` in `{text}`: only headers.x, query_params.x and uri_captures.x lookups are supported",
                    &after[..end]
                )
            })?);
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template(parts))
    }

    /// True when the template reads request headers.
    pub fn reads_headers(&self) -> bool {
        self.0.iter().any(|p| matches!(p, Part::Header(_)))
    }

    /// True when the template has no lookups.
    pub fn is_literal(&self) -> bool {
        self.0.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// Renders the template for use inside a URL path: values looked up from the request are
    /// percent-encoded so they stay within one path segment (`/`, `?`, `#`, `%` and anything
    /// outside visible ASCII is escaped, and a value of `.` or `..` is escaped too), so a
    /// request cannot steer `replace.uri` to another path or inject a query.
    pub fn render_path(&self, l: &Lookup<'_>) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Lit(s) => out.push_str(s),
                lookup => {
                    let value = Template(vec![lookup.clone()]).render(l).into_owned();
                    if value == "." || value == ".." {
                        out.push_str(&value.replace('.', "%2E"));
                        continue;
                    }
                    for b in value.bytes() {
                        if b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'%' | b'\\') {
                            out.push(b as char);
                        } else {
                            out.push_str(&format!("%{b:02X}"));
                        }
                    }
                }
            }
        }
        out
    }

    /// Renders the template; borrows when it is a single literal.
    pub fn render<'s>(&'s self, l: &Lookup<'_>) -> Cow<'s, str> {
        if let [Part::Lit(s)] = self.0.as_slice() {
            return Cow::Borrowed(s);
        }
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Header(h) => out.push_str(l.headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("")),
                Part::Query(q) => {
                    if let Some(v) = l
                        .query
                        .and_then(|qs| form_urlencoded::parse(qs.as_bytes()).find(|(k, _)| k == q).map(|(_, v)| v))
                    {
                        out.push_str(&v);
                    }
                }
                Part::CaptureName(n) => {
                    out.push_str(l.captures.as_ref().and_then(|c| c.name(n)).map_or("", |m| m.as_str()))
                }
                Part::CaptureIndex(i) => {
                    out.push_str(l.captures.as_ref().and_then(|c| c.get(*i)).map_or("", |m| m.as_str()))
                }
            }
        }
        Cow::Owned(out)
    }
}

fn parse_expr(e: &str) -> Option<Part> {
    let (source, key) = if let Some((s, k)) = e.split_once('.') {
        (s, k.to_string())
    } else {
        let (s, rest) = e.split_once('[')?;
        let k = rest.strip_suffix(']')?.trim();
        let k = k
            .strip_prefix('"')
            .and_then(|k| k.strip_suffix('"'))
            .or_else(|| k.strip_prefix('\'').and_then(|k| k.strip_suffix('\'')));
        match k {
            Some(k) => (s, k.to_string()),
            None if s == "uri_captures" => return rest.strip_suffix(']')?.trim().parse().ok().map(Part::CaptureIndex),
            None => return None,
        }
    };
    match source {
        "headers" => HeaderName::from_bytes(key.as_bytes()).ok().map(Part::Header),
        "query_params" => Some(Part::Query(key)),
        "uri_captures" => Some(key.parse().map(Part::CaptureIndex).unwrap_or(Part::CaptureName(key))),
        _ => None,
    }
}

/// A `name` or `name:value` entry, parsed.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The name (a header name, a query parameter, a body field or JSON Pointer).
    pub name: String,
    /// The value template (absent for `remove`; the new name for `rename`).
    pub value: Option<Template>,
    /// The JSON type of the value.
    pub json_type: JsonType,
}

/// Parses a list of entries. `with_value`: entries must be `name:value`.
pub fn entries(field: &str, list: &[String], with_value: bool, types: &[JsonType]) -> Result<Vec<Entry>, String> {
    list.iter()
        .enumerate()
        .map(|(i, raw)| {
            let json_type = types.get(i).copied().unwrap_or_default();
            if !with_value {
                return Ok(Entry { name: raw.trim().to_string(), value: None, json_type });
            }
            let (name, value) =
                raw.split_once(':').ok_or_else(|| format!("`{field}`: `{raw}` must be `name:value`"))?;
            if name.trim().is_empty() {
                return Err(format!("`{field}`: `{raw}` has an empty name"));
            }
            Ok(Entry { name: name.trim().to_string(), value: Some(Template::parse(value)?), json_type })
        })
        .collect()
}

/// Header names of a list of entries, checked.
pub fn header_name(field: &str, name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("`{field}`: `{name}` is not a header name"))
}

/// Kong's five operations on one target, in Kong's order.
#[derive(Debug, Clone, Default)]
pub struct Ops {
    /// Removed names.
    pub remove: Vec<Entry>,
    /// `old:new` renames.
    pub rename: Vec<Entry>,
    /// Values replaced when present.
    pub replace: Vec<Entry>,
    /// Values added when absent.
    pub add: Vec<Entry>,
    /// Values appended.
    pub append: Vec<Entry>,
}

impl Ops {
    /// Every value template of these operations.
    pub fn templates(&self) -> impl Iterator<Item = &Template> {
        [&self.remove, &self.rename, &self.replace, &self.add, &self.append]
            .into_iter()
            .flatten()
            .filter_map(|e| e.value.as_ref())
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.replace.is_empty()
            && self.add.is_empty()
            && self.append.is_empty()
    }
}

/// Applies header operations.
pub fn apply_headers(ops: &Ops, h: &mut HeaderMap, l: &Lookup<'_>) {
    let value = |e: &Entry| e.value.as_ref().and_then(|t| HeaderValue::from_str(&t.render(l)).ok());
    let name = |e: &Entry| HeaderName::from_bytes(e.name.as_bytes()).ok();
    for e in &ops.remove {
        if let Some(n) = name(e) {
            h.remove(n);
        }
    }
    for e in &ops.rename {
        let (Some(old), Some(new)) =
            (name(e), e.value.as_ref().and_then(|t| HeaderName::from_bytes(t.render(l).as_bytes()).ok()))
        else {
            continue;
        };
        let values: Vec<HeaderValue> = h.get_all(&old).iter().cloned().collect();
        if !values.is_empty() {
            h.remove(&old);
            for v in values {
                h.append(new.clone(), v);
            }
        }
    }
    for e in &ops.replace {
        if let (Some(n), Some(v)) = (name(e), value(e))
            && h.contains_key(&n)
        {
            h.insert(n, v);
        }
    }
    for e in &ops.add {
        if let (Some(n), Some(v)) = (name(e), value(e))
            && !h.contains_key(&n)
        {
            h.insert(n, v);
        }
    }
    for e in &ops.append {
        if let (Some(n), Some(v)) = (name(e), value(e)) {
            h.append(n, v);
        }
    }
}

/// Applies operations to `name=value` pairs (query strings and form bodies).
pub fn apply_pairs(ops: &Ops, pairs: &mut Vec<(String, String)>, l: &Lookup<'_>) {
    let render = |e: &Entry| e.value.as_ref().map(|t| t.render(l).into_owned()).unwrap_or_default();
    for e in &ops.remove {
        pairs.retain(|(k, _)| *k != e.name);
    }
    for e in &ops.rename {
        let new = render(e);
        for (k, _) in pairs.iter_mut().filter(|(k, _)| *k == e.name) {
            k.clone_from(&new);
        }
    }
    for e in &ops.replace {
        let v = render(e);
        for (_, val) in pairs.iter_mut().filter(|(k, _)| *k == e.name) {
            val.clone_from(&v);
        }
    }
    for e in &ops.add {
        if !pairs.iter().any(|(k, _)| *k == e.name) {
            pairs.push((e.name.clone(), render(e)));
        }
    }
    for e in &ops.append {
        pairs.push((e.name.clone(), render(e)));
    }
}

fn typed(e: &Entry, l: &Lookup<'_>) -> Value {
    let s = e.value.as_ref().map(|t| t.render(l).into_owned()).unwrap_or_default();
    match e.json_type {
        JsonType::String => Value::String(s),
        JsonType::Boolean => Value::Bool(s.trim() == "true"),
        JsonType::Number => s.trim().parse::<serde_json::Number>().map(Value::Number).unwrap_or(Value::String(s)),
    }
}

/// The parent object of a field and the last key: top-level names, or JSON Pointers.
fn parent_and_key<'v>(
    root: &'v mut Value,
    name: &str,
    create: bool,
) -> Option<(&'v mut serde_json::Map<String, Value>, String)> {
    let Some(pointer) = name.strip_prefix('/') else {
        return root.as_object_mut().map(|o| (o, name.to_string()));
    };
    let tokens: Vec<String> = pointer.split('/').map(|t| t.replace("~1", "/").replace("~0", "~")).collect();
    let (last, path) = tokens.split_last()?;
    let mut cur = root;
    for t in path {
        let obj = cur.as_object_mut()?;
        if create && !obj.contains_key(t) {
            obj.insert(t.clone(), Value::Object(Default::default()));
        }
        cur = obj.get_mut(t)?;
    }
    cur.as_object_mut().map(|o| (o, last.clone()))
}

/// Applies operations to a JSON document (objects only; anything else is left alone).
pub fn apply_json(ops: &Ops, doc: &mut Value, l: &Lookup<'_>) {
    for e in &ops.remove {
        if let Some((obj, key)) = parent_and_key(doc, &e.name, false) {
            obj.remove(&key);
        }
    }
    for e in &ops.rename {
        let new = e.value.as_ref().map(|t| t.render(l).into_owned()).unwrap_or_default();
        let taken = parent_and_key(doc, &e.name, false).and_then(|(obj, key)| obj.remove(&key));
        if let Some(v) = taken
            && let Some((obj, key)) = parent_and_key(doc, &new, true)
        {
            obj.insert(key, v);
        }
    }
    for e in &ops.replace {
        let v = typed(e, l);
        if let Some((obj, key)) = parent_and_key(doc, &e.name, false)
            && let Some(slot) = obj.get_mut(&key)
        {
            *slot = v;
        }
    }
    for e in &ops.add {
        let v = typed(e, l);
        if let Some((obj, key)) = parent_and_key(doc, &e.name, true) {
            obj.entry(key).or_insert(v);
        }
    }
    for e in &ops.append {
        let v = typed(e, l);
        if let Some((obj, key)) = parent_and_key(doc, &e.name, true) {
            match obj.remove(&key) {
                None => {
                    obj.insert(key, Value::Array(vec![v]));
                }
                Some(Value::Array(mut a)) => {
                    a.push(v);
                    obj.insert(key, Value::Array(a));
                }
                Some(old) => {
                    obj.insert(key, Value::Array(vec![old, v]));
                }
            }
        }
    }
}

/// Replaces a request's query string (`qs` already encoded; empty removes it).
pub fn set_query(req: &mut Request<ProxyBody>, qs: &str) {
    let pq = if qs.is_empty() { req.uri().path().to_string() } else { format!("{}?{qs}", req.uri().path()) };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_render() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("ann"));
        let re = gateway_core::regex::Regex::new(r"^/u/(?<id>\d+)/(\w+)").unwrap();
        let l = Lookup { headers: &h, query: Some("page=2&q=a%20b"), captures: re.captures("/u/42/posts") };
        let t = Template::parse(r#"id=$(uri_captures.id) n=$(uri_captures[2]) u=$(headers["x-user"]) q=$(query_params.q) none=$(headers.x-none)"#).unwrap();
        assert_eq!(t.render(&l), "id=42 n=posts u=ann q=a b none=");
        assert!(Template::parse("plain").unwrap().is_literal());
        assert!(Template::parse("$(os.execute('x'))").unwrap_err().contains("only headers.x"));
        assert!(Template::parse("$(headers.x").unwrap_err().contains("unclosed"));
    }

    #[test]
    fn json_ops_follow_kongs_order_and_reach_nested_fields() {
        let e = |list: &[&str], with_value: bool| {
            entries("t", &list.iter().map(|s| s.to_string()).collect::<Vec<_>>(), with_value, &[]).unwrap()
        };
        let ops = Ops {
            remove: e(&["secret", "/meta/internal"], false),
            rename: e(&["old:new"], true),
            replace: e(&["name:replaced", "missing:never"], true),
            add: e(&["name:not-added", "/meta/source:gateway"], true),
            append: e(&["tags:b", "solo:x"], true),
        };
        let mut doc =
            serde_json::json!({"secret": 1, "old": "v", "name": "n", "tags": ["a"], "meta": {"internal": true}});
        let h = HeaderMap::new();
        apply_json(&ops, &mut doc, &Lookup { headers: &h, query: None, captures: None });
        assert_eq!(
            doc,
            serde_json::json!({"new": "v", "name": "replaced", "tags": ["a", "b"], "solo": ["x"], "meta": {"source": "gateway"}})
        );
    }
}
