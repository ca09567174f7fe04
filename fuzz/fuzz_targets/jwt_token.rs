//! Arbitrary bytes as a JWT (in `Authorization: Bearer`, the `jwt` query parameter and a
//! cookie) through the jwt plugin's extraction and verification: every answer is 401 (no
//! input can forge a signature), never a panic, never the upstream.
#![no_main]

use std::sync::OnceLock;

use http::{Request, StatusCode};
use tower::ServiceExt;

const CONFIG: &str = r#"_format_version: "3.0"
consumers:
- username: alice
  jwt_secrets:
  - {key: hs-iss, secret: alice-secret}
  - {key: hs512-iss, algorithm: HS512, secret: alice-secret-512}
- username: bob
  jwt_secrets:
  - key: ec-iss
    algorithm: ES256
    rsa_public_key: |
      -----BEGIN PUBLIC KEY-----
      MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAELe7fLAcjFyuj05OPSW3OJG25jWyz
      vUGcIAN3a2u+Uy16TJP9Gsx/d5Wlzm75iobB+/5BntogbeuBxusFlH1+VA==
      -----END PUBLIC KEY-----
services:
- name: s
  url: http://127.0.0.1:9
  routes: [{name: r, paths: ["/"]}]
  plugins:
  - {name: jwt, config: {cookie_names: [session], claims_to_verify: [exp, nbf], maximum_expiration: 3600}}
"#;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fn gateway() -> &'static gateway_core::Gateway {
    static GW: OnceLock<gateway_core::Gateway> = OnceLock::new();
    GW.get_or_init(|| {
        let config = gateway_core::config::Config::from_yaml(CONFIG).unwrap();
        gateway_core::Gateway::builder().plugins(gateway_plugins::registry()).build(&config).unwrap()
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(token) = http::HeaderValue::from_bytes(data) else { return };
    let query: String = url_safe(data);
    let requests = [
        Request::get("/")
            .header("authorization", [b"Bearer ".as_slice(), token.as_bytes()].concat())
            .body(String::new()),
        Request::get(format!("/?jwt={query}")).body(String::new()),
        Request::get("/").header("cookie", [b"session=".as_slice(), token.as_bytes()].concat()).body(String::new()),
    ];
    for req in requests.into_iter().flatten() {
        let resp = runtime().block_on(gateway().service().oneshot(req)).unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "a token got past the jwt plugin: {data:?}");
    }
});

/// The bytes kept as they are where a query string allows, percent-encoded elsewhere.
fn url_safe(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len());
    for &b in data {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}
