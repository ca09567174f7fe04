//! Request path normalisation, applied once before routing; the upstream receives the same
//! path the router saw, so a route (and the plugins on it) cannot be bypassed by spelling a
//! path differently.
//!
//! Applied (RFC 3986 6.2.2): percent-escapes of unreserved characters are decoded (`%61` is
//! `a`), the remaining escapes get upper-case hex digits, and dot segments are removed
//! (`/a/./b/../c` is `/a/c`), and repeated slashes are merged (`//admin` is `/admin`, as
//! nginx's `merge_slashes on`). Escaped reserved characters stay escaped (`%2F` is not a
//! slash). Paths stay case-sensitive, as in Kong and nginx: `/ADMIN` is not `/admin`.

use std::borrow::Cow;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises a path; borrows when there is nothing to change (the common case).
pub fn normalize(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let has_escape = bytes.contains(&b'%');
    if !has_escape && !needs_segment_pass(path) {
        return Cow::Borrowed(path);
    }
    let decoded: Cow<'_, str> = if has_escape {
        let mut out = String::with_capacity(path.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
            {
                let v = h * 16 + l;
                if unreserved(v) {
                    out.push(v as char);
                } else {
                    out.push('%');
                    out.push(bytes[i + 1].to_ascii_uppercase() as char);
                    out.push(bytes[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
            // `path` is a str and every byte pushed here is copied whole, char by char.
            let ch_len = utf8_len(bytes[i]);
            out.push_str(&path[i..i + ch_len]);
            i += ch_len;
        }
        Cow::Owned(out)
    } else {
        Cow::Borrowed(path)
    };
    if !needs_segment_pass(&decoded) {
        return Cow::Owned(decoded.into_owned());
    }
    Cow::Owned(remove_dot_segments(&decoded))
}

/// Whether a path has dot segments or repeated slashes.
///
/// One pass over the bytes: `str::contains("//")` sets up a substring searcher, which on
/// the short paths of most requests costs more than the search.
fn needs_segment_pass(path: &str) -> bool {
    let b = path.as_bytes();
    let mut start = 0;
    for i in 0..=b.len() {
        if i < b.len() && b[i] != b'/' {
            continue;
        }
        if matches!(&b[start..i], b"." | b"..") || (i < b.len() && i > 0 && b[i - 1] == b'/') {
            return true;
        }
        start = i + 1;
    }
    false
}

/// Whether a request path is refused (400) rather than routed, given the path as sent and as
/// [`normalize`]d. Refused are paths an upstream could read as another path than the router
/// did:
/// - a `%` not followed by two hex digits (as nginx refuses them): with it, `%%32e` would
///   normalise to `%2e`, which a decoding upstream reads as `.`;
/// - a dot segment behind an escaped slash or a backslash (`/public/..%2Fadmin`): an
///   upstream that decodes `%2F` or splits on `\` would climb out of the route;
/// - a dot segment with a parameter (`/public/..;/admin`), which Tomcat reads as `..`.
///
/// Escaped slashes without dot segments (`/repos/group%2Fproject`) pass. One scan of the
/// path in the common case, where it has no `%`, `\` or `;`.
pub fn refused(original: &str, normalized: &str) -> bool {
    let b = original.as_bytes();
    if !b.iter().any(|&c| matches!(c, b'%' | b'\\' | b';')) {
        return false;
    }
    let mut i = 0;
    while let Some(p) = b[i..].iter().position(|&c| c == b'%') {
        let at = i + p;
        if at + 2 >= b.len() || hex(b[at + 1]).is_none() || hex(b[at + 2]).is_none() {
            return true;
        }
        i = at + 3;
    }
    normalized.split('/').flat_map(|s| s.split("%2F")).flat_map(|s| s.split("%5C")).flat_map(|s| s.split('\\')).any(
        |s| {
            let s = s.split(';').next().unwrap_or(s);
            s == "." || s == ".."
        },
    )
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// RFC 3986 5.2.4 for an absolute path, merging empty segments (repeated slashes) too.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | "" => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(path.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if trailing_slash || result.is_empty() {
        result.push('/');
    }
    result
}

/// Removes leading `./` and `../` from what is left of a path after `strip_path`, so the
/// remainder cannot climb out of the service path (`/foo../admin` with route `/foo`).
pub(crate) fn sanitize_postfix(mut postfix: &str) -> &str {
    loop {
        if let Some(rest) = postfix.strip_prefix("../").or_else(|| postfix.strip_prefix("./")) {
            postfix = rest;
        } else if postfix == ".." || postfix == "." {
            return "";
        } else {
            return postfix;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_rfc_3986() {
        let cases = [
            ("/plain/path", "/plain/path"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/a/./b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../etc", "/etc"),
            ("/%61dmin", "/admin"),
            ("/admin%2f", "/admin%2F"),
            ("/a%2Fb", "/a%2Fb"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/%7euser", "/~user"),
            ("//admin", "/admin"),
            ("/a//b///c/", "/a/b/c/"),
            ("//", "/"),
            ("/", "/"),
            ("/x/", "/x/"),
            ("/a/%2F/b", "/a/%2F/b"),
            ("/bad%zz", "/bad%zz"),
            ("/trailing%", "/trailing%"),
            ("/ünïcode/./x", "/ünïcode/x"),
            ("/a..b/c", "/a..b/c"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), want, "{input}");
        }
        assert!(matches!(normalize("/nothing/to/do"), Cow::Borrowed(_)));
    }

    #[test]
    fn paths_an_upstream_could_read_differently_are_refused() {
        let is_refused = |p: &str| refused(p, &normalize(p));
        for bad in [
            "/public/..%2Fadmin",
            "/public/..%2fadmin",
            "/public%2F..%2Fadmin",
            "/a/.%2Fb",
            "/a%5C..%5Cb",
            "/x/..%5C",
            "/public/%%32e%%32e/admin",
            "/public/..%%32fadmin",
            "/bad%zz",
            "/trailing%",
            "/trailing%4",
            "/public/..;/admin",
            "/public/.;x/admin",
        ] {
            assert!(is_refused(bad), "{bad}");
        }
        for fine in
            ["/repos/group%2Fproject", "/a..%2Fb", "/plain/path", "/%2F", "/a/.b%2F", "/a;b/c", "/..a;/b", "/%7e"]
        {
            assert!(!is_refused(fine), "{fine}");
        }
        // What is not refused normalises to itself: normalising twice changes nothing.
        for p in ["/a/./b", "//x//y", "/%61%2f", "/%2e%2e/x", "/caf%c3%a9", "/a;b"] {
            let once = normalize(p).into_owned();
            assert_eq!(normalize(&once), once, "{p}");
        }
    }

    /// Against its definition, over every path of up to six characters from `/`, `.`, `a`.
    #[test]
    fn segment_pass_is_needed_exactly_for_dot_segments_and_repeated_slashes() {
        let definition = |p: &str| p.contains("//") || p.split('/').any(|s| s == "." || s == "..");
        let mut paths = vec![String::new()];
        for _ in 0..6 {
            let longer: Vec<String> = paths.iter().flat_map(|p| ['/', '.', 'a'].map(|c| format!("{p}{c}"))).collect();
            paths.extend(longer);
        }
        paths.sort();
        paths.dedup();
        assert!(paths.len() > 1000);
        for p in &paths {
            assert_eq!(needs_segment_pass(p), definition(p), "{p:?}");
        }
    }

    #[test]
    fn postfix_cannot_climb() {
        assert_eq!(sanitize_postfix("../admin"), "admin");
        assert_eq!(sanitize_postfix("./../x"), "x");
        assert_eq!(sanitize_postfix(".."), "");
        assert_eq!(sanitize_postfix("/ok"), "/ok");
        assert_eq!(sanitize_postfix("..hidden"), "..hidden");
    }
}
