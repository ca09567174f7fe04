//! Precedence tables for Kong-format routes and Ingress-style routes, without sockets.

use super::*;

fn route(hosts: &[&str], paths: &[(&str, PathKind)]) -> RouteSpec {
    RouteSpec {
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        paths: paths.iter().map(|(p, k)| PathSpec::new(*p, *k)).collect(),
        ..Default::default()
    }
}

fn kong(hosts: &[&str], paths: &[&str]) -> RouteSpec {
    let paths: Vec<(&str, PathKind)> = paths
        .iter()
        .map(|p| match p.strip_prefix('~') {
            Some(re) => (re, PathKind::Regex),
            None => (*p, PathKind::Prefix),
        })
        .collect();
    route(hosts, &paths)
}

struct Case {
    host: &'static str,
    path: &'static str,
    method: Method,
    headers: &'static [(&'static str, &'static str)],
    want: Option<usize>,
}

fn case(host: &'static str, path: &'static str, want: Option<usize>) -> Case {
    Case { host, path, method: Method::GET, headers: &[], want }
}

fn check(routes: Vec<RouteSpec>, cases: &[Case]) {
    let router = Router::new(routes).expect("routes compile");
    for c in cases {
        let mut headers = HeaderMap::new();
        for (k, v) in c.headers {
            headers.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        let (host, port) = split_host(c.host);
        let got = router
            .find(&RouteInput { host: &host, port, path: c.path, method: &c.method, headers: &headers })
            .map(|m| m.route);
        assert_eq!(
            got,
            c.want,
            "{} {} {}{}",
            c.method,
            c.host,
            c.path,
            if c.headers.is_empty() { "" } else { " (+headers)" }
        );
    }
}

#[test]
fn kong_longest_plain_prefix_wins() {
    check(
        vec![kong(&[], &["/"]), kong(&[], &["/api"]), kong(&[], &["/api/v1"]), kong(&[], &["/apix"])],
        &[
            case("a.com", "/", Some(0)),
            case("a.com", "/other", Some(0)),
            case("a.com", "/api", Some(1)),
            case("a.com", "/apiary", Some(1)), // Kong prefixes are character prefixes
            case("a.com", "/api/v1/users", Some(2)),
            case("a.com", "/api/v2", Some(1)),
            case("a.com", "/apix/1", Some(3)),
        ],
    );
}

#[test]
fn kong_more_criteria_win_over_longer_paths() {
    // Route 1 has host + path (weight 2) and beats route 0's longer path (weight 1).
    check(
        vec![kong(&[], &["/very/long/path"]), kong(&["a.com"], &["/"])],
        &[
            case("a.com", "/very/long/path", Some(1)),
            case("b.com", "/very/long/path", Some(0)),
            case("b.com", "/", None),
        ],
    );
}

#[test]
fn kong_plain_hosts_beat_wildcards() {
    check(
        vec![kong(&["*.example.com"], &["/"]), kong(&["api.example.com"], &["/"]), kong(&["example.*"], &["/"])],
        &[
            case("api.example.com", "/x", Some(1)),
            case("web.example.com", "/x", Some(0)),
            case("a.b.example.com", "/x", Some(0)), // Kong wildcards cover any number of labels
            case("example.com", "/x", Some(2)),     // `*.example.com` needs a label; `example.*` covers it
            case("example.org", "/x", Some(2)),
            case("API.Example.COM", "/x", Some(1)), // hosts compare without case
            case("api.example.com:8000", "/x", Some(1)), // the port does not take part
            case("api.example.com.", "/x", Some(1)), // nor does a trailing dot
        ],
    );
}

#[test]
fn kong_suffix_wildcard_needs_a_label() {
    check(vec![kong(&["*.example.com"], &[])], &[case("example.com", "/", None), case("x.example.com", "/", Some(0))]);
}

#[test]
fn kong_regex_beats_plain_and_orders_by_regex_priority() {
    let mut low = kong(&[], &[r"~/users/\d+"]);
    low.regex_priority = 1;
    let mut high = kong(&[], &[r"~/users/\d+/posts"]);
    high.regex_priority = 10;
    check(
        vec![kong(&[], &["/users/1/posts/long/plain"]), low, high],
        &[
            case("a.com", "/users/1/posts/long/plain", Some(2)), // regex beats even a longer plain path
            case("a.com", "/users/1", Some(1)),
            case("a.com", "/users/x", None),
            case("a.com", "/prefix/users/1", None), // regexes are anchored at the start
        ],
    );
}

#[test]
fn kong_equal_priority_goes_to_first_declared() {
    check(vec![kong(&[], &["/same"]), kong(&[], &["/same"])], &[case("a.com", "/same", Some(0))]);
}

#[test]
fn kong_methods_and_headers_are_criteria() {
    let mut get_only = kong(&[], &["/m"]);
    get_only.methods = vec![Method::GET];
    let mut with_header = kong(&[], &["/m"]);
    with_header.headers = vec![(HeaderName::from_static("x-version"), vec!["V2".into()])];
    let cases = [
        case("a.com", "/m", Some(0)),
        Case { host: "a.com", path: "/m", method: Method::POST, headers: &[], want: Some(2) },
        // Both routes match with weight 2; more header criteria win.
        Case { host: "a.com", path: "/m", method: Method::GET, headers: &[("x-version", "v2")], want: Some(1) },
        Case { host: "a.com", path: "/m", method: Method::POST, headers: &[("x-version", "v3")], want: Some(2) },
    ];
    check(vec![get_only, with_header, kong(&[], &["/m"])], &cases);
}

#[test]
fn kong_route_with_only_hosts_or_only_methods() {
    let post = RouteSpec { methods: vec![Method::POST], ..Default::default() };
    check(
        vec![kong(&["only.host"], &[]), post],
        &[
            case("only.host", "/anything", Some(0)),
            Case { host: "x.y", path: "/z", method: Method::POST, headers: &[], want: Some(1) },
            case("x.y", "/z", None),
        ],
    );
}

#[test]
fn host_with_port_matches_only_that_port() {
    check(
        vec![kong(&["a.com:8443"], &["/"]), kong(&["a.com"], &["/"])],
        &[case("a.com:8443", "/", Some(0)), case("a.com:8000", "/", Some(1)), case("a.com", "/", Some(1))],
    );
}

#[test]
fn one_route_many_paths_each_with_its_own_priority() {
    check(
        vec![kong(&[], &["/a", "/b/long"]), kong(&[], &["/b"])],
        &[case("x", "/a/1", Some(0)), case("x", "/b/long/1", Some(0)), case("x", "/b/short", Some(1))],
    );
}

// Kubernetes Ingress v1 path matching examples (the table in the Ingress concept docs).
fn ingress(rows: &[(&'static str, PathKind)], host: &str, wildcard_single: bool) -> Vec<RouteSpec> {
    rows.iter()
        .map(|(p, k)| {
            let mut r = route(if host.is_empty() { &[] } else { std::slice::from_ref(&host) }, &[(p, *k)]);
            r.wildcard_single_label = wildcard_single;
            r
        })
        .collect()
}

#[test]
fn ingress_path_examples() {
    use PathKind::{ElementPrefix as P, Exact as E};
    // (route paths, request path, expected route)
    type Row = (&'static [(&'static str, PathKind)], &'static str, Option<usize>);
    let table: &[Row] = &[
        (&[("/", P)], "/any/path", Some(0)),
        (&[("/foo", E)], "/foo", Some(0)),
        (&[("/foo", E)], "/bar", None),
        (&[("/foo", E)], "/foo/", None),
        (&[("/foo/", E)], "/foo", None),
        (&[("/foo", P)], "/foo", Some(0)),
        (&[("/foo", P)], "/foo/", Some(0)),
        (&[("/foo/", P)], "/foo", Some(0)),
        (&[("/foo/", P)], "/foo/", Some(0)),
        (&[("/aaa/bb", P)], "/aaa/bbb", None),
        (&[("/aaa/bbb", P)], "/aaa/bbb", Some(0)),
        (&[("/aaa/bbb/", P)], "/aaa/bbb", Some(0)),
        (&[("/aaa/bbb", P)], "/aaa/bbb/", Some(0)),
        (&[("/aaa/bbb", P)], "/aaa/bbb/ccc", Some(0)),
        (&[("/aaa/bbb", P)], "/aaa/bbbxyz", None),
        (&[("/", P), ("/aaa", P)], "/aaa/ccc", Some(1)),
        (&[("/", P), ("/aaa", P), ("/aaa/bbb", P)], "/aaa/bbb", Some(2)),
        (&[("/", P), ("/aaa", P), ("/aaa/bbb", P)], "/ccc", Some(0)),
        (&[("/aaa", P)], "/ccc", None),
        (&[("/foo", E), ("/foo", P)], "/foo", Some(0)), // Exact beats Prefix at equal length
        (&[("/foo", P), ("/foo", E)], "/foo", Some(1)),
        (&[("/foo", P), ("/foo", E)], "/foo/x", Some(0)),
        (&[("/FOO", E)], "/foo", None), // case-sensitive
    ];
    for (rows, path, want) in table {
        check(ingress(rows, "", false), &[case("h", path, *want)]);
    }
}

#[test]
fn ingress_wildcard_host_covers_exactly_one_label() {
    let routes = ingress(&[("/", PathKind::ElementPrefix)], "*.foo.com", true);
    check(routes, &[case("bar.foo.com", "/", Some(0)), case("baz.bar.foo.com", "/", None), case("foo.com", "/", None)]);
}

#[test]
fn ingress_host_rules_beat_hostless_rules() {
    let mut routes = ingress(&[("/", PathKind::ElementPrefix)], "", false);
    routes.extend(ingress(&[("/", PathKind::ElementPrefix)], "foo.bar.com", false));
    routes.extend(ingress(&[("/", PathKind::ElementPrefix)], "*.bar.com", true));
    check(
        routes,
        &[case("foo.bar.com", "/x", Some(1)), case("other.bar.com", "/x", Some(2)), case("else.com", "/x", Some(0))],
    );
}

#[test]
fn bad_specs_are_errors_not_panics() {
    let err = Router::new(vec![kong(&[], &["~/(unclosed"])]).unwrap_err();
    assert_eq!(err.route, 0);
    assert!(err.message.contains("invalid regex path"), "{}", err.message);
    let err = Router::new(vec![kong(&[], &["/ok"]), kong(&[], &["nope"])]).unwrap_err();
    assert_eq!(err.route, 1);
    let err = Router::new(vec![kong(&["a.*.com"], &[])]).unwrap_err();
    assert!(err.message.contains("invalid host"), "{}", err.message);
    // A port on a wildcard host could never match: refused, not silently dead.
    let err = Router::new(vec![kong(&["*.example.com:8080"], &[])]).unwrap_err();
    assert!(err.message.contains("invalid wildcard host"), "{}", err.message);
}

#[test]
fn all_slash_element_prefixes_match_like_root_and_never_panic() {
    check(
        ingress(&[("//", PathKind::ElementPrefix)], "", false),
        &[case("h", "*", None), case("h", "/x", Some(0)), case("h", "", None)],
    );
}

#[test]
fn matched_len_is_what_strip_path_removes() {
    let router = Router::new(vec![kong(&[], &["/api"]), kong(&[], &[r"~/u/\d+"])]).unwrap();
    let h = HeaderMap::new();
    let find =
        |path| router.find(&RouteInput { host: "x", port: None, path, method: &Method::GET, headers: &h }).unwrap();
    assert_eq!(find("/api/users").matched_len, 4);
    let m = find("/u/42/x");
    assert_eq!(m.matched_len, 5);
    assert!(router.regex(&m).is_some_and(|re| re.is_match("/u/42")));
    assert!(router.regex(&find("/api/users")).is_none());
}

#[test]
fn describe_lists_entries_in_precedence_order() {
    let router = Router::new(vec![kong(&[], &["/"]), kong(&["a.com"], &["/x"]), kong(&[], &["/long/path"])]).unwrap();
    let order: Vec<usize> = router.describe().iter().map(|d| d.route).collect();
    assert_eq!(order, vec![1, 2, 0]);
}

#[test]
fn many_routes_use_the_host_index() {
    let routes: Vec<RouteSpec> =
        (0..2000).map(|i| kong(&[&format!("svc{i}.example.com")], &[&format!("/api/{i}"), "/health"])).collect();
    check(
        routes,
        &[
            case("svc1999.example.com", "/api/1999/x", Some(1999)),
            case("svc7.example.com", "/health", Some(7)),
            case("svc7.example.com", "/api/8", None),
        ],
    );
}

#[test]
fn split_host_separates_host_and_port() {
    use std::borrow::Cow;
    let cases: &[(&str, &str, Option<u16>)] = &[
        ("a.com", "a.com", None),
        ("a.com:8080", "a.com", Some(8080)),
        ("A.Com:8080", "a.com", Some(8080)),
        ("a.com.", "a.com", None),
        ("a.com.:443", "a.com", Some(443)),
        ("a.com:", "a.com", None),
        ("a.com:http", "a.com", None),
        ("a.com:99999", "a.com", None),
        ("[::1]", "[::1]", None),
        ("[::1]:8443", "[::1]", Some(8443)),
        ("[FE80::1]", "[fe80::1]", None),
        ("127.0.0.1:36647", "127.0.0.1", Some(36647)),
        ("", "", None),
    ];
    for &(raw, host, port) in cases {
        let (h, p) = split_host(raw);
        assert_eq!((&*h, p), (host, port), "{raw:?}");
        assert_eq!(matches!(h, Cow::Borrowed(_)), raw == raw.to_ascii_lowercase(), "{raw:?} allocated needlessly");
    }
}
