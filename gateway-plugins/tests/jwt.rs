//! jwt through the real proxy: every status, message and header a client or upstream sees.

#[path = "../../gateway-core/tests/common/mod.rs"]
mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::{Value, json};

// Fixed test keys (made once with `openssl genpkey`; they protect nothing).
const RSA_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQC7XOB+XonTFUGT\n\
IN8act153sjIm99nbL3D6UFXi5MAjy1FaDwCZzMlTRmnuJLynMsMibU8H6VSX1bK\n\
64nBcAC17Kzc5T5J5eXcZiJPXBThINl5g1JyAV/J9RBgaQbpBdYmxK6/VgoXgh9Z\n\
zhRLmm8GlM5CCUzKiJ8K0AOXcgIyigsS7CB13MHmOj8FJ+UspfhM6oH1kC7JqKm7\n\
mFUDWdhPanD1wJ8Ov74pQmF2/rO2FWH7vWAKsytT5GlQnYDP0XGOKEd9rk41aAwg\n\
b9zT0cG/rQuarLRe/KpokgicXGG2JhbRujxRf4FyBxK3zWx89iAFJ5/z3Pyf8wwL\n\
EqqnY6GJAgMBAAECggEACc5UmYiNIhUMt4yS4Kl+WfCFBarSyHDyhZxhpRlS+kaE\n\
EgvgiCeqj5s3aoXIexYlsmRKrfjiCCuhOUGWlh8silj2uyDsX6W+oAhgZ1LkbNvx\n\
ReDPodPclY9T6hfVGsEJckH8+1qfcJeI2IRmn4ZXpTqIiQA/mqIH4OL+LSD0aHym\n\
CuchybFGM+/sZtVmWxhnDHh/GHQ550IhfnE/DM9yqzwMwRUpJxdBip/rUkeayN+W\n\
FYEvCHLYI11gp7GWiQujsYxySfK1b6cAt/ShQuArAeEsGo1lwGD9LjBxxO5dFu9x\n\
XWkVruM3YJg8fQQD6DHixQhgMrLs/Yny0xV9imWCYQKBgQDxgHOdAgEVaxkOKS/a\n\
iKYp5x3mkSFkENojrvLmdhRivpfJ3Yzvx4RBvqKuLDE5M0EMCHQvOlfo2k9+2ClQ\n\
aROxIqkBRG0gXRv6pLNzj5Fw7qXgq7Uq1nTJ+kxr/5DGnEtizoiKqn1hyluSDoZR\n\
uFsLT85pq5Gk0V/+LCKvOicNvQKBgQDGnGJeq5sySWm2GhSc465xVijjkZAzsq8e\n\
3DokzsOh2Spsy1VnAyJcezuxVjo3wE0shVPl6D+//xD1b8cqrocQMPjxQkki69Gj\n\
ZiPqH98mHxVZhtAbY06W5sMAq7ZoZrBv4ZMWHSn1kxlvQJnhlNq/Z/DHl59n5L7p\n\
q5CNH6/BvQKBgFG6meXBvuIju3f6YlJ/ulQl/g2Agh9eQKSg2V07Cs0cGTxcuQyQ\n\
peamAGIXXJUyDkpnNgKhqQyJjSutNdYbqWliBHYEVTYFrKlXQc/S/3KLoSF2mroj\n\
l6SfC2vlMna0gCKxKK5c4k/M7s5wEe7oCA+882r5gDGaFfVrtFU+xea1AoGAIbuP\n\
7Zph6qGTZc16MMdu6msC2NvxTQaNPcWTzoqbqZKT5RSH9c4PePupQM5vZuavdN9U\n\
R5kxsq9ktvr8LeCkqfhXX8qtV1QMMB95/BrbsMLYwnLmR7CPOYwKFMQVYBgI4YfD\n\
jp73cHFCgaXMPQcmPBowSAYVmfS9BD0SeRWnqVUCgYAqt+DS3ea0CScPUnsry/zl\n\
5j0TNC2gtuY900toEDCGAa99L+zhiKrsTq8ZjC9yBZmFtis1gipe5U37X5ZhS6ge\n\
G5BKWG8A/yXBbROk/0aHEBBSXwMvT7bbaO77rnYADnYc+H447cFCQp3wzuaS+sVz\n\
M8EGn8Muk9ku1vTEaZLWrg==\n\
-----END PRIVATE KEY-----\n";

const RSA_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1zgfl6J0xVBkyDfGnLd\n\
ed7IyJvfZ2y9w+lBV4uTAI8tRWg8AmczJU0Zp7iS8pzLDIm1PB+lUl9WyuuJwXAA\n\
teys3OU+SeXl3GYiT1wU4SDZeYNScgFfyfUQYGkG6QXWJsSuv1YKF4IfWc4US5pv\n\
BpTOQglMyoifCtADl3ICMooLEuwgddzB5jo/BSflLKX4TOqB9ZAuyaipu5hVA1nY\n\
T2pw9cCfDr++KUJhdv6zthVh+71gCrMrU+RpUJ2Az9FxjihHfa5ONWgMIG/c09HB\n\
v60Lmqy0XvyqaJIInFxhtiYW0bo8UX+BcgcSt81sfPYgBSef89z8n/MMCxKqp2Oh\n\
iQIDAQAB\n\
-----END PUBLIC KEY-----\n";

const EC_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgxpNlZA3UMreICuuc\n\
LgckGPZYX2a9J47K3cdPRlP9nJChRANCAAQt7t8sByMXK6PTk49Jbc4kbbmNbLO9\n\
QZwgA3dra75TLXpMk/0azH93laXObvmKhsH7/kGe2iBt64HG6wWUfX5U\n\
-----END PRIVATE KEY-----\n";

const EC_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAELe7fLAcjFyuj05OPSW3OJG25jWyz\n\
vUGcIAN3a2u+Uy16TJP9Gsx/d5Wlzm75iobB+/5BntogbeuBxusFlH1+VA==\n\
-----END PUBLIC KEY-----\n";

const ED_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MC4CAQAwBQYDK2VwBCIEIJj5zUMxGx/tULdHnQq/qgQMSxRGL6+4cPSoySGJ539C\n\
-----END PRIVATE KEY-----\n";

const ED_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MCowBQYDK2VwAyEAzELn4f37LFbUrvOOL2W1WCOg99nTDpgTMgbaDB2zPA8=\n\
-----END PUBLIC KEY-----\n";

const EC384_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE9rcpEynnWxwgWiXXwyYkQSxgZgiyu7i6\n\
+wCveTSXf5OKXjATY97AkjUq0HQqVrdzGEee/TjV0gHYySfxr1+R71YgHc2KoYPd\n\
/7s5/SOBb2HL0qT1K2PiSCqodhTlerrW\n\
-----END PUBLIC KEY-----\n";

const ALICE_SECRET: &str = "alice-shared-secret";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The consumers every test uses: alice (HMAC), bob (asymmetric keys), guest (no credential).
fn consumers() -> Value {
    json!([
        {
            "username": "alice",
            "custom_id": "cust-1",
            "jwt_secrets": [
                {"key": "alice-iss", "secret": ALICE_SECRET, "id": "cred-alice"},
                {"key": "alice-512", "algorithm": "HS512", "secret": ALICE_SECRET, "tags": ["t"], "created_at": 1},
            ],
        },
        {
            "username": "bob",
            "jwt_secrets": [
                {"key": "bob-rsa", "algorithm": "RS256", "rsa_public_key": RSA_PUBLIC},
                {"key": "bob-pss", "algorithm": "PS384", "rsa_public_key": RSA_PUBLIC},
                {"key": "bob-ec", "algorithm": "ES256", "rsa_public_key": EC_PUBLIC},
                {"key": "bob-ed", "algorithm": "EdDSA", "rsa_public_key": ED_PUBLIC},
            ],
        },
        {"username": "guest"},
    ])
}

/// A gateway with one route `/` behind the jwt plugin (JSON is YAML too).
fn gateway(upstream: std::net::SocketAddr, consumers: Value, plugin_config: Value) -> Gateway {
    let config = json!({
        "_format_version": "3.0",
        "consumers": consumers,
        "services": [{
            "name": "s",
            "url": format!("http://{upstream}"),
            "routes": [{"name": "r", "paths": ["/"]}],
            "plugins": [{"name": "jwt", "config": plugin_config}],
        }],
    });
    Gateway::builder()
        .plugins(gateway_plugins::registry())
        .build(&Config::from_yaml(&config.to_string()).unwrap())
        .unwrap()
}

async fn start(upstream: std::net::SocketAddr, plugin_config: Value) -> RunningGateway {
    start_running(gateway(upstream, consumers(), plugin_config), ServerSettings::default()).await
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    sign(alg, &EncodingKey::from_secret(secret), claims)
}

fn alice(claims: &Value) -> String {
    hs(Algorithm::HS256, ALICE_SECRET.as_bytes(), claims)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn bearer(gw: &RunningGateway, path: &str, token: &str) -> Request<TestBody> {
    Request::get(gw.url(path)).header("authorization", format!("Bearer {token}")).body(full("")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_in_header_query_or_cookie_identifies_the_consumer() {
    let up = echo_upstream().await;
    let gw = start(up.addr, json!({"cookie_names": ["session"]})).await;
    let token = alice(&json!({"iss": "alice-iss", "sub": "x"}));

    let resp = send(
        Request::get(gw.url("/items"))
            .header("authorization", format!("Bearer {token}"))
            .header("x-consumer-username", "mallory")
            .header("x-consumer-id", "forged")
            .header("x-credential-identifier", "forged")
            .header("x-anonymous-consumer", "true")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp.body));
    let echo = resp.echo();
    assert_eq!(echo.headers["x-consumer-username"], vec!["alice"]);
    assert_eq!(echo.headers["x-consumer-id"], vec!["alice"]);
    assert_eq!(echo.header("x-consumer-custom-id"), Some("cust-1"));
    assert_eq!(echo.headers["x-credential-identifier"], vec!["cred-alice"]);
    assert_eq!(echo.header("x-anonymous-consumer"), None);
    assert_eq!(echo.header("authorization"), Some(format!("Bearer {token}").as_str()), "the token is passed on");

    // The scheme is case-insensitive; a credential without `id` is identified by its key.
    let t512 = hs(Algorithm::HS512, ALICE_SECRET.as_bytes(), &json!({"iss": "alice-512"}));
    let resp =
        send(Request::get(gw.url("/")).header("authorization", format!("bearer  {t512}")).body(full("")).unwrap())
            .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.echo().header("x-credential-identifier"), Some("alice-512"));

    let echo = get(&gw.url(&format!("/items?page=2&jwt={token}"))).await.echo();
    assert_eq!(echo.header("x-consumer-username"), Some("alice"));
    assert_eq!(echo.uri, format!("/items?page=2&jwt={token}"));

    let resp = send(
        Request::get(gw.url("/"))
            .header("cookie", format!("theme=dark; session={token}"))
            .header("x-consumer-username", "mallory")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.echo().headers["x-consumer-username"], vec!["alice"]);

    // The same token in several places is one token.
    let resp = send(
        Request::get(gw.url(&format!("/?jwt={token}")))
            .header("authorization", format!("Bearer {token}"))
            .header("cookie", format!("session={token}"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_kongs_401s() {
    let up = echo_upstream().await;
    let gw = start(up.addr, json!({"cookie_names": ["session"]})).await;
    let good = alice(&json!({"iss": "alice-iss"}));
    let other = alice(&json!({"iss": "alice-iss", "n": 2}));
    let wrong_secret = hs(Algorithm::HS256, b"not-alice-secret", &json!({"iss": "alice-iss"}));
    let (head, _, sig) = {
        let mut parts = good.split('.');
        (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
    };
    let tampered = format!("{head}.{}.{sig}", b64(&json!({"iss": "alice-iss", "admin": true})));
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&json!({"iss": "alice-iss"})));
    let none_signed = format!("{}.{}.{sig}", b64(&json!({"alg": "none"})), b64(&json!({"iss": "alice-iss"})));
    // Key confusion: an HS256 token whose HMAC secret is the RS256 credential's public key.
    let confused = hs(Algorithm::HS256, RSA_PUBLIC.as_bytes(), &json!({"iss": "bob-rsa"}));
    let hs512_for_hs256 = hs(Algorithm::HS512, ALICE_SECRET.as_bytes(), &json!({"iss": "alice-iss"}));
    let rs256_for_hs256 = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        &json!({"iss": "alice-iss"}),
    );
    let no_iss = alice(&json!({"sub": "alice"}));
    let empty_iss = alice(&json!({"iss": ""}));
    let number_iss = alice(&json!({"iss": 7}));
    let unknown_iss = alice(&json!({"iss": "nobody"}));
    let not_json = format!("{}.{}.{sig}", URL_SAFE_NO_PAD.encode("{nope"), b64(&json!({"iss": "alice-iss"})));
    let claims_not_object = format!("{head}.{}.{sig}", b64(&json!(["iss"])));
    // Validly signed, but past the 8 KiB cap (a padding claim of 7 KiB is base64'd to 9.3).
    let oversized = alice(&json!({"iss": "alice-iss", "pad": "p".repeat(7 * 1024)}));
    assert!(oversized.len() > gateway_plugins::jwt::MAX_TOKEN_BYTES);

    let cases: Vec<(Request<TestBody>, &str)> = vec![
        (Request::get(gw.url("/")).body(full("")).unwrap(), "Unauthorized"),
        (Request::get(gw.url("/")).header("authorization", "Basic YTpi").body(full("")).unwrap(), "Unauthorized"),
        (Request::get(gw.url("/")).header("authorization", "Bearer").body(full("")).unwrap(), "Unauthorized"),
        (Request::get(gw.url("/?jwt=")).body(full("")).unwrap(), "Unauthorized"),
        // Spoofed identity headers without a token get nowhere.
        (Request::get(gw.url("/")).header("x-consumer-username", "alice").body(full("")).unwrap(), "Unauthorized"),
        (bearer(&gw, "/", "abc"), "Bad token; invalid JSON"),
        (bearer(&gw, "/", "a.b"), "Bad token; invalid JSON"),
        (bearer(&gw, "/", &format!("{good}.x")), "Bad token; invalid JSON"),
        (bearer(&gw, "/", &format!("{good}!")), "Bad token; invalid JSON"),
        (bearer(&gw, "/", &not_json), "Bad token; invalid JSON"),
        (bearer(&gw, "/", &claims_not_object), "Bad token; invalid claims"),
        (bearer(&gw, "/", &none), "Bad token; invalid alg"),
        (bearer(&gw, "/", &none_signed), "Bad token; invalid alg"),
        (bearer(&gw, "/", &wrong_secret), "Invalid signature"),
        (bearer(&gw, "/", &tampered), "Invalid signature"),
        (bearer(&gw, "/", &confused), "Invalid algorithm"),
        (bearer(&gw, "/", &hs512_for_hs256), "Invalid algorithm"),
        (bearer(&gw, "/", &rs256_for_hs256), "Invalid algorithm"),
        (bearer(&gw, "/", &no_iss), "No mandatory 'iss' in claims"),
        (bearer(&gw, "/", &empty_iss), "Invalid 'iss' in claims"),
        (bearer(&gw, "/", &number_iss), "Invalid 'iss' in claims"),
        (bearer(&gw, "/", &unknown_iss), "No credentials found for given 'iss'"),
        (bearer(&gw, "/", &oversized), "Bad token; too large"),
        (Request::get(gw.url(&format!("/?jwt={oversized}"))).body(full("")).unwrap(), "Bad token; too large"),
        (
            Request::get(gw.url(&format!("/?jwt={good}")))
                .header("authorization", format!("Bearer {other}"))
                .body(full(""))
                .unwrap(),
            "Multiple tokens provided",
        ),
        (
            Request::get(gw.url(&format!("/?jwt={good}&jwt={other}"))).body(full("")).unwrap(),
            "Multiple tokens provided",
        ),
        (
            Request::get(gw.url("/"))
                .header("cookie", format!("session={good}"))
                .header("authorization", format!("Bearer {other}"))
                .body(full(""))
                .unwrap(),
            "Multiple tokens provided",
        ),
    ];
    for (request, message) in cases {
        let uri = request.uri().clone();
        let resp = send(request).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{message} ({uri})");
        let body = resp.json();
        assert_eq!(body["message"], message, "{uri}");
        assert_eq!(resp.headers["www-authenticate"], "Bearer");
        assert_eq!(body["request_id"], resp.headers["x-request-id"].to_str().unwrap());
    }
    // Just under the cap is read and accepted; past the server's 32 KiB head limit the
    // request never reaches the plugin (431).
    let big_but_fine = alice(&json!({"iss": "alice-iss", "pad": "p".repeat(5 * 1024)}));
    assert!(big_but_fine.len() < gateway_plugins::jwt::MAX_TOKEN_BYTES);
    assert_eq!(send(bearer(&gw, "/", &big_but_fine)).await.status, StatusCode::OK);
    let huge = alice(&json!({"iss": "alice-iss", "pad": "p".repeat(40 * 1024)}));
    assert_eq!(send(bearer(&gw, "/", &huge)).await.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_checked_only_when_listed_and_answer_kongs_objects() {
    let up = echo_upstream().await;
    let gw = start(up.addr, json!({"claims_to_verify": ["exp", "nbf"]})).await;
    let t = now();
    let cases = [
        (json!({"iss": "alice-iss", "exp": t - 10, "nbf": t - 20}), json!({"exp": "token expired"})),
        (json!({"iss": "alice-iss", "exp": t + 600, "nbf": t + 300}), json!({"nbf": "token not valid yet"})),
        (json!({"iss": "alice-iss", "nbf": t - 20}), json!({"exp": "must be a number"})),
        (json!({"iss": "alice-iss", "exp": "tomorrow", "nbf": t}), json!({"exp": "must be a number"})),
        (json!({"iss": "alice-iss", "exp": t - 1}), json!({"exp": "token expired", "nbf": "must be a number"})),
    ];
    for (claims, expected) in cases {
        let resp = send(bearer(&gw, "/", &alice(&claims))).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{claims}");
        assert_eq!(resp.json(), expected, "{claims}");
        assert_eq!(resp.headers["www-authenticate"], "Bearer");
        assert!(resp.headers["content-type"].to_str().unwrap().starts_with("application/json"));
        assert!(resp.headers.contains_key("x-request-id"));
    }
    // The signature is checked before the claims.
    let expired_forged = hs(Algorithm::HS256, b"other", &json!({"iss": "alice-iss", "exp": t - 10}));
    assert_eq!(send(bearer(&gw, "/", &expired_forged)).await.json()["message"], "Invalid signature");
    let fine = alice(&json!({"iss": "alice-iss", "exp": t + 600, "nbf": t - 1}));
    assert_eq!(send(bearer(&gw, "/", &fine)).await.status, StatusCode::OK);
    gw.shutdown().await;

    // Unlisted claims are not checked (Kong).
    let gw = start(up.addr, json!({})).await;
    let expired = alice(&json!({"iss": "alice-iss", "exp": t - 10, "nbf": t + 600}));
    assert_eq!(send(bearer(&gw, "/", &expired)).await.status, StatusCode::OK);
    gw.shutdown().await;

    let gw = start(up.addr, json!({"claims_to_verify": ["exp"], "maximum_expiration": 60})).await;
    let too_long = alice(&json!({"iss": "alice-iss", "exp": t + 3600}));
    let resp = send(bearer(&gw, "/", &too_long)).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json(), json!({"exp": "exceeds maximum allowed expiration"}));
    let short = alice(&json!({"iss": "alice-iss", "exp": t + 30}));
    assert_eq!(send(bearer(&gw, "/", &short)).await.status, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_pss_ecdsa_and_eddsa_tokens_verify_with_pem_public_keys() {
    let up = echo_upstream().await;
    let gw = start(up.addr, json!({})).await;
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let ec = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    let ed = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
    let cases = [
        (Algorithm::RS256, &rsa, "bob-rsa"),
        (Algorithm::PS384, &rsa, "bob-pss"),
        (Algorithm::ES256, &ec, "bob-ec"),
        (Algorithm::EdDSA, &ed, "bob-ed"),
    ];
    for (alg, key, iss) in cases {
        let token = sign(alg, key, &json!({"iss": iss, "exp": now() + 60}));
        let resp = send(bearer(&gw, "/", &token)).await;
        assert_eq!(resp.status, StatusCode::OK, "{alg:?}: {}", String::from_utf8_lossy(&resp.body));
        let echo = resp.echo();
        assert_eq!(echo.header("x-consumer-username"), Some("bob"), "{alg:?}");
        assert_eq!(echo.header("x-credential-identifier"), Some(iss), "{alg:?}");

        // Tampered claims under a genuine signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = b64(&json!({"iss": iss, "exp": now() + 600}));
        parts[1] = &forged;
        let resp = send(bearer(&gw, "/", &parts.join("."))).await;
        assert_eq!(resp.json()["message"], "Invalid signature", "{alg:?}");
    }
    // A credential pins its algorithm within a family too: RS256 key, RS512 or PS256 token.
    for alg in [Algorithm::RS512, Algorithm::PS256] {
        let token = sign(alg, &rsa, &json!({"iss": "bob-rsa"}));
        assert_eq!(send(bearer(&gw, "/", &token)).await.json()["message"], "Invalid algorithm", "{alg:?}");
    }
    // An ES256 token for the EdDSA credential.
    let token = sign(Algorithm::ES256, &ec, &json!({"iss": "bob-ed"}));
    assert_eq!(send(bearer(&gw, "/", &token)).await.json()["message"], "Invalid algorithm");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_realm_preflight_and_custom_sources() {
    let up = echo_upstream().await;
    let gw = start(up.addr, json!({"anonymous": "guest", "run_on_preflight": false, "realm": "api"})).await;
    let echo =
        send(Request::get(gw.url("/")).header("x-consumer-username", "alice").body(full("")).unwrap()).await.echo();
    assert_eq!(echo.headers["x-consumer-username"], vec!["guest"]);
    assert_eq!(echo.header("x-anonymous-consumer"), Some("true"));
    assert_eq!(echo.header("x-credential-identifier"), None);
    // Kong's rule: with `anonymous`, a token that fails proceeds as the anonymous consumer.
    let echo = send(bearer(&gw, "/", &alice(&json!({"iss": "nobody"})))).await.echo();
    assert_eq!(echo.header("x-consumer-username"), Some("guest"));
    assert_eq!(echo.header("x-anonymous-consumer"), Some("true"));
    let echo = send(bearer(&gw, "/", &alice(&json!({"iss": "alice-iss"})))).await.echo();
    assert_eq!(echo.header("x-consumer-username"), Some("alice"));
    assert_eq!(echo.header("x-anonymous-consumer"), None);
    gw.shutdown().await;

    let gw = start(up.addr, json!({"run_on_preflight": false})).await;
    let resp = send(Request::options(gw.url("/")).body(full("")).unwrap()).await;
    assert_eq!(resp.status, StatusCode::OK, "preflight passes without a token");
    assert_eq!(resp.echo().header("x-consumer-username"), None);
    assert_eq!(send(Request::delete(gw.url("/")).body(full("")).unwrap()).await.status, StatusCode::UNAUTHORIZED);
    gw.shutdown().await;

    // Custom places, and the key read from the token's header when the claims lack it.
    let gw = start(
        up.addr,
        json!({"uri_param_names": ["token"], "header_names": ["x-jwt"], "key_claim_name": "kid", "tags": ["a"]}),
    )
    .await;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("alice-iss".into());
    let by_kid =
        jsonwebtoken::encode(&header, &json!({"sub": "a"}), &EncodingKey::from_secret(ALICE_SECRET.as_bytes()))
            .unwrap();
    let resp =
        send(Request::get(gw.url("/")).header("x-jwt", format!("Bearer {by_kid}")).body(full("")).unwrap()).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(get(&gw.url(&format!("/?token={by_kid}"))).await.echo().header("x-consumer-username"), Some("alice"));
    let resp = send(bearer(&gw, "/", &by_kid)).await;
    assert_eq!(resp.json()["message"], "Unauthorized", "authorization is no longer looked at");
    let resp = get(&gw.url(&format!("/?jwt={by_kid}"))).await;
    assert_eq!(resp.json()["message"], "Unauthorized", "jwt is no longer looked at");
    let no_kid = alice(&json!({"iss": "alice-iss"}));
    let resp =
        send(Request::get(gw.url("/")).header("x-jwt", format!("Bearer {no_kid}")).body(full("")).unwrap()).await;
    assert_eq!(resp.json()["message"], "No mandatory 'kid' in claims");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_secrets() {
    let up = echo_upstream().await;
    let raw: &[u8] = b"\x00\xffbinary secret bytes\xfe";
    let consumers = json!([
        {"username": "std", "jwt_secrets": [{"key": "std", "secret": base64::engine::general_purpose::STANDARD.encode(raw)}]},
        {"username": "url", "jwt_secrets": [{"key": "url", "secret": URL_SAFE_NO_PAD.encode(raw)}]},
    ]);
    let gw =
        start_running(gateway(up.addr, consumers, json!({"secret_is_base64": true})), ServerSettings::default()).await;
    for key in ["std", "url"] {
        let resp = send(bearer(&gw, "/", &hs(Algorithm::HS256, raw, &json!({"iss": key})))).await;
        assert_eq!(resp.status, StatusCode::OK, "{key}");
        assert_eq!(resp.echo().header("x-consumer-username"), Some(key));
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_credentials_and_configs_fail_the_route_when_built() {
    let up = echo_upstream().await;
    let hs = |extra: Value| {
        let mut c = json!({"key": "k", "secret": "s"});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!([{"username": "u", "jwt_secrets": [c]}])
    };
    const TINY_RSA: &str = "-----BEGIN RSA PUBLIC KEY-----\nMAYCAQUCAQE=\n-----END RSA PUBLIC KEY-----\n";
    let broken_pem = RSA_PUBLIC.replace("MIIBIjAN", "MIIBIjAx");
    let bad: Vec<(Value, Value)> = vec![
        (hs(json!({"colour": "red"})), json!({})),
        (hs(json!({"algorithm": "none"})), json!({})),
        (hs(json!({"algorithm": "ES512"})), json!({})),
        (hs(json!({"secret": ""})), json!({})),
        (hs(json!({"secret": "%%%"})), json!({"secret_is_base64": true})),
        (hs(json!({"algorithm": "RS256"})), json!({})),
        (hs(json!({"algorithm": "RS256", "rsa_public_key": "not a pem"})), json!({})),
        (hs(json!({"algorithm": "RS256", "rsa_public_key": broken_pem})), json!({})),
        (hs(json!({"algorithm": "RS256", "rsa_public_key": EC_PUBLIC})), json!({})),
        // Well-formed DER, but an RSA key with public exponent 1.
        (hs(json!({"algorithm": "RS256", "rsa_public_key": TINY_RSA})), json!({})),
        (hs(json!({"algorithm": "ES256", "rsa_public_key": RSA_PUBLIC})), json!({})),
        (hs(json!({"algorithm": "ES256", "rsa_public_key": EC384_PUBLIC})), json!({})),
        (hs(json!({"algorithm": "ES384", "rsa_public_key": EC_PUBLIC})), json!({})),
        (hs(json!({"algorithm": "EdDSA", "rsa_public_key": EC_PUBLIC})), json!({})),
        (
            json!([{"username": "a", "jwt_secrets": [{"key": "k", "secret": "1"}]}, {"username": "b", "jwt_secrets": [{"key": "k", "secret": "2"}]}]),
            json!({}),
        ),
        (hs(json!({})), json!({"colour": "red"})),
        (hs(json!({})), json!({"claims_to_verify": ["iat"]})),
        (hs(json!({})), json!({"maximum_expiration": 60})),
        (hs(json!({})), json!({"claims_to_verify": ["exp"], "maximum_expiration": 31_536_001})),
        (hs(json!({})), json!({"anonymous": "nobody"})),
        (hs(json!({})), json!({"header_names": ["bad header"]})),
        // The gateway sets it for the upstream: never read from a client.
        (hs(json!({})), json!({"header_names": ["X-Consumer-ID"]})),
        (hs(json!({})), json!({"key_claim_name": ""})),
    ];
    for (consumers, config) in bad {
        let gw = start_running(gateway(up.addr, consumers.clone(), config.clone()), ServerSettings::default()).await;
        let resp = send(bearer(&gw, "/", &hs_token("k", "s"))).await;
        assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR, "{consumers} {config}");
        gw.shutdown().await;
    }
    // The same shapes, made right, work: what failed above was the one wrong field.
    let good: Vec<(Value, Value, Option<String>)> = vec![
        (hs(json!({})), json!({"claims_to_verify": ["exp"], "maximum_expiration": 31_536_000}), None),
        (hs(json!({"secret": "cw=="})), json!({"secret_is_base64": true}), Some(hs_token("k", "s"))),
        (hs(json!({"algorithm": "ES384", "rsa_public_key": EC384_PUBLIC})), json!({}), None),
    ];
    for (consumers, config, token) in good {
        let gw = start_running(gateway(up.addr, consumers.clone(), config.clone()), ServerSettings::default()).await;
        let resp = match &token {
            Some(t) => send(bearer(&gw, "/", t)).await,
            None => get(&gw.url("/")).await,
        };
        let expected = if token.is_some() { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
        assert_eq!(resp.status, expected, "{consumers} {config}");
        gw.shutdown().await;
    }
}

fn hs_token(iss: &str, secret: &str) -> String {
    hs(Algorithm::HS256, secret.as_bytes(), &json!({"iss": iss}))
}

// ---- JWK sets (beyond Kong's open source) ----

/// A JWK of a public key, with its `kid` (and `alg` when given), as an identity provider
/// publishes it.
fn jwk(key: &DecodingKey, kid: &str, alg: Option<Algorithm>) -> Value {
    let mut v = serde_json::to_value(Jwk::from_decoding_key(key, alg).unwrap()).unwrap();
    v["kid"] = json!(kid);
    v
}

fn rsa_jwk(kid: &str, alg: Option<Algorithm>) -> Value {
    jwk(&DecodingKey::from_rsa_pem(RSA_PUBLIC.as_bytes()).unwrap(), kid, alg)
}

fn ec_jwk(kid: &str, alg: Option<Algorithm>) -> Value {
    jwk(&DecodingKey::from_ec_pem(EC_PUBLIC.as_bytes()).unwrap(), kid, alg)
}

fn ed_jwk(kid: &str, alg: Option<Algorithm>) -> Value {
    jwk(&DecodingKey::from_ed_pem(ED_PUBLIC.as_bytes()).unwrap(), kid, alg)
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap()
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap()
}

fn ed_key() -> EncodingKey {
    EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap()
}

/// A token whose header names `kid`.
fn with_kid(alg: Algorithm, key: &EncodingKey, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// Asserts a 401 with Kong's `{"message": ...}` body and `WWW-Authenticate`.
async fn refused(gw: &RunningGateway, token: &str, message: &str) {
    let resp = send(bearer(gw, "/", token)).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{message}: {}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.json()["message"], message);
    assert_eq!(resp.headers["www-authenticate"], "Bearer");
}

/// Asserts the token is accepted and returns what the upstream saw.
async fn accepted(gw: &RunningGateway, token: &str) -> Echo {
    let resp = send(bearer(gw, "/", token)).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp.body));
    resp.echo()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_jwks_verifies_tokens_by_kid_with_the_keys_algorithm() {
    let up = echo_upstream().await;
    let mut encryption_key = rsa_jwk("enc-1", None);
    encryption_key["use"] = json!("enc");
    let config = json!({"jwks": {"keys": [
        rsa_jwk("rsa-1", Some(Algorithm::RS256)),
        rsa_jwk("rsa-any", None),
        ec_jwk("ec-1", Some(Algorithm::ES256)),
        ed_jwk("ed-1", None),
        encryption_key,
    ]}});
    let gw = start(up.addr, config).await;
    let (rsa, ec, ed) = (rsa_key(), ec_key(), ed_key());
    let claims = json!({"sub": "someone", "exp": now() + 60});

    let token = with_kid(Algorithm::RS256, &rsa, "rsa-1", &claims);
    let resp = send(
        Request::get(gw.url("/"))
            .header("authorization", format!("Bearer {token}"))
            .header("x-consumer-username", "mallory")
            .header("x-credential-identifier", "forged")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp.body));
    let echo = resp.echo();
    assert_eq!(echo.headers["x-credential-identifier"], vec!["jwks:rsa-1:someone"]);
    assert_eq!(echo.header("x-consumer-username"), None, "no consumer_claim: no consumer");
    assert_eq!(echo.header("x-consumer-id"), None);
    assert_eq!(echo.header("x-anonymous-consumer"), None);

    // Without `alg`, the key's family decides.
    for (alg, key, kid) in [
        (Algorithm::PS256, &rsa, "rsa-any"),
        (Algorithm::RS512, &rsa, "rsa-any"),
        (Algorithm::ES256, &ec, "ec-1"),
        (Algorithm::EdDSA, &ed, "ed-1"),
    ] {
        let echo = accepted(&gw, &with_kid(alg, key, kid, &claims)).await;
        assert_eq!(echo.header("x-credential-identifier"), Some(format!("jwks:{kid}:someone").as_str()), "{alg:?}");
    }

    // The JWK's `alg` pins the algorithm; without one, only the family's are accepted.
    refused(&gw, &with_kid(Algorithm::RS512, &rsa, "rsa-1", &claims), "Invalid algorithm").await;
    refused(&gw, &with_kid(Algorithm::ES256, &ec, "rsa-any", &claims), "Invalid algorithm").await;
    refused(&gw, &with_kid(Algorithm::EdDSA, &ed, "ec-1", &claims), "Invalid algorithm").await;
    // Key confusion: an HMAC token whose secret is the RSA public key.
    let confused = with_kid(Algorithm::HS256, &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()), "rsa-any", &claims);
    refused(&gw, &confused, "Invalid algorithm").await;
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "kid": "rsa-1"})), b64(&claims));
    refused(&gw, &none, "Bad token; invalid alg").await;
    // Tampered claims under a genuine signature; a key of the set signing for another kid.
    let genuine = with_kid(Algorithm::ES256, &ec, "ec-1", &claims);
    let mut parts: Vec<&str> = genuine.split('.').collect();
    let forged = b64(&json!({"sub": "admin", "exp": now() + 60}));
    parts[1] = &forged;
    refused(&gw, &parts.join("."), "Invalid signature").await;

    // An expired `exp` is refused even though `claims_to_verify` is empty.
    let expired = with_kid(Algorithm::ES256, &ec, "ec-1", &json!({"exp": now() - 10}));
    let resp = send(bearer(&gw, "/", &expired)).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json(), json!({"exp": "token expired"}));
    let no_exp = with_kid(Algorithm::ES256, &ec, "ec-1", &json!({"sub": "x"}));
    accepted(&gw, &no_exp).await;

    // A kid the set does not hold (or holds for encryption only), and no jwt_secrets match.
    refused(&gw, &with_kid(Algorithm::ES256, &ec, "nope", &claims), "No credentials found for given 'kid'").await;
    let unknown_with_iss = with_kid(Algorithm::ES256, &ec, "nope", &json!({"iss": "https://idp"}));
    refused(&gw, &unknown_with_iss, "No credentials found for given 'kid'").await;
    refused(&gw, &with_kid(Algorithm::RS256, &rsa, "enc-1", &claims), "No credentials found for given 'kid'").await;

    // jwt_secrets still work, with or without a kid the set does not hold: Kong's path, unchanged.
    let echo = accepted(&gw, &alice(&json!({"iss": "alice-iss"}))).await;
    assert_eq!(echo.header("x-consumer-username"), Some("alice"));
    assert_eq!(echo.header("x-credential-identifier"), Some("cred-alice"));
    let alice_kid = with_kid(
        Algorithm::HS256,
        &EncodingKey::from_secret(ALICE_SECRET.as_bytes()),
        "x",
        &json!({"iss": "alice-iss"}),
    );
    assert_eq!(accepted(&gw, &alice_kid).await.header("x-consumer-username"), Some("alice"));
    refused(&gw, &alice(&json!({"sub": "a"})), "No mandatory 'iss' in claims").await;
    // Kong's exp rule for jwt_secrets is unchanged: not listed, not checked.
    accepted(&gw, &alice(&json!({"iss": "alice-iss", "exp": now() - 10}))).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_tokens_must_match_issuer_audience_and_listed_claims() {
    let up = echo_upstream().await;
    let config = json!({
        "jwks": {"keys": [ec_jwk("ec-1", None)]},
        "issuer": ["https://idp", "https://idp2"],
        "audience": "api",
        "claims_to_verify": ["nbf"],
    });
    let gw = start(up.addr, config).await;
    let ec = ec_key();
    let t = now();
    let token = |claims: Value| with_kid(Algorithm::ES256, &ec, "ec-1", &claims);

    accepted(&gw, &token(json!({"iss": "https://idp", "aud": "api", "nbf": t - 1}))).await;
    accepted(&gw, &token(json!({"iss": "https://idp2", "aud": ["web", "api"], "nbf": t}))).await;
    let cases = [
        (json!({"iss": "https://evil", "aud": "api", "nbf": t}), "Invalid 'iss' in claims"),
        (json!({"iss": ["https://idp"], "aud": "api", "nbf": t}), "Invalid 'iss' in claims"),
        (json!({"aud": "api", "nbf": t}), "No mandatory 'iss' in claims"),
        (json!({"iss": "https://idp", "aud": "web", "nbf": t}), "Invalid 'aud' in claims"),
        (json!({"iss": "https://idp", "aud": ["web", "app"], "nbf": t}), "Invalid 'aud' in claims"),
        (json!({"iss": "https://idp", "aud": 7, "nbf": t}), "Invalid 'aud' in claims"),
        (json!({"iss": "https://idp", "nbf": t}), "No mandatory 'aud' in claims"),
    ];
    for (claims, message) in cases {
        refused(&gw, &token(claims), message).await;
    }
    // The registered claims come first, as in Kong's order.
    let resp = send(bearer(&gw, "/", &token(json!({"iss": "https://evil", "nbf": t + 600})))).await;
    assert_eq!(resp.json(), json!({"nbf": "token not valid yet"}));
    let resp = send(bearer(&gw, "/", &token(json!({"iss": "https://idp", "aud": "api"})))).await;
    assert_eq!(resp.json(), json!({"nbf": "must be a number"}));
    let resp =
        send(bearer(&gw, "/", &token(json!({"iss": "https://idp", "aud": "api", "nbf": t, "exp": t - 5})))).await;
    assert_eq!(resp.json(), json!({"exp": "token expired"}));
    // The signature before any claim: a forged token never learns which claim was wrong.
    let forged = with_kid(Algorithm::ES256, &ec, "ec-1", &json!({"iss": "https://evil"}));
    let mut parts: Vec<&str> = forged.split('.').collect();
    let claims = b64(&json!({"iss": "https://idp", "aud": "api", "nbf": t}));
    parts[1] = &claims;
    refused(&gw, &parts.join("."), "Invalid signature").await;
    // Issuer and audience are for JWK set tokens: jwt_secrets ones are Kong's.
    accepted(&gw, &alice(&json!({"iss": "alice-iss", "nbf": t}))).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_claim_maps_jwks_tokens_to_consumers() {
    let up = echo_upstream().await;
    let issued = json!({"issuer": "https://idp", "audience": "gw"});
    let gw = start(up.addr, json!({"jwks": {"keys": [ec_jwk("ec-1", None)]}, "consumer_claim": "sub", "issuer": issued["issuer"], "audience": issued["audience"]})).await;
    let ec = ec_key();
    // Tokens issued for us: `consumer_claim` needs issuer and audience checks.
    let token = |mut claims: Value| {
        claims["iss"] = json!("https://idp");
        claims["aud"] = json!("gw");
        with_kid(Algorithm::ES256, &ec, "ec-1", &claims)
    };

    for (sub, username) in [("alice", "alice"), ("cust-1", "alice"), ("bob", "bob")] {
        let resp = send(
            Request::get(gw.url("/"))
                .header("authorization", format!("Bearer {}", token(json!({"sub": sub}))))
                .header("x-consumer-username", "mallory")
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status, StatusCode::OK, "{sub}");
        let echo = resp.echo();
        assert_eq!(echo.headers["x-consumer-username"], vec![username], "{sub}");
        assert_eq!(echo.header("x-consumer-id"), Some(username), "{sub}");
        assert_eq!(echo.headers["x-credential-identifier"], vec![format!("jwks:ec-1:{sub}")], "{sub}");
        assert_eq!(echo.header("x-anonymous-consumer"), None);
    }
    assert_eq!(accepted(&gw, &token(json!({"sub": "alice"}))).await.header("x-consumer-custom-id"), Some("cust-1"));

    // No consumer matches (or no such claim): authenticated, without a consumer.
    for claims in [json!({"sub": "stranger"}), json!({"name": "alice"}), json!({"sub": 7})] {
        let resp = send(
            Request::get(gw.url("/"))
                .header("authorization", format!("Bearer {}", token(claims.clone())))
                .header("x-consumer-username", "alice")
                .header("x-consumer-id", "alice")
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status, StatusCode::OK, "{claims}");
        let echo = resp.echo();
        assert_eq!(echo.header("x-consumer-username"), None, "{claims}");
        assert_eq!(echo.header("x-consumer-id"), None, "{claims}");
        let want =
            claims.get("sub").and_then(Value::as_str).map_or("jwks:ec-1".to_string(), |s| format!("jwks:ec-1:{s}"));
        assert_eq!(echo.header("x-credential-identifier"), Some(want.as_str()), "{claims}");
    }
    gw.shutdown().await;

    // With `anonymous`, a verified token without a consumer is still not the anonymous one.
    let config = json!({"jwks": {"keys": [ec_jwk("ec-1", None)]}, "consumer_claim": "sub", "anonymous": "guest", "issuer": "https://idp", "audience": "gw"});
    let gw = start(up.addr, config).await;
    let echo = accepted(&gw, &token(json!({"sub": "stranger"}))).await;
    assert_eq!(echo.header("x-consumer-username"), None);
    assert_eq!(echo.header("x-anonymous-consumer"), None);
    assert_eq!(get(&gw.url("/")).await.echo().header("x-consumer-username"), Some("guest"));
    gw.shutdown().await;
}

/// A response body sent in frames of unknown total length: hyper sends it chunked.
struct Chunked(std::collections::VecDeque<bytes::Bytes>);

impl http_body::Body for Chunked {
    type Data = bytes::Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// What the JWK set server answers, and how often it was asked.
struct JwksServer {
    upstream: Upstream,
    answer: Arc<Mutex<(StatusCode, String)>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(set: &Value) -> Self {
        let answer = Arc::new(Mutex::new((StatusCode::OK, set.to_string())));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (a, f) = (answer.clone(), fetches.clone());
        let upstream = upstream_with(Arc::new(move |req: Request<hyper::body::Incoming>, _, _| {
            let (status, body) = a.lock().unwrap().clone();
            f.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let body = if req.uri().path() == "/chunked" {
                    let (one, two) = body.split_at(body.len() / 2);
                    let frames = [one, two].map(|s| bytes::Bytes::copy_from_slice(s.as_bytes()));
                    Chunked(frames.into_iter().collect()).boxed_unsync()
                } else {
                    full(body)
                };
                http::Response::builder().status(status).header("content-type", "application/json").body(body).unwrap()
            })
        }))
        .await;
        JwksServer { upstream, answer, fetches }
    }

    fn serve(&self, status: StatusCode, body: String) {
        *self.answer.lock().unwrap() = (status, body);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Waits (at most 5 s) until the set was fetched again after now.
    async fn wait_for_fetch(&self) {
        let before = self.fetches();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.fetches() <= before {
            assert!(tokio::time::Instant::now() < deadline, "the JWK set was not fetched again within 5 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the fetch that was just answered be parsed and stored.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_on_first_use_and_refreshed_in_the_background() {
    let up = echo_upstream().await;
    let set_one = json!({"keys": [ec_jwk("k1", Some(Algorithm::ES256))]});
    let set_two = json!({"keys": [ed_jwk("k2", None), {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"}]});
    let server = JwksServer::start(&set_one).await;
    let config = json!({
        "jwks": format!("http://{}/.well-known/jwks.json", server.upstream.addr),
        "jwks_refresh_secs": 1,
        "consumer_claim": "sub",
        "issuer": "https://idp",
        "audience": "gw",
    });
    let gw = start(up.addr, config).await;
    assert_eq!(server.fetches(), 0, "fetched on first use, not when built");
    let one = with_kid(Algorithm::ES256, &ec_key(), "k1", &json!({"sub": "alice", "iss": "https://idp", "aud": "gw"}));
    let two = with_kid(Algorithm::EdDSA, &ed_key(), "k2", &json!({"sub": "bob", "iss": "https://idp", "aud": "gw"}));
    let echo = accepted(&gw, &one).await;
    assert_eq!(echo.header("x-consumer-username"), Some("alice"));
    assert_eq!(echo.header("x-credential-identifier"), Some("jwks:k1:alice"));
    refused(&gw, &two, "No credentials found for given 'kid'").await;

    // Rotation: the new set replaces the old one within a refresh (the `oct` key is skipped).
    server.serve(StatusCode::OK, set_two.to_string());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = send(bearer(&gw, "/", &two)).await;
        if resp.status == StatusCode::OK {
            assert_eq!(resp.echo().header("x-consumer-username"), Some("bob"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the rotated key was not picked up within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused(&gw, &one, "No credentials found for given 'kid'").await;
    let sym = with_kid(Algorithm::HS256, &EncodingKey::from_secret(b"secret"), "sym", &json!({"sub": "bob"}));
    refused(&gw, &sym, "No credentials found for given 'kid'").await;

    // Failed fetches (an error status, not JSON, not a set, no usable key) keep the last good set.
    for (status, body) in [
        (StatusCode::INTERNAL_SERVER_ERROR, set_one.to_string()),
        (StatusCode::OK, "{not json".to_string()),
        (StatusCode::OK, json!({"keys": "none"}).to_string()),
        (StatusCode::OK, json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "sym"}]}).to_string()),
    ] {
        server.serve(status, body.clone());
        server.wait_for_fetch().await;
        assert_eq!(accepted(&gw, &two).await.header("x-credential-identifier"), Some("jwks:k2:bob"), "{status} {body}");
    }
    // The refresher holds the plugin weakly: once the gateway is gone, it stops.
    gw.shutdown().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = server.fetches();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(server.fetches(), after, "the refresher outlived its plugin");

    // A chunked response, and a default refresh far away: one fetch for many requests.
    server.serve(StatusCode::OK, set_one.to_string());
    let before = server.fetches();
    let gw = start(up.addr, json!({"jwks": format!("http://{}/chunked", server.upstream.addr)})).await;
    let (a, b) = tokio::join!(send(bearer(&gw, "/", &one)), send(bearer(&gw, "/", &one)));
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK), "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(accepted(&gw, &one).await.header("x-consumer-username"), None);
    assert_eq!(server.fetches(), before + 1, "concurrent first requests share one fetch");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_slow_jwks_url_refuses_its_tokens_but_not_jwt_secrets() {
    let up = echo_upstream().await;
    let token = with_kid(Algorithm::ES256, &ec_key(), "k1", &json!({"sub": "x"}));
    for url in [format!("http://{}/jwks", closed_port().await), format!("http://{}/slow/5000", up.addr)] {
        let gw = start(up.addr, json!({"jwks": url, "jwks_timeout_ms": 300})).await;
        let started = std::time::Instant::now();
        refused(&gw, &token, "No credentials found for given 'kid'").await;
        assert!(started.elapsed() < Duration::from_secs(3), "{url}: the fetch is bounded by jwks_timeout_ms");
        assert_eq!(
            accepted(&gw, &alice(&json!({"iss": "alice-iss"}))).await.header("x-consumer-username"),
            Some("alice")
        );
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jwks_configs_fail_the_route_when_built() {
    let up = echo_upstream().await;
    let with = |key: Value, fields: Value| {
        let mut k = key;
        k.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        json!({"jwks": {"keys": [k]}})
    };
    let mut p384_as_p256 = jwk(&DecodingKey::from_ec_pem(EC384_PUBLIC.as_bytes()).unwrap(), "k", None);
    p384_as_p256["crv"] = json!("P-256");
    let bad = vec![
        json!({"jwks": "https://idp.example/jwks"}),
        json!({"jwks": "HTTPS://idp.example/jwks"}),
        json!({"jwks": "ftp://idp.example/jwks"}),
        json!({"jwks": "jwks.json"}),
        json!({"jwks": "http://user:pw@idp.example/jwks"}),
        json!({"jwks": 7}),
        json!({"jwks": {"keys": []}}),
        json!({"jwks": {"key": [ec_jwk("k", None)]}}),
        json!({"jwks": {"keys": [ec_jwk("k", None), ed_jwk("k", None)]}}),
        with(ec_jwk("k", None), json!({"kid": ""})),
        json!({"jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}}),
        with(ec_jwk("k", None), json!({"alg": "RS256"})),
        with(ec_jwk("k", None), json!({"alg": "ES384"})),
        with(rsa_jwk("k", None), json!({"alg": "HS256"})),
        with(rsa_jwk("k", None), json!({"alg": "none"})),
        with(rsa_jwk("k", None), json!({"n": "BQ", "e": "AQ"})),
        with(rsa_jwk("k", None), json!({"n": "!!"})),
        with(ed_jwk("k", None), json!({"x": "AAAA"})),
        with(ec_jwk("k", None), json!({"crv": "P-521"})),
        p384_as_p256,
        json!({"jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k"}]}}),
        json!({"jwks": {"keys": [{"kty": "XYZ", "kid": "k"}]}}),
        json!({"issuer": "https://idp"}),
        json!({"audience": ["api"]}),
        json!({"consumer_claim": "sub"}),
        json!({"jwks": {"keys": [ec_jwk("k", None)]}, "issuer": []}),
        json!({"jwks": {"keys": [ec_jwk("k", None)]}, "audience": ""}),
        json!({"jwks": {"keys": [ec_jwk("k", None)]}, "consumer_claim": ""}),
        json!({"jwks": {"keys": [ec_jwk("k", None)]}, "consumer_claim": "sub"}),
        json!({"jwks": {"keys": [ec_jwk("k", None)]}, "consumer_claim": "sub", "issuer": "https://idp"}),
        json!({"jwks": "http://127.0.0.1:1/jwks", "jwks_refresh_secs": 0}),
        json!({"jwks": "http://127.0.0.1:1/jwks", "jwks_timeout_ms": 0}),
    ];
    for config in bad {
        let gw = start(up.addr, config.clone()).await;
        let resp = send(bearer(&gw, "/", &alice(&json!({"iss": "alice-iss"})))).await;
        assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR, "{config}");
        gw.shutdown().await;
    }
    // The same shapes, made right, build: what failed above was the one wrong field.
    let good = vec![
        with(ec_jwk("k", None), json!({"alg": "ES256", "use": "sig", "key_ops": ["verify"]})),
        with(rsa_jwk("k", None), json!({"alg": "PS512"})),
        json!({"jwks": {"keys": [ec_jwk("k", None), ed_jwk("k2", None), {"kty": "RSA", "use": "enc", "kid": "e", "n": "", "e": ""}]}}),
        json!({"jwks": {"keys": [ec_jwk("k", None)]}, "issuer": "https://idp", "audience": ["a", "b"], "consumer_claim": "sub"}),
        json!({"jwks": "http://127.0.0.1:1/jwks", "jwks_refresh_secs": 1, "jwks_timeout_ms": 100}),
        json!({"jwks": "http://[::1]:1/jwks"}),
    ];
    for config in good {
        let gw = start(up.addr, config.clone()).await;
        let resp = send(bearer(&gw, "/", &alice(&json!({"iss": "alice-iss"})))).await;
        assert_eq!(resp.status, StatusCode::OK, "{config}: {}", String::from_utf8_lossy(&resp.body));
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_announce_the_realm() {
    let up = echo_upstream().await;
    let gw = start(up.addr, json!({"realm": "api"})).await;
    let resp = send(bearer(&gw, "/", &alice(&json!({"iss": "nobody"})))).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers["www-authenticate"], "Bearer realm=\"api\"");
    gw.shutdown().await;
}

/// A token's signature is checked once per worker thread and remembered: the consumer is the
/// same on every request, a token differing only in its signature is still refused, `exp` is
/// checked against the clock on every request, and a reload forgets what was verified. One
/// thread serves the gateway and the client here, so every request after the first with a
/// token is answered from what that thread remembers.
#[tokio::test(flavor = "current_thread")]
async fn verified_tokens_are_remembered_but_expiry_and_reloads_still_apply() {
    let up = echo_upstream().await;
    let gw = start(up.addr, json!({"claims_to_verify": ["exp"]})).await;
    // Whole seconds: at least 2 s to send the first requests in.
    let expires = now() + 3;
    let short = alice(&json!({"iss": "alice-iss", "exp": expires}));
    let long = alice(&json!({"iss": "alice-iss", "exp": now() + 600}));
    for _ in 0..3 {
        for token in [&short, &long] {
            let echo = accepted(&gw, token).await;
            assert_eq!(echo.header("x-consumer-username"), Some("alice"));
            assert_eq!(echo.header("x-credential-identifier"), Some("cred-alice"));
        }
    }
    // The same header and claims with another signature.
    let (signed, signature) = long.rsplit_once('.').unwrap();
    let mut forged = signature.as_bytes().to_vec();
    forged[10] = if forged[10] == b'A' { b'B' } else { b'A' };
    let forged = format!("{signed}.{}", String::from_utf8(forged).unwrap());
    for _ in 0..4 {
        refused(&gw, &forged, "Invalid signature").await;
    }

    // Expired since it was remembered.
    while now() <= expires {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..4 {
        let resp = send(bearer(&gw, "/", &short)).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
        assert_eq!(resp.json(), json!({"exp": "token expired"}));
    }

    // A reload that changes alice's secret: the remembered token no longer verifies.
    let mut changed = consumers();
    changed[0]["jwt_secrets"][0]["secret"] = json!("a-new-secret");
    let config = json!({
        "_format_version": "3.0",
        "consumers": changed,
        "services": [{
            "name": "s",
            "url": format!("http://{}", up.addr),
            "routes": [{"name": "r", "paths": ["/"]}],
            "plugins": [{"name": "jwt", "config": {"claims_to_verify": ["exp"]}}],
        }],
    });
    gw.gateway.reload(&Config::from_yaml(&config.to_string()).unwrap()).unwrap();
    for _ in 0..4 {
        refused(&gw, &long, "Invalid signature").await;
    }
    gw.shutdown().await;
}
