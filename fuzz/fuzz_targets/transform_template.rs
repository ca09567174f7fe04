//! Arbitrary transform templates (`$(headers.x)`, `$(query_params.x)`, `$(uri_captures.x)`)
//! parsed, then rendered against arbitrary headers and query: errors, never a panic.
//!
//! Input: `template \n header-value \n query`.
#![no_main]

use gateway_plugins::transform::{Lookup, Template};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let template = lines.next().unwrap_or("");
    let value = lines.next().unwrap_or("");
    let query = lines.next();
    let Ok(t) = Template::parse(template) else { return };
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(value) {
        for name in ["x", "host", "x-a", "authorization"] {
            headers.insert(name, v.clone());
        }
    }
    let re = gateway_core::regex::Regex::new(r"^/(?<id>[^/]*)/?(.*)$").unwrap();
    let path = format!("/{value}");
    let lookup = Lookup { headers: &headers, query, captures: re.captures(&path) };
    let _ = t.render(&lookup);
    let _ = t.render_path(&lookup);
    let _ = t.reads_headers();
});
