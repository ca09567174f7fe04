//! The route table: compiled once from route specs, then matched with a pure function.
//!
//! ```
//! use gateway_core::router::{PathKind, PathSpec, RouteInput, RouteSpec, Router};
//! use http::{HeaderMap, Method};
//!
//! let router = Router::new(vec![
//!     RouteSpec { hosts: vec!["api.example.com".into()], paths: vec![PathSpec::new("/v1", PathKind::Prefix)], ..Default::default() },
//!     RouteSpec { paths: vec![PathSpec::new("/", PathKind::Prefix)], ..Default::default() },
//! ]).unwrap();
//! let headers = HeaderMap::new();
//! let m = router.find(&RouteInput { host: "api.example.com", port: None, path: "/v1/users", method: &Method::GET, headers: &headers }).unwrap();
//! assert_eq!((m.route, m.matched_len), (0, 3));
//! ```
//!
//! # Precedence
//!
//! Every (route, path) pair is one *entry* with a [`Priority`]; a request is served by the
//! matching entry with the highest priority. The order is Kong's `traditional_compatible` rule,
//! field by field (most significant first):
//!
//! 1. the number of criteria the route sets (hosts, paths, methods, headers): more wins;
//! 2. hosts that are all plain (no `*`) beat routes with a wildcard host;
//! 3. more header criteria win;
//! 4. a regex path beats a plain path;
//! 5. among regex paths, the higher `regex_priority` wins;
//! 6. among plain paths, the longer path wins (Kong prefix, Ingress `Exact` and `Prefix` alike);
//! 7. at equal length an `Exact` path beats a prefix (Kubernetes Ingress rule);
//! 8. ties go to the entry declared first.
//!
//! # Lookup cost
//!
//! Entries are indexed by host (an exact-host hash map, hash maps for `*.suffix` and `prefix.*`
//! wildcards probed once per label of the request host, and one table for host-less routes).
//! Inside each table plain paths live in a compressed byte trie, so a lookup walks the request
//! path once instead of scanning routes; only regex paths are tried one by one, highest
//! priority first, and a scan stops as soon as no remaining entry could beat the best match.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

/// How a route path is compared with the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// Kong's plain path: a character prefix (`/foo` matches `/foobar`).
    Prefix,
    /// A regular expression anchored at the start of the path (Kong's `~` paths).
    Regex,
    /// Kubernetes `Exact`: the whole path, case-sensitive.
    Exact,
    /// Kubernetes `Prefix`: a prefix by path element (`/foo` matches `/foo/bar`, not `/foobar`).
    /// A trailing slash in the pattern is ignored.
    ElementPrefix,
}

/// One path of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSpec {
    /// The pattern: a path starting with `/`, or a regex (without Kong's `~` marker).
    pub pattern: String,
    /// How the pattern matches.
    pub kind: PathKind,
}

impl PathSpec {
    /// A path spec.
    pub fn new(pattern: impl Into<String>, kind: PathKind) -> Self {
        Self { pattern: pattern.into(), kind }
    }
}

/// The matching criteria of one route, as the config model describes them.
#[derive(Debug, Clone, Default)]
pub struct RouteSpec {
    /// Hosts: exact (`a.example.com`, optionally with `:port`), `*.example.com` (any number of
    /// leading labels), or `example.*`. Empty means any host.
    pub hosts: Vec<String>,
    /// When true, a `*.example.com` host matches exactly one label (Kubernetes Ingress).
    pub wildcard_single_label: bool,
    /// Paths; empty means any path.
    pub paths: Vec<PathSpec>,
    /// Methods; empty means any method.
    pub methods: Vec<Method>,
    /// Header criteria: the request must carry each header with one of the listed values
    /// (compared without regard to ASCII case).
    pub headers: Vec<(HeaderName, Vec<String>)>,
    /// Order among regex paths (higher first).
    pub regex_priority: i64,
}

/// Why a route spec cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route #{route}: {message}")]
pub struct RouteError {
    /// Index of the route in the list given to [`Router::new`].
    pub route: usize,
    /// What is wrong.
    pub message: String,
}

/// What the router looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// The host, lower-case, without port (see [`split_host`]).
    pub host: &'a str,
    /// The port given in the host header, if any.
    pub port: Option<u16>,
    /// The path, without the query.
    pub path: &'a str,
    /// The method.
    pub method: &'a Method,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

/// The outcome of a successful lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    /// Index of the matched route in the list given to [`Router::new`].
    pub route: usize,
    /// Index of the matched path in that route's `paths` (0 when it has none).
    pub path: usize,
    /// Bytes of the request path the route's path matched (what `strip_path` removes).
    pub matched_len: usize,
    /// The matched entry, for [`Router::regex`].
    pub entry: usize,
}

/// The precedence of one entry; greater wins. See the module docs for the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Priority {
    match_weight: u8,
    plain_hosts_only: bool,
    headers_count: u8,
    regex: bool,
    regex_priority: i64,
    path_len: u32,
    exact: bool,
    order: Reverse<u32>,
}

#[derive(Debug)]
enum Matcher {
    Any,
    Prefix,
    ElementPrefix,
    Exact,
    Regex(Arc<Regex>),
}

/// Header name and its accepted values (lower-case), per entry.
type HeaderCriteria = Box<[(HeaderName, Box<[Box<str>]>)]>;

#[derive(Debug)]
struct Entry {
    route: u32,
    path_index: u32,
    priority: Priority,
    matcher: Matcher,
    methods: Box<[Method]>,
    headers: HeaderCriteria,
    /// The pattern as written, for [`Router::describe`].
    pattern: Box<str>,
    hosts: Box<str>,
}

impl Entry {
    fn filters_pass(&self, input: &RouteInput<'_>) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(input.method) {
            return false;
        }
        self.headers.iter().all(|(name, wanted)| {
            input
                .headers
                .get_all(name)
                .iter()
                .any(|value| wanted.iter().any(|w| w.as_bytes().eq_ignore_ascii_case(value.as_bytes())))
        })
    }

    /// For an entry found in the trie at `consumed` bytes: does its kind accept the rest?
    fn trie_match(&self, path: &str, consumed: usize) -> bool {
        match self.matcher {
            Matcher::Prefix => true,
            Matcher::Exact => consumed == path.len(),
            Matcher::ElementPrefix => {
                consumed == path.len()
                    || path.as_bytes()[consumed] == b'/'
                    || (consumed > 0 && path.as_bytes()[consumed - 1] == b'/')
            }
            Matcher::Any | Matcher::Regex(_) => false,
        }
    }
}

/// A compressed byte trie from path prefixes to entry ids.
#[derive(Debug, Default)]
struct Trie {
    nodes: Vec<Node>,
}

#[derive(Debug, Default)]
struct Node {
    label: Box<[u8]>,
    entries: Vec<u32>,
    /// (first byte of the child's label, child node id), sorted by byte.
    children: Vec<(u8, u32)>,
}

impl Trie {
    fn insert(&mut self, key: &[u8], entry: u32) {
        if self.nodes.is_empty() {
            self.nodes.push(Node::default());
        }
        let mut node = 0usize;
        let mut rest = key;
        loop {
            if rest.is_empty() {
                self.nodes[node].entries.push(entry);
                return;
            }
            let first = rest[0];
            match self.nodes[node].children.binary_search_by_key(&first, |c| c.0) {
                Err(at) => {
                    let id = self.nodes.len() as u32;
                    self.nodes.push(Node { label: rest.into(), entries: vec![entry], children: Vec::new() });
                    self.nodes[node].children.insert(at, (first, id));
                    return;
                }
                Ok(at) => {
                    let child = self.nodes[node].children[at].1 as usize;
                    let label = &self.nodes[child].label;
                    let common = label.iter().zip(rest).take_while(|(a, b)| a == b).count();
                    if common == label.len() {
                        node = child;
                        rest = &rest[common..];
                        continue;
                    }
                    // Split the child's edge at `common`.
                    let mid = self.nodes.len() as u32;
                    let tail: Box<[u8]> = label[common..].into();
                    let head: Box<[u8]> = label[..common].into();
                    self.nodes[child].label = tail.clone();
                    self.nodes.push(Node { label: head, entries: Vec::new(), children: vec![(tail[0], child as u32)] });
                    self.nodes[node].children[at].1 = mid;
                    node = mid as usize;
                    rest = &rest[common..];
                }
            }
        }
    }

    /// Calls `visit(entries, consumed)` for every node on the walk whose key is a prefix of `path`.
    #[inline]
    fn walk(&self, path: &[u8], mut visit: impl FnMut(&[u32], usize)) {
        let Some(root) = self.nodes.first() else {
            return;
        };
        if !root.entries.is_empty() {
            visit(&root.entries, 0);
        }
        let mut node = root;
        let mut consumed = 0;
        while consumed < path.len() {
            let Ok(at) = node.children.binary_search_by_key(&path[consumed], |c| c.0) else {
                return;
            };
            let child = &self.nodes[node.children[at].1 as usize];
            if !path[consumed..].starts_with(&child.label) {
                return;
            }
            consumed += child.label.len();
            if !child.entries.is_empty() {
                visit(&child.entries, consumed);
            }
            node = child;
        }
    }
}

/// The entries that apply to one host (or to any host).
#[derive(Debug, Default)]
struct Table {
    trie: Trie,
    regex: Vec<u32>,
    any_path: Vec<u32>,
}

struct Best {
    priority: Priority,
    found: RouteMatch,
}

impl Table {
    fn add(&mut self, entries: &[Entry], id: u32, pattern: &str) {
        match entries[id as usize].matcher {
            Matcher::Any => self.any_path.push(id),
            Matcher::Regex(_) => self.regex.push(id),
            Matcher::ElementPrefix => {
                // `/foo/` and `/foo` are the same element prefix; `/` (and `//`) stay `/`.
                let key = match pattern.trim_end_matches('/') {
                    "" => "/",
                    k => k,
                };
                self.trie.insert(key.as_bytes(), id);
            }
            Matcher::Prefix | Matcher::Exact => self.trie.insert(pattern.as_bytes(), id),
        }
    }

    fn sort(&mut self, entries: &[Entry]) {
        let by_priority = |a: &u32, b: &u32| entries[*b as usize].priority.cmp(&entries[*a as usize].priority);
        for node in &mut self.trie.nodes {
            node.entries.sort_by(by_priority);
        }
        self.regex.sort_by(by_priority);
        self.any_path.sort_by(by_priority);
    }

    #[inline]
    fn find(&self, entries: &[Entry], input: &RouteInput<'_>, best: &mut Option<Best>) {
        let path = input.path;
        let beaten = |best: &Option<Best>, p: &Priority| best.as_ref().is_some_and(|b| b.priority >= *p);
        self.trie.walk(path.as_bytes(), |ids, consumed| {
            for &id in ids {
                let e = &entries[id as usize];
                if beaten(best, &e.priority) {
                    break;
                }
                if e.trie_match(path, consumed) && e.filters_pass(input) {
                    *best = Some(Best { priority: e.priority, found: e.found(consumed, id as usize) });
                    break;
                }
            }
        });
        for &id in &self.regex {
            let e = &entries[id as usize];
            if beaten(best, &e.priority) {
                break;
            }
            if let Matcher::Regex(re) = &e.matcher
                && let Some(m) = re.find(path)
                && e.filters_pass(input)
            {
                *best = Some(Best { priority: e.priority, found: e.found(m.end(), id as usize) });
                break;
            }
        }
        for &id in &self.any_path {
            let e = &entries[id as usize];
            if beaten(best, &e.priority) {
                break;
            }
            if e.filters_pass(input) {
                *best = Some(Best { priority: e.priority, found: e.found(0, id as usize) });
                break;
            }
        }
    }
}

impl Entry {
    fn found(&self, matched_len: usize, entry: usize) -> RouteMatch {
        RouteMatch { route: self.route as usize, path: self.path_index as usize, matched_len, entry }
    }
}

/// An immutable, compiled route table. Cheap to query from many threads at once.
#[derive(Default)]
pub struct Router {
    entries: Vec<Entry>,
    exact: HashMap<Box<str>, Table>,
    /// `*.example.com` keyed by `example.com`, any number of leading labels.
    suffix: HashMap<Box<str>, Table>,
    /// `*.example.com` keyed by `example.com`, exactly one leading label.
    suffix_one: HashMap<Box<str>, Table>,
    /// `example.*` keyed by `example`.
    prefix: HashMap<Box<str>, Table>,
    any_host: Table,
    /// Some exact host names a port, so lookups also try `host:port`.
    hosts_with_port: bool,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router").field("entries", &self.entries.len()).finish_non_exhaustive()
    }
}

/// One line of [`Router::describe`]: an entry in precedence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryDescription {
    /// Index of the route.
    pub route: usize,
    /// Hosts of the route, comma-separated, or `*`.
    pub hosts: String,
    /// The path pattern and its kind, e.g. `prefix /api` or `regex ^/u/\d+`.
    pub path: String,
    /// Methods, comma-separated, or `*`.
    pub methods: String,
}

impl Router {
    /// Compiles route specs into a table. Routes keep their index in `routes` as their id, and
    /// earlier routes win ties.
    pub fn new(routes: Vec<RouteSpec>) -> Result<Self, RouteError> {
        let mut router = Router::default();
        let mut order = 0u32;
        for (index, spec) in routes.iter().enumerate() {
            let err = |message: String| RouteError { route: index, message };
            let hosts: Vec<(HostKind, String)> = spec
                .hosts
                .iter()
                .map(|h| parse_host(h, spec.wildcard_single_label).map_err(&err))
                .collect::<Result<_, _>>()?;
            let plain_hosts_only = !hosts.is_empty() && hosts.iter().all(|(k, _)| *k == HostKind::Exact);
            if hosts.iter().any(|(_, h)| h.contains(':')) {
                router.hosts_with_port = true;
            }
            let match_weight =
                [!spec.hosts.is_empty(), !spec.paths.is_empty(), !spec.methods.is_empty(), !spec.headers.is_empty()]
                    .iter()
                    .filter(|b| **b)
                    .count() as u8;
            let headers: Box<[_]> = spec
                .headers
                .iter()
                .map(|(n, vals)| (n.clone(), vals.iter().map(|v| v.to_ascii_lowercase().into_boxed_str()).collect()))
                .collect();
            let host_text = if spec.hosts.is_empty() { "*".to_string() } else { spec.hosts.join(",") };
            let any_path = [PathSpec::new("", PathKind::Prefix)];
            let paths: &[PathSpec] = if spec.paths.is_empty() { &any_path } else { &spec.paths };
            for (path_index, path) in paths.iter().enumerate() {
                let (matcher, path_len) = if spec.paths.is_empty() {
                    (Matcher::Any, 0)
                } else {
                    match path.kind {
                        PathKind::Regex => {
                            let re = Regex::new(&format!("^(?:{})", path.pattern))
                                .map_err(|e| err(format!("invalid regex path `{}`: {e}", path.pattern)))?;
                            (Matcher::Regex(Arc::new(re)), 0)
                        }
                        kind => {
                            if !path.pattern.starts_with('/') {
                                return Err(err(format!("path `{}` must start with `/`", path.pattern)));
                            }
                            let m = match kind {
                                PathKind::Prefix => Matcher::Prefix,
                                PathKind::Exact => Matcher::Exact,
                                _ => Matcher::ElementPrefix,
                            };
                            let len = if kind == PathKind::ElementPrefix {
                                path.pattern.trim_end_matches('/').len().max(1)
                            } else {
                                path.pattern.len()
                            };
                            (m, len)
                        }
                    }
                };
                let regex = matches!(matcher, Matcher::Regex(_));
                let priority = Priority {
                    match_weight,
                    plain_hosts_only,
                    headers_count: spec.headers.len().min(255) as u8,
                    regex,
                    regex_priority: if regex { spec.regex_priority } else { 0 },
                    path_len: path_len.min(0x7FFFF) as u32,
                    exact: matches!(matcher, Matcher::Exact),
                    order: Reverse(order),
                };
                order += 1;
                let id = router.entries.len() as u32;
                router.entries.push(Entry {
                    route: index as u32,
                    path_index: path_index as u32,
                    priority,
                    matcher,
                    methods: spec.methods.clone().into(),
                    headers: headers.clone(),
                    pattern: path.pattern.clone().into(),
                    hosts: host_text.clone().into(),
                });
                let entries = &router.entries;
                if hosts.is_empty() {
                    router.any_host.add(entries, id, &path.pattern);
                }
                for (kind, key) in &hosts {
                    let map = match kind {
                        HostKind::Exact => &mut router.exact,
                        HostKind::Suffix => &mut router.suffix,
                        HostKind::SuffixOneLabel => &mut router.suffix_one,
                        HostKind::Prefix => &mut router.prefix,
                    };
                    map.entry(key.as_str().into()).or_default().add(entries, id, &path.pattern);
                }
            }
        }
        let entries = &router.entries;
        for table in router
            .exact
            .values_mut()
            .chain(router.suffix.values_mut())
            .chain(router.suffix_one.values_mut())
            .chain(router.prefix.values_mut())
            .chain(std::iter::once(&mut router.any_host))
        {
            table.sort(entries);
        }
        Ok(router)
    }

    /// The number of (route, path) entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Finds the route that serves `input`, if any. Pure: depends only on the table and input.
    pub fn find(&self, input: &RouteInput<'_>) -> Option<RouteMatch> {
        let mut best: Option<Best> = None;
        let host = input.host;
        if self.hosts_with_port
            && let Some(port) = input.port
        {
            let mut buf = String::with_capacity(host.len() + 6);
            buf.push_str(host);
            buf.push(':');
            buf.push_str(itoa::Buffer::new().format(port));
            if let Some(t) = self.exact.get(buf.as_str()) {
                t.find(&self.entries, input, &mut best);
            }
        }
        if let Some(t) = self.exact.get(host) {
            t.find(&self.entries, input, &mut best);
        }
        if !self.suffix.is_empty() || !self.suffix_one.is_empty() || !self.prefix.is_empty() {
            let mut first_dot = true;
            for (i, b) in host.bytes().enumerate() {
                if b != b'.' {
                    continue;
                }
                if let Some(t) = self.suffix.get(&host[i + 1..]) {
                    t.find(&self.entries, input, &mut best);
                }
                if first_dot {
                    if let Some(t) = self.suffix_one.get(&host[i + 1..]) {
                        t.find(&self.entries, input, &mut best);
                    }
                    first_dot = false;
                }
                if let Some(t) = self.prefix.get(&host[..i]) {
                    t.find(&self.entries, input, &mut best);
                }
            }
        }
        self.any_host.find(&self.entries, input, &mut best);
        best.map(|b| b.found)
    }

    /// The regex of a match on a regex path (for its capture groups).
    pub fn regex(&self, m: &RouteMatch) -> Option<&Arc<Regex>> {
        match &self.entries.get(m.entry)?.matcher {
            Matcher::Regex(re) => Some(re),
            _ => None,
        }
    }

    /// Every entry, in precedence order (the first that matches a request serves it).
    pub fn describe(&self) -> Vec<EntryDescription> {
        let mut ids: Vec<&Entry> = self.entries.iter().collect();
        ids.sort_by_key(|e| Reverse(e.priority));
        ids.into_iter()
            .map(|e| EntryDescription {
                route: e.route as usize,
                hosts: e.hosts.to_string(),
                path: match &e.matcher {
                    Matcher::Any => "any".to_string(),
                    Matcher::Prefix => format!("prefix {}", e.pattern),
                    Matcher::ElementPrefix => format!("element-prefix {}", e.pattern),
                    Matcher::Exact => format!("exact {}", e.pattern),
                    Matcher::Regex(re) => format!("regex {}", re.as_str()),
                },
                methods: if e.methods.is_empty() {
                    "*".to_string()
                } else {
                    e.methods.iter().map(Method::as_str).collect::<Vec<_>>().join(",")
                },
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostKind {
    Exact,
    Suffix,
    SuffixOneLabel,
    Prefix,
}

fn parse_host(host: &str, single_label: bool) -> Result<(HostKind, String), String> {
    let lower = host.to_ascii_lowercase();
    let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
    if let Some(rest) = lower.strip_prefix("*.") {
        if !valid(rest) || rest.contains('*') || rest.contains(':') {
            return Err(format!("invalid wildcard host `{host}`"));
        }
        let kind = if single_label { HostKind::SuffixOneLabel } else { HostKind::Suffix };
        return Ok((kind, rest.to_string()));
    }
    if let Some(rest) = lower.strip_suffix(".*") {
        if !valid(rest) || rest.contains('*') || rest.contains(':') {
            return Err(format!("invalid wildcard host `{host}`"));
        }
        return Ok((HostKind::Prefix, rest.to_string()));
    }
    if !valid(&lower) {
        return Err(format!(
            "invalid host `{host}` (a wildcard must be the leftmost label `*.example.com` or the rightmost `example.*`)"
        ));
    }
    Ok((HostKind::Exact, lower))
}

/// Splits a `Host` value into a lower-case host and an optional port, allocating only when the
/// host has upper-case letters. IPv6 literals keep their brackets.
pub fn split_host(raw: &str) -> (std::borrow::Cow<'_, str>, Option<u16>) {
    // The port follows the last `:`, unless a `]` (the end of an IPv6 literal) comes after it:
    // one scan from the end for either. `rfind` and then `contains` set up a searcher each,
    // which cost more than the scan on a host this short.
    let (host, port) = match raw.bytes().rposition(|c| c == b':' || c == b']') {
        Some(i) if raw.as_bytes()[i] == b':' => (&raw[..i], raw[i + 1..].parse().ok()),
        _ => (raw, None),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        (std::borrow::Cow::Owned(host.to_ascii_lowercase()), port)
    } else {
        (std::borrow::Cow::Borrowed(host), port)
    }
}

#[cfg(test)]
mod tests;
