//! `jwt`: authenticates a consumer by a signed JSON Web Token, with Kong's config fields,
//! credential shape (`jwt_secrets`), messages and upstream headers.
//!
//! ```yaml
//! plugins:
//!   - name: jwt
//!     config: { claims_to_verify: [exp], maximum_expiration: 3600 }
//! consumers:
//!   - username: alice
//!     jwt_secrets:
//!       - { key: alice-issuer, secret: a-long-shared-secret }              # HS256
//!       - { key: alice-rsa, algorithm: RS256, rsa_public_key: "-----BEGIN PUBLIC KEY-----..." }
//! ```
//!
//! The token is looked for in the query parameters `uri_param_names`, the cookies
//! `cookie_names` and the headers `header_names` (as `Bearer <token>`); several different
//! tokens are refused. The token's `key_claim_name` claim (`iss` by default, or the same field
//! of the token's header) names the credential, and the credential pins the algorithm: a token
//! whose `alg` is not the credential's is refused before any signature check, so an RSA public
//! key can never be used as an HMAC secret, and `alg: none` is never accepted. Keys are parsed
//! and checked when the plugin is built: a bad key fails the build (and so the route), never a
//! request.
//!
//! Algorithms: `HS256`, `HS384`, `HS512` (with `secret`, base64-decoded when
//! `secret_is_base64`), and `RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`, `ES256`,
//! `ES384`, `EdDSA` (Ed25519) with a PEM public key in `rsa_public_key`, as Kong names it for
//! every key type.
//!
//! Where this differs from Kong, on purpose:
//! - a token found in two places (query and header, say) must be the same token, or the
//!   request is refused with `Multiple tokens provided` (Kong takes the first place it looks);
//! - `X-Credential-Identifier` is the credential's `id`, or its `key` when it has none;
//! - a key claim that is neither a string nor absent is `Invalid '<claim>' in claims`;
//! - `secret_is_base64` applies to HMAC secrets only (Kong also base64-decodes PEM keys with
//!   it, which can only break them);
//! - every refusal also carries `WWW-Authenticate: Bearer` (with `realm="..."` when set).
//!
//! As in Kong, a claim listed in `claims_to_verify` must be present and a number: a missing or
//! non-numeric `exp` answers `{"exp":"must be a number"}`. Whatever the outcome, identity
//! headers sent by the client (`X-Consumer-*`, `X-Credential-Identifier`,
//! `X-Anonymous-Consumer`) never reach the upstream.
//!
//! # JWK sets (beyond Kong's open source)
//!
//! Tokens issued by an identity provider can be verified with its published JWK set instead of
//! per-consumer `jwt_secrets`:
//!
//! ```yaml
//! plugins:
//!   - name: jwt
//!     config:
//!       jwks: http://idp.internal/.well-known/jwks.json   # or inline: {keys: [...]}
//!       jwks_refresh_secs: 300     # URL sets: how often the set is fetched again
//!       jwks_timeout_ms: 2000      # URL sets: the whole fetch, connect to last byte
//!       issuer: http://idp.internal          # or a list; `iss` must be one of them
//!       audience: [orders-api, billing-api]  # `aud` (string or array) must hold one of them
//!       consumer_claim: sub                  # map the token to a consumer (optional)
//! ```
//!
//! - `jwks` is either the set itself (`{keys: [...]}`, parsed when the plugin is built: a key
//!   that cannot be used fails the build, so the route answers 500) or an `http://` URL.
//!   `https://` URLs are refused when the plugin is built: TLS upstreams are not supported yet.
//!   A URL set is fetched on the first request (which waits for it, at most
//!   `jwks_timeout_ms`), then again every `jwks_refresh_secs` in the background (sooner, every
//!   10 s at most, after a failure); a failed fetch keeps the last good set and logs a warning.
//!   Keys of a fetched set that cannot be used are skipped with a warning; a fetched set with
//!   no usable key counts as a failed fetch. Only the plugin's URL form makes it async.
//! - A token whose header has a `kid` found in the set is verified with that key, and only that
//!   way. The JWK's `alg`, when present, is the only algorithm accepted; without one, the key's
//!   family decides: `RS*`/`PS*` for RSA keys, `ES256` for P-256 and `ES384` for P-384 keys,
//!   `EdDSA` for Ed25519 keys (a token naming another algorithm is `Invalid algorithm`).
//!   Symmetric (`oct`) keys are refused (a shared secret does not belong in a key set: use
//!   `jwt_secrets`), keys marked for encryption (`use: enc`, `key_ops` without `verify`, an
//!   `RSA-OAEP*`/`RSA1_5` `alg`) are ignored, and `alg: none` is never accepted.
//! - A token without a `kid`, or with one the set does not hold, takes the `jwt_secrets` path
//!   above, unchanged; when that finds no credential for a token whose `kid` was unknown, the
//!   answer is `No credentials found for given 'kid'`.
//! - For a token verified through the set, `claims_to_verify` and `maximum_expiration` apply as
//!   above, and an `exp` is always checked (`{"exp":"token expired"}`) even when not listed.
//!   Then `issuer` and `audience`, when set: a missing claim is `No mandatory 'iss' in claims`
//!   (`'aud'`), one that does not match is `Invalid 'iss' in claims` (`'aud'`).
//! - `consumer_claim` names a string claim whose value is a consumer's id, username or
//!   custom_id (the first consumer matching, as `anonymous` is looked up); that consumer is
//!   identified with the usual headers. Without `consumer_claim`, or when no consumer matches,
//!   the request is authenticated without a consumer: no `X-Consumer-*` header is set.
//!   Either way the credential (and `X-Credential-Identifier`) is `jwks:<kid>`.
//! - The credential of a key-set token is `jwks:<kid>:<sub>` (or `jwks:<kid>` without a
//!   `sub`), so rate limits by credential count each subject separately.
//! - `consumer_claim` needs `issuer` and `audience` (a shared key set must not let tokens
//!   issued for others become our consumers).
//! - `issuer`, `audience` and `consumer_claim` need `jwks`: set without it, they would check
//!   nothing, so the build fails instead.
//!
//! # Verified tokens are remembered
//!
//! A client sends the same token with every request until it expires. Without `jwks`, a token
//! whose signature a `jwt_secrets` credential verified is remembered (as Envoy's `jwt_authn`
//! caches them), so the next request with it costs one keyed hash and a constant-time compare
//! instead of two base64 and JSON decodes and a signature check. Only what cannot change is
//! remembered, the credential and the token's `exp` and `nbf`: `claims_to_verify` and
//! `maximum_expiration` are checked against the clock on every request, so an expired token
//! is refused as before. The memory is per worker thread (no lock on the request path),
//! holds [`CACHED_TOKENS`] tokens of at most [`MAX_CACHED_TOKEN_BYTES`] each (a token that
//! lands on an occupied place replaces the one there), and only tokens that verified get in:
//! a client without a credential cannot fill it with made-up tokens. A consumer holding an
//! HMAC secret can mint tokens and push others' out, which costs them a verification, not
//! access. At most about 2 MiB per worker thread and jwt plugin entry, allocated on first
//! use. A reload builds a new plugin, and so starts with nothing remembered, and a credential
//! removed by it verifies nothing more.

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, RandomState};
use std::ops::ControlFlow;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use gateway_core::body::{ProxyBody, ResponseBody};
use gateway_core::plugin::{Answer, BoxFuture, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use hmac::{Hmac, Mac};
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Sha256, Sha384, Sha512};
use subtle::ConstantTimeEq;
use thread_local::ThreadLocal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::identity::{
    CREDENTIAL_IDENTIFIER, Identity, anonymous_consumer, anonymous_or, is_identity_header, set_consumer, steps_aside,
    strip_identity_headers, www_authenticate,
};

/// Kong's priority for jwt.
pub const PRIORITY: i32 = 1450;
/// Kong's upper bound for `maximum_expiration`: one year, in seconds.
const MAX_MAXIMUM_EXPIRATION: f64 = 31_536_000.0;
/// Upper bound for `jwks_refresh_secs`: one year.
const MAX_JWKS_REFRESH_SECS: u64 = 31_536_000;
/// Upper bound for `jwks_timeout_ms`: one minute.
const MAX_JWKS_TIMEOUT_MS: u64 = 60_000;
/// After a failed fetch, the next one comes at most this long after.
const JWKS_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);
/// The largest JWK set response read, head included.
const MAX_JWKS_RESPONSE: usize = 1 << 20;
/// The refusal of a token whose `kid` is in no JWK set and that matches no `jwt_secrets`.
const NO_CREDENTIALS_FOR_KID: &str = "No credentials found for given 'kid'";
/// The algorithms an RSA JWK without `alg` accepts.
const RSA_ALGORITHMS: [Algorithm; 6] =
    [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS384, Algorithm::PS512];

/// Base64 as Kong decodes JWT parts and base64 secrets: either alphabet (mapped to the
/// URL-safe one first), padding optional.
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// jwt's config (Kong's fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Query parameters to look for the token in.
    #[serde(default = "default_uri_param_names")]
    pub uri_param_names: Vec<String>,
    /// Cookies to look for the token in.
    #[serde(default)]
    pub cookie_names: Vec<String>,
    /// Headers to look for `Bearer <token>` in; not an identity header (`X-Consumer-*`,
    /// `X-Credential-Identifier`, `X-Anonymous-Consumer`), which the build refuses.
    #[serde(default = "default_header_names")]
    pub header_names: Vec<String>,
    /// Registered claims to check: `exp` and/or `nbf`.
    #[serde(default)]
    pub claims_to_verify: Option<Vec<RegisteredClaim>>,
    /// The claim (or, failing that, header field) naming the credential's `key`.
    #[serde(default = "default_key_claim_name")]
    pub key_claim_name: String,
    /// HMAC secrets are base64-encoded.
    #[serde(default)]
    pub secret_is_base64: bool,
    /// A consumer (id, username or custom_id) to use when the request carries no token.
    #[serde(default)]
    pub anonymous: Option<String>,
    /// Authenticate CORS preflight (`OPTIONS`) requests too.
    #[serde(default = "yes")]
    pub run_on_preflight: bool,
    /// Refuse tokens that expire more than this many seconds from now (0: no limit). Needs
    /// `exp` in `claims_to_verify`.
    #[serde(default)]
    pub maximum_expiration: f64,
    /// Realm in `WWW-Authenticate`.
    #[serde(default)]
    pub realm: Option<String>,
    /// Kong's field; accepted and ignored.
    #[serde(default)]
    pub tags: Option<Value>,
    /// Beyond Kong: a JWK set to verify tokens by their `kid`, inline or by `http://` URL.
    #[serde(default)]
    pub jwks: Option<JwksSource>,
    /// Beyond Kong: how often a URL set is fetched again, in seconds (default 300).
    #[serde(default = "default_jwks_refresh_secs")]
    pub jwks_refresh_secs: u64,
    /// Beyond Kong: the time limit of one fetch of a URL set, in milliseconds (default 2000).
    #[serde(default = "default_jwks_timeout_ms")]
    pub jwks_timeout_ms: u64,
    /// Beyond Kong: the issuers (`iss`) accepted from tokens verified through `jwks`.
    #[serde(default)]
    pub issuer: Option<OneOrMany>,
    /// Beyond Kong: the audiences accepted from tokens verified through `jwks`: their `aud`
    /// must hold one of them.
    #[serde(default)]
    pub audience: Option<OneOrMany>,
    /// Beyond Kong: the claim (`sub`, say) naming the consumer (by id, username or custom_id)
    /// of a token verified through `jwks`.
    #[serde(default)]
    pub consumer_claim: Option<String>,
}

/// Where `jwks` comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum JwksSource {
    /// An `http://` URL serving the set, fetched on first use and refreshed in the background.
    Url(String),
    /// The set itself: `{"keys": [...]}`.
    Set(Map<String, Value>),
}

/// One string, or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values, checked non-empty.
    fn into_list(self, field: &str) -> Result<Vec<String>, String> {
        let list = match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(list) => list,
        };
        if list.is_empty() || list.iter().any(String::is_empty) {
            return Err(format!("`{field}` must name at least one value, none of them empty"));
        }
        Ok(list)
    }
}

/// A registered claim `claims_to_verify` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisteredClaim {
    /// Expiration time: the token is refused from then on.
    Exp,
    /// Not before: the token is refused until then.
    Nbf,
}

impl RegisteredClaim {
    fn name(self) -> &'static str {
        match self {
            RegisteredClaim::Exp => "exp",
            RegisteredClaim::Nbf => "nbf",
        }
    }
}

fn default_uri_param_names() -> Vec<String> {
    vec!["jwt".to_string()]
}

fn default_header_names() -> Vec<String> {
    vec!["authorization".to_string()]
}

fn default_key_claim_name() -> String {
    "iss".to_string()
}

fn default_algorithm() -> String {
    "HS256".to_string()
}

fn yes() -> bool {
    true
}

fn default_jwks_refresh_secs() -> u64 {
    300
}

fn default_jwks_timeout_ms() -> u64 {
    2000
}

/// One entry of a consumer's `jwt_secrets` (Kong's fields).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credential {
    key: String,
    #[serde(default = "default_algorithm")]
    algorithm: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    rsa_public_key: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    tags: Option<Value>,
    #[serde(default)]
    created_at: Option<Value>,
}

/// A credential ready to verify tokens: its key decoded and checked, its algorithm pinned.
struct Secret {
    who: Identity,
    algorithm: Algorithm,
    key: DecodingKey,
    /// HMAC credentials: the HMAC keyed once (see [`HmacKey`]).
    hmac: Option<HmacKey>,
}

/// An HMAC keyed when the plugin is built. Keying hashes the secret's two padded blocks, which
/// `jsonwebtoken::crypto::verify` redoes for every token (7,300 of its 19,500 instructions for
/// an HS256 token, under callgrind); a keyed HMAC is cloned instead. It matters for the first
/// request of each token, which the verified-token cache does not spare: clients that sign a
/// token per request.
enum HmacKey {
    Hs256(Hmac<Sha256>),
    Hs384(Hmac<Sha384>),
    Hs512(Hmac<Sha512>),
}

impl HmacKey {
    fn new(algorithm: Algorithm, secret: &[u8]) -> Option<Self> {
        Some(match algorithm {
            Algorithm::HS256 => HmacKey::Hs256(Hmac::new_from_slice(secret).ok()?),
            Algorithm::HS384 => HmacKey::Hs384(Hmac::new_from_slice(secret).ok()?),
            Algorithm::HS512 => HmacKey::Hs512(Hmac::new_from_slice(secret).ok()?),
            _ => return None,
        })
    }

    /// Whether `signature` is the MAC of `message`, read as jsonwebtoken reads it (base64url
    /// without padding) and compared in constant time (`verify_slice`).
    fn verify(&self, signature: &str, message: &[u8]) -> bool {
        // Longer than any of the three MACs: such a signature is refused either way.
        let mut mac = [0u8; 64];
        let Ok(n) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(signature, &mut mac) else {
            return false;
        };
        fn check<D: Mac + Clone>(keyed: &D, message: &[u8], mac: &[u8]) -> bool {
            let mut m = keyed.clone();
            m.update(message);
            m.verify_slice(mac).is_ok()
        }
        match self {
            HmacKey::Hs256(k) => check(k, message, &mac[..n]),
            HmacKey::Hs384(k) => check(k, message, &mac[..n]),
            HmacKey::Hs512(k) => check(k, message, &mac[..n]),
        }
    }
}

/// The jwt plugin.
pub struct Jwt {
    config: JwtConfig,
    header_names: Vec<HeaderName>,
    claims_to_verify: Vec<RegisteredClaim>,
    /// `jwt_secrets` credentials by key, as indexes into `credentials`.
    secrets: HashMap<String, usize>,
    credentials: Vec<Secret>,
    /// Tokens verified with `jwt_secrets`; used only without `jwks` (see the module docs).
    verified: TokenCache,
    anonymous: Option<Identity>,
    www_authenticate: HeaderValue,
    no_key_claim: String,
    invalid_key_claim: String,
    no_credentials: String,
    jwks: Option<Jwks>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    /// With `consumer_claim`: consumers by id, username and custom_id (the first one wins, as
    /// in [`crate::identity::find_consumer`]), their credential left to the request.
    consumers_by_claim: HashMap<Arc<str>, Identity>,
}

/// How many verified tokens each worker thread remembers (see the module docs).
pub const CACHED_TOKENS: usize = 1024;
/// The longest token remembered, in bytes: longer ones are verified every time.
pub const MAX_CACHED_TOKEN_BYTES: usize = 2048;

/// Tokens whose signature a `jwt_secrets` credential verified, with the credential and the
/// time claims checked on every use. Per thread, so that neither a hit nor an insert takes a
/// lock; direct-mapped by a keyed hash (`RandomState`: a client cannot aim tokens at one
/// place), so an insert is a store and nothing is ever scanned. Hand-written: the cache
/// crates of the field lock or count on every hit, which would cost what this saves.
struct TokenCache {
    hasher: RandomState,
    threads: ThreadLocal<RefCell<Vec<Option<CachedToken>>>>,
}

struct CachedToken {
    token: Box<str>,
    /// The verifying credential, an index into [`Jwt::credentials`].
    credential: usize,
    times: TimeClaims,
}

/// A token's `exp` and `nbf`, each `None` when absent or not a number.
#[derive(Clone, Copy)]
struct TimeClaims {
    exp: Option<f64>,
    nbf: Option<f64>,
}

impl TimeClaims {
    fn of(claims: &Map<String, Value>) -> Self {
        TimeClaims { exp: claims.get("exp").and_then(Value::as_f64), nbf: claims.get("nbf").and_then(Value::as_f64) }
    }

    fn get(self, claim: RegisteredClaim) -> Option<f64> {
        match claim {
            RegisteredClaim::Exp => self.exp,
            RegisteredClaim::Nbf => self.nbf,
        }
    }
}

impl TokenCache {
    fn new() -> Self {
        TokenCache { hasher: RandomState::new(), threads: ThreadLocal::new() }
    }

    fn place(&self, token: &str) -> usize {
        (self.hasher.hash_one(token) as usize) % CACHED_TOKENS
    }

    /// The credential and time claims of `token` if it verified before on this thread. The
    /// token is compared in constant time: it is a bearer secret.
    fn get(&self, token: &str) -> Option<(usize, TimeClaims)> {
        let slots = self.threads.get()?.borrow();
        let cached = slots.get(self.place(token))?.as_ref()?;
        ct_eq_words(cached.token.as_bytes(), token.as_bytes()).then_some((cached.credential, cached.times))
    }

    fn insert(&self, token: &str, credential: usize, times: TimeClaims) {
        if token.len() > MAX_CACHED_TOKEN_BYTES {
            return;
        }
        let mut slots = self.threads.get_or(|| RefCell::new(Vec::new())).borrow_mut();
        if slots.is_empty() {
            slots.resize_with(CACHED_TOKENS, || None);
        }
        let place = self.place(token);
        slots[place] = Some(CachedToken { token: token.into(), credential, times });
    }
}

/// Constant-time equality of two byte strings (their lengths are not secret), eight bytes at
/// a time with `subtle`'s word comparison. `subtle`'s byte-slice comparison passes every byte
/// through an optimisation barrier: for a bearer token of a few hundred bytes, about 1,000
/// instructions, more than the rest of a cached token's check.
fn ct_eq_words(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let ((a_words, a_rest), (b_words, b_rest)) = (a.as_chunks::<8>(), b.as_chunks::<8>());
    let mut equal = a_rest.ct_eq(b_rest);
    for (x, y) in a_words.iter().zip(b_words) {
        equal &= u64::from_ne_bytes(*x).ct_eq(&u64::from_ne_bytes(*y));
    }
    bool::from(equal)
}

/// What verified a token.
enum Verified<'a> {
    /// A consumer's `jwt_secrets` credential.
    Secret(&'a Secret),
    /// A key of the JWK set, and the consumer `consumer_claim` named, if any.
    Jwks { who: Option<&'a Identity>, credential: Arc<str>, credential_value: HeaderValue },
}

/// The factory to register.
pub fn factory() -> TypedFactory<JwtConfig, impl Fn(JwtConfig, &BuildContext<'_>) -> Result<Jwt, String> + Send + Sync>
{
    typed_factory("jwt", PRIORITY, Jwt::new).no_consumer().with_credentials(&["jwt_secrets"])
}

/// The algorithms a token or credential may name; `none` and anything else is refused.
fn parse_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Base64 either alphabet, padding optional, as Kong decodes.
fn lenient_b64_decode(input: &str) -> Option<Vec<u8>> {
    if input.contains(['+', '/']) {
        let mapped: String = input
            .chars()
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        LENIENT_B64.decode(mapped).ok()
    } else {
        LENIENT_B64.decode(input).ok()
    }
}

/// Decodes and checks the key of a credential for its algorithm.
fn prepare_key(cred: &Credential, algorithm: Algorithm, secret_is_base64: bool) -> Result<DecodingKey, String> {
    let pem = || {
        cred.rsa_public_key
            .as_deref()
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| format!("algorithm {algorithm:?} needs a PEM public key in `rsa_public_key`"))
    };
    let key = match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            let secret = cred.secret.as_deref().unwrap_or("");
            let bytes = if secret_is_base64 {
                lenient_b64_decode(secret).ok_or("`secret` is not valid base64 (`secret_is_base64` is on)")?
            } else {
                secret.as_bytes().to_vec()
            };
            if bytes.is_empty() {
                return Err(format!("algorithm {algorithm:?} needs a non-empty `secret`"));
            }
            DecodingKey::from_secret(&bytes)
        }
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => {
            let key = DecodingKey::from_rsa_pem(pem()?.as_bytes())
                .map_err(|e| format!("`rsa_public_key` is not an RSA public key: {e}"))?;
            // Parses the key the way every verification will: a key that cannot be read fails now.
            Jwk::from_decoding_key(&key, Some(algorithm))
                .map_err(|e| format!("`rsa_public_key` is not a usable RSA public key: {e}"))?;
            key
        }
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem()?.as_bytes())
            .map_err(|e| format!("`rsa_public_key` is not an EC public key: {e}"))?,
        Algorithm::EdDSA => {
            let key = DecodingKey::from_ed_pem(pem()?.as_bytes())
                .map_err(|e| format!("`rsa_public_key` is not an Ed25519 public key: {e}"))?;
            if key.try_get_as_bytes().map(<[u8]>::len).ok() != Some(32) {
                return Err("`rsa_public_key` is not an Ed25519 public key".into());
            }
            key
        }
        other => return Err(format!("unsupported algorithm {other:?}")),
    };
    // Builds the verifier once with a dummy signature: EC and Ed keys are parsed (and an EC key
    // of the wrong curve refused) there, so a key that cannot verify fails now.
    jsonwebtoken::crypto::verify("", b"", &key, algorithm)
        .map_err(|e| format!("key unusable with {algorithm:?}: {e}"))?;
    Ok(key)
}

/// One verification key of a JWK set.
struct JwksKey {
    key: DecodingKey,
    /// The algorithms a token may name: the JWK's `alg`, or its key family's.
    algorithms: Vec<Algorithm>,
    /// `jwks:<kid>`, the request's credential.
    credential: Arc<str>,
    /// The same, as `X-Credential-Identifier`.
    credential_value: HeaderValue,
}

/// A JWK set's verification keys, by `kid`.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, JwksKey>,
}

/// The PKCS#1 DER of an RSA public key (`SEQUENCE { INTEGER n, INTEGER e }`), the form the
/// key is checked in (and later parsed from) like a PEM credential's.
fn rsa_public_der(n: &[u8], e: &[u8]) -> Option<Vec<u8>> {
    fn length(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let be = len.to_be_bytes();
            let skip = be.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (be.len() - skip) as u8);
            out.extend_from_slice(&be[skip..]);
        }
    }
    fn integer(out: &mut Vec<u8>, bytes: &[u8]) -> Option<()> {
        let start = bytes.iter().position(|b| *b != 0)?;
        let bytes = &bytes[start..];
        let pad = bytes[0] & 0x80 != 0;
        out.push(0x02);
        length(out, bytes.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(bytes);
        Some(())
    }
    let mut body = Vec::with_capacity(n.len() + e.len() + 16);
    integer(&mut body, n)?;
    integer(&mut body, e)?;
    let mut der = vec![0x30];
    length(&mut der, body.len());
    der.extend_from_slice(&body);
    Some(der)
}

/// One JWK: `Ok(None)` for a key that is not for verifying signatures (skipped), an error
/// for one that claims to be but cannot be used.
fn parse_jwk(raw: &Value) -> Result<Option<(String, JwksKey)>, String> {
    let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| format!("not a JWK: {e}"))?;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Ok(None);
    }
    if jwk.common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify)) {
        return Ok(None);
    }
    let kid = match jwk.common.key_id.as_deref() {
        Some(kid) if !kid.is_empty() => kid,
        _ => return Err("no `kid`: a token could never select it".into()),
    };
    let named = match jwk.common.key_algorithm {
        None => None,
        Some(KeyAlgorithm::RSA1_5 | KeyAlgorithm::RSA_OAEP | KeyAlgorithm::RSA_OAEP_256) => return Ok(None),
        Some(alg) => Some(Algorithm::try_from(alg).map_err(|_| format!("`kid` {kid}: unsupported `alg`"))?),
    };
    let context = |e: &dyn std::fmt::Display| format!("`kid` {kid}: {e}");
    let (family, key) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let n = lenient_b64_decode(&p.n).ok_or_else(|| context(&"`n` is not base64url"))?;
            let e = lenient_b64_decode(&p.e).ok_or_else(|| context(&"`e` is not base64url"))?;
            let der = rsa_public_der(&n, &e).ok_or_else(|| context(&"`n` and `e` must not be zero"))?;
            let key = DecodingKey::from_rsa_der(&der);
            // Parses the key the way every verification will: a key that cannot be read fails now.
            Jwk::from_decoding_key(&key, None).map_err(|e| context(&format!("not a usable RSA key: {e}")))?;
            (RSA_ALGORITHMS.to_vec(), key)
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let alg = match p.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                ref other => return Err(context(&format!("unsupported curve {other:?}"))),
            };
            let key = DecodingKey::from_ec_components(&p.x, &p.y).map_err(|e| context(&e))?;
            (vec![alg], key)
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 {
                return Err(context(&format!("unsupported curve {:?}", p.curve)));
            }
            let key = DecodingKey::from_ed_components(&p.x).map_err(|e| context(&e))?;
            // The verifier slices 32 bytes: anything else must never reach it.
            if key.try_get_as_bytes().map(<[u8]>::len).ok() != Some(32) {
                return Err(context(&"not an Ed25519 public key"));
            }
            (vec![Algorithm::EdDSA], key)
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err(context(&"symmetric (`oct`) keys are not accepted in a JWK set; use `jwt_secrets`"));
        }
        _ => return Err(context(&"unsupported key type")),
    };
    let algorithms = match named {
        None => family,
        Some(alg) if family.contains(&alg) => vec![alg],
        Some(alg) => return Err(context(&format!("`alg` {alg:?} does not fit the key type"))),
    };
    for alg in &algorithms {
        // Builds the verifier once with a dummy signature: EC and Ed keys are parsed (and an EC
        // key off its curve refused) there.
        jsonwebtoken::crypto::verify("", b"", &key, *alg).map_err(|e| context(&format!("key unusable: {e}")))?;
    }
    let credential = format!("jwks:{kid}");
    let credential_value =
        HeaderValue::from_str(&credential).map_err(|_| context(&"the `kid` is not a valid header value"))?;
    Ok(Some((kid.to_string(), JwksKey { key, algorithms, credential: credential.into(), credential_value })))
}

/// A JWK set. `strict` (an inline set): any key that cannot be used is an error. Otherwise (a
/// fetched set) such keys are skipped with a warning. Either way, a set without one usable key
/// is an error.
fn parse_jwks(set: &Map<String, Value>, strict: bool) -> Result<KeySet, String> {
    let Some(Value::Array(raw_keys)) = set.get("keys") else {
        return Err("not a JWK set: `keys` must be an array".into());
    };
    let mut keys = HashMap::new();
    for (i, raw) in raw_keys.iter().enumerate() {
        match parse_jwk(raw) {
            Ok(None) => {}
            Ok(Some((kid, key))) => match keys.entry(kid) {
                Entry::Vacant(v) => {
                    v.insert(key);
                }
                Entry::Occupied(o) if strict => return Err(format!("`kid` {} is not unique", o.key())),
                Entry::Occupied(o) => {
                    tracing::warn!(kid = o.key(), "jwt: JWK set: duplicate `kid`; the first key is used")
                }
            },
            Err(e) if strict => return Err(format!("key {i}: {e}")),
            Err(e) => tracing::warn!(key = i, error = %e, "jwt: JWK set: skipping a key that cannot be used"),
        }
    }
    if keys.is_empty() {
        return Err("the JWK set holds no usable signature key".into());
    }
    Ok(KeySet { keys })
}

/// An `http://` URL, split for a hand-made HTTP/1.1 GET.
#[derive(Debug)]
struct HttpUrl {
    /// The host to connect to (an IPv6 literal without its brackets).
    host: String,
    port: u16,
    /// `Host:` (the URL's authority).
    authority: String,
    /// The request target: path and query.
    target: String,
    /// The URL as configured, for logs.
    text: String,
}

fn parse_http_url(text: &str) -> Result<HttpUrl, String> {
    let uri: http::Uri = text.parse().map_err(|e| format!("`jwks`: `{text}` is not a URL: {e}"))?;
    match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "`jwks`: `{text}`: https:// URLs are not supported yet (TLS upstreams are not supported \
                 yet); serve the set over http:// or inline it"
            ));
        }
        _ => return Err(format!("`jwks`: `{text}` must be an http:// URL or a JWK set object")),
    }
    let authority = uri.authority().ok_or_else(|| format!("`jwks`: `{text}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("`jwks`: `{text}`: credentials in the URL are not supported"));
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`jwks`: `{text}` has no host"));
    }
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    Ok(HttpUrl {
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(80),
        authority: authority.as_str().to_string(),
        target: if target.is_empty() { "/" } else { target }.to_string(),
        text: text.to_string(),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The body of a `Transfer-Encoding: chunked` message (chunk extensions and trailers ignored).
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    const TRUNCATED: &str = "truncated chunked body";
    let mut out = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or(TRUNCATED)?;
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| format!("bad chunk size `{size_hex}`"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size.saturating_add(2) {
            return Err(TRUNCATED.into());
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err("bad chunk framing".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// The body of a whole HTTP/1.x response read to EOF; anything but a plain 200 is an error.
fn response_body(raw: &[u8]) -> Result<Vec<u8>, String> {
    let head_end = find(raw, b"\r\n\r\n").ok_or("incomplete response head")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "response head is not UTF-8")?;
    let body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(status)) = (parts.next(), parts.next()) else {
        return Err(format!("bad status line `{status_line}`"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line `{status_line}`"));
    }
    if status != "200" {
        return Err(format!("answered `{status_line}`"));
    }
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(|| format!("bad header line `{line}`"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(format!("unsupported transfer-encoding `{value}`"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| format!("bad content-length `{value}`"))?);
        } else if name.eq_ignore_ascii_case("content-encoding") && !value.eq_ignore_ascii_case("identity") {
            return Err(format!("unsupported content-encoding `{value}`"));
        }
    }
    match (chunked, length) {
        (true, _) => dechunk(body),
        (false, Some(n)) => body.get(..n).map(<[u8]>::to_vec).ok_or_else(|| "truncated body".into()),
        (false, None) => Ok(body.to_vec()),
    }
}

/// GETs the URL: one connection, `Connection: close`, read to EOF.
async fn http_get(url: &HttpUrl) -> Result<Vec<u8>, String> {
    let mut stream =
        tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/jwk-set+json, application/json\r\n\
         User-Agent: gateway-jwt\r\nConnection: close\r\n\r\n",
        url.target, url.authority
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    (&mut stream).take(MAX_JWKS_RESPONSE as u64 + 1).read_to_end(&mut raw).await.map_err(|e| format!("read: {e}"))?;
    if raw.len() > MAX_JWKS_RESPONSE {
        return Err(format!("response larger than {MAX_JWKS_RESPONSE} bytes"));
    }
    response_body(&raw)
}

/// A JWK set served at a URL: the last good set, and how to fetch it again.
struct RemoteJwks {
    url: HttpUrl,
    refresh: Duration,
    timeout: Duration,
    /// The last good set; empty until the first successful fetch. Read (an `Arc` clone) per
    /// request, written once per successful fetch.
    keys: RwLock<Arc<KeySet>>,
    /// Done once the first fetch was tried and the background refresher spawned.
    started: tokio::sync::OnceCell<()>,
}

impl RemoteJwks {
    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let body = tokio::time::timeout(self.timeout, http_get(&self.url))
            .await
            .map_err(|_| format!("timed out after {} ms", self.timeout.as_millis()))??;
        let Value::Object(set) = serde_json::from_slice(&body).map_err(|e| format!("the response is not JSON: {e}"))?
        else {
            return Err("the response is not a JSON object".into());
        };
        parse_jwks(&set, false)
    }

    /// Fetches the set once: stores it on success, keeps the last good one (and logs) on failure.
    async fn refresh(&self) -> bool {
        match self.fetch().await {
            Ok(set) => {
                tracing::debug!(url = %self.url.text, keys = set.keys.len(), "jwt: JWK set fetched");
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                true
            }
            Err(e) => {
                tracing::warn!(
                    url = %self.url.text,
                    error = %e,
                    "jwt: could not fetch the JWK set; keeping the last good one",
                );
                false
            }
        }
    }

    /// On the first request: fetches the set (concurrent first requests wait for that one
    /// fetch) and spawns the background refresher.
    async fn ensure_started(self: &Arc<Self>) {
        self.started
            .get_or_init(|| async {
                let ok = self.refresh().await;
                tokio::spawn(refresh_loop(Arc::downgrade(self), ok));
            })
            .await;
    }
}

/// Fetches the set again every `jwks_refresh_secs` (sooner after a failure) for as long as the
/// plugin lives: it holds the plugin's state weakly, so a replaced config ends it.
async fn refresh_loop(remote: Weak<RemoteJwks>, mut last_ok: bool) {
    loop {
        let Some(delay) =
            remote.upgrade().map(|r| if last_ok { r.refresh } else { r.refresh.min(JWKS_RETRY_AFTER_FAILURE) })
        else {
            return;
        };
        tokio::time::sleep(delay).await;
        let Some(r) = remote.upgrade() else { return };
        last_ok = r.refresh().await;
    }
}

/// The configured JWK set.
enum Jwks {
    Inline(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

impl Jwks {
    fn build(config: &JwtConfig) -> Result<Option<Self>, String> {
        let Some(source) = &config.jwks else { return Ok(None) };
        if !(1..=MAX_JWKS_REFRESH_SECS).contains(&config.jwks_refresh_secs) {
            return Err(format!("`jwks_refresh_secs` must be between 1 and {MAX_JWKS_REFRESH_SECS}"));
        }
        if !(1..=MAX_JWKS_TIMEOUT_MS).contains(&config.jwks_timeout_ms) {
            return Err(format!("`jwks_timeout_ms` must be between 1 and {MAX_JWKS_TIMEOUT_MS}"));
        }
        Ok(Some(match source {
            JwksSource::Set(set) => Jwks::Inline(Arc::new(parse_jwks(set, true).map_err(|e| format!("`jwks`: {e}"))?)),
            JwksSource::Url(url) => Jwks::Remote(Arc::new(RemoteJwks {
                url: parse_http_url(url)?,
                refresh: Duration::from_secs(config.jwks_refresh_secs),
                timeout: Duration::from_millis(config.jwks_timeout_ms),
                keys: RwLock::default(),
                started: tokio::sync::OnceCell::new(),
            })),
        }))
    }

    fn current(&self) -> Arc<KeySet> {
        match self {
            Jwks::Inline(set) => set.clone(),
            Jwks::Remote(remote) => remote.current(),
        }
    }
}

/// A token, split and decoded; its signature not yet checked.
struct Token<'t> {
    header: Map<String, Value>,
    claims: Map<String, Value>,
    algorithm: Algorithm,
    /// `header.claims`, the signed text.
    signed: &'t str,
    signature: &'t str,
}

/// The longest token read, in bytes. Real tokens are a few hundred bytes to a few KiB; 8 KiB
/// is also the longest header line nginx reads by default. Anything longer is refused before
/// any decoding, so that an oversized token costs no base64 or JSON work.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Splits and decodes a compact JWS, with Kong's messages for what cannot be read.
fn decode(token: &str) -> Result<Token<'_>, &'static str> {
    const BAD_JSON: &str = "Bad token; invalid JSON";
    if token.len() > MAX_TOKEN_BYTES {
        return Err("Bad token; too large");
    }
    let mut parts = token.splitn(4, '.');
    let (Some(header_64), Some(claims_64), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD_JSON);
    };
    let signed = &token[..header_64.len() + 1 + claims_64.len()];
    let json = |part: &str| -> Result<Value, &'static str> {
        let bytes = lenient_b64_decode(part).ok_or(BAD_JSON)?;
        serde_json::from_slice(&bytes).map_err(|_| BAD_JSON)
    };
    let header = json(header_64)?;
    let claims = json(claims_64)?;
    let signature = signature.trim_end_matches('=');
    if lenient_b64_decode(signature).is_none() {
        return Err(BAD_JSON);
    }
    let Value::Object(header) = header else { return Err(BAD_JSON) };
    let algorithm =
        header.get("alg").and_then(Value::as_str).and_then(parse_algorithm).ok_or("Bad token; invalid alg")?;
    let Value::Object(claims) = claims else { return Err("Bad token; invalid claims") };
    Ok(Token { header, claims, algorithm, signed, signature })
}

/// Why a request is refused.
enum Refusal {
    /// `{"message": ...}`
    Message(String),
    /// A claims object, sent as the whole body (`{"exp":"token expired"}`).
    Claims(Map<String, Value>),
}

impl From<&str> for Refusal {
    fn from(m: &str) -> Self {
        Refusal::Message(m.to_string())
    }
}

enum Lookup {
    Missing,
    Multiple,
    Token(String),
}

/// The token of an `Authorization`-style value: `Bearer <token>`, scheme case-insensitive.
fn bearer(value: &HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?.trim_start();
    let scheme = s.get(..6)?;
    let rest = s.get(6..)?;
    if scheme.eq_ignore_ascii_case("bearer") && rest.starts_with([' ', '\t']) { Some(rest.trim()) } else { None }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as f64
}

impl Jwt {
    /// Builds the plugin from its config and the consumers' `jwt_secrets`.
    pub fn new(config: JwtConfig, build: &BuildContext<'_>) -> Result<Self, String> {
        let header_names = config
            .header_names
            .iter()
            .map(|n| {
                let name = HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("`header_names`: `{n}` is not a valid header name"))?;
                if is_identity_header(&name) {
                    return Err(format!("`header_names`: `{n}` is a header the gateway sets for the upstream"));
                }
                Ok(name)
            })
            .collect::<Result<_, _>>()?;
        if config.key_claim_name.is_empty() {
            return Err("`key_claim_name` must not be empty".into());
        }
        let mut claims_to_verify = Vec::new();
        for claim in config.claims_to_verify.iter().flatten() {
            if !claims_to_verify.contains(claim) {
                claims_to_verify.push(*claim);
            }
        }
        let max = config.maximum_expiration;
        if !(0.0..=MAX_MAXIMUM_EXPIRATION).contains(&max) {
            return Err(format!("`maximum_expiration` must be between 0 and {MAX_MAXIMUM_EXPIRATION}"));
        }
        if max > 0.0 && !claims_to_verify.contains(&RegisteredClaim::Exp) {
            return Err("`maximum_expiration` needs `exp` in `claims_to_verify`".into());
        }

        let mut secrets = HashMap::new();
        let mut credentials = Vec::new();
        for (consumer, raw) in build.credentials("jwt_secrets") {
            let context = |e: &dyn std::fmt::Display| format!("jwt_secrets of consumer `{}`: {e}", consumer.id);
            let cred: Credential = serde_json::from_value(raw.clone()).map_err(|e| context(&e))?;
            let _ = (&cred.tags, &cred.created_at);
            if cred.key.is_empty() {
                return Err(context(&"empty key"));
            }
            let algorithm = parse_algorithm(&cred.algorithm)
                .ok_or_else(|| context(&format!("unsupported algorithm `{}`", cred.algorithm)))?;
            let key = prepare_key(&cred, algorithm, config.secret_is_base64)
                .map_err(|e| context(&format!("credential `{}`: {e}", cred.key)))?;
            let credential: Arc<str> = cred.id.as_deref().unwrap_or(&cred.key).into();
            let hmac = key.try_get_as_bytes().ok().and_then(|secret| HmacKey::new(algorithm, secret));
            let secret = Secret { who: Identity::new(consumer.clone(), Some(credential)), algorithm, key, hmac };
            if secrets.insert(cred.key.clone(), credentials.len()).is_some() {
                return Err(context(&format!("key `{}` is not unique", cred.key)));
            }
            credentials.push(secret);
        }
        let anonymous = anonymous_consumer(build, config.anonymous.as_deref())?;
        let www_authenticate = www_authenticate("Bearer", config.realm.as_deref())?;

        let jwks = Jwks::build(&config)?;
        if jwks.is_none() {
            for (field, set) in [
                ("issuer", config.issuer.is_some()),
                ("audience", config.audience.is_some()),
                ("consumer_claim", config.consumer_claim.is_some()),
            ] {
                if set {
                    return Err(format!("`{field}` applies to tokens verified through `jwks`, which is not set"));
                }
            }
        }
        let issuers = config.issuer.clone().map(|i| i.into_list("issuer")).transpose()?.unwrap_or_default();
        let audiences = config.audience.clone().map(|a| a.into_list("audience")).transpose()?.unwrap_or_default();
        let mut consumers_by_claim = HashMap::new();
        if let Some(claim) = &config.consumer_claim {
            if claim.is_empty() {
                return Err("`consumer_claim` must not be empty".into());
            }
            // A key set may be shared by many tenants and applications (a cloud IdP's common
            // keys): only tokens issued for us may be mapped to our consumers.
            if issuers.is_empty() || audiences.is_empty() {
                return Err("`consumer_claim` needs `issuer` and `audience`, so tokens issued for others cannot become our consumers".into());
            }
            for consumer in build.consumers() {
                let names = [Some(&consumer.id), consumer.username.as_ref(), consumer.custom_id.as_ref()];
                for name in names.into_iter().flatten() {
                    consumers_by_claim.entry(name.clone()).or_insert_with(|| Identity::new(consumer.clone(), None));
                }
            }
        }

        let name = &config.key_claim_name;
        Ok(Jwt {
            no_key_claim: format!("No mandatory '{name}' in claims"),
            invalid_key_claim: format!("Invalid '{name}' in claims"),
            no_credentials: format!("No credentials found for given '{name}'"),
            config,
            header_names,
            claims_to_verify,
            secrets,
            credentials,
            verified: TokenCache::new(),
            anonymous,
            www_authenticate,
            jwks,
            issuers,
            audiences,
            consumers_by_claim,
        })
    }

    fn unauthorized(&self, ctx: &RequestContext, refusal: Refusal) -> Answer {
        let mut answer = match refusal {
            Refusal::Message(m) => ctx.error(StatusCode::UNAUTHORIZED, &m),
            Refusal::Claims(claims) => {
                let mut a = ctx.error(StatusCode::UNAUTHORIZED, "");
                *a.body_mut() = ResponseBody::full(Value::Object(claims).to_string());
                a
            }
        };
        answer.headers_mut().insert(header::WWW_AUTHENTICATE, self.www_authenticate.clone());
        answer
    }

    /// Every token the request carries, in Kong's places; several different ones are refused.
    fn find_token(&self, req: &Request<ProxyBody>) -> Lookup {
        let mut found: Option<String> = None;
        let mut multiple = false;
        let mut add = |token: &str| {
            if token.is_empty() {
                return;
            }
            match &found {
                None => found = Some(token.to_string()),
                Some(f) if f == token => {}
                Some(_) => multiple = true,
            }
        };
        if !self.config.uri_param_names.is_empty()
            && let Some(q) = req.uri().query()
        {
            for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                if self.config.uri_param_names.iter().any(|n| *n == k) {
                    add(&v);
                }
            }
        }
        if !self.config.cookie_names.is_empty() {
            for value in req.headers().get_all(header::COOKIE) {
                let Ok(cookies) = value.to_str() else { continue };
                for pair in cookies.split(';') {
                    let Some((name, value)) = pair.split_once('=') else { continue };
                    if self.config.cookie_names.iter().any(|n| n == name.trim()) {
                        let value = value.trim();
                        add(value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value));
                    }
                }
            }
        }
        for name in &self.header_names {
            for value in req.headers().get_all(name) {
                if let Some(token) = bearer(value) {
                    add(token);
                }
            }
        }
        match (found, multiple) {
            (_, true) => Lookup::Multiple,
            (Some(t), false) => Lookup::Token(t),
            (None, false) => Lookup::Missing,
        }
    }

    /// Kong's checks, in Kong's order: decode, credential (a JWK set's key by `kid`, else a
    /// `jwt_secrets` credential), algorithm, signature, claims.
    /// Without `jwks`, a token verified before is taken from the cache: only its time claims
    /// are checked again.
    fn authenticate(&self, text: &str) -> Result<Verified<'_>, Refusal> {
        if self.jwks.is_none()
            && let Some((credential, times)) = self.verified.get(text)
        {
            self.check_times(times, false)?;
            return Ok(Verified::Secret(&self.credentials[credential]));
        }
        let token = decode(text)?;
        let mut unknown_kid = false;
        if let Some(jwks) = &self.jwks
            && let Some(kid) = token.header.get("kid").and_then(Value::as_str)
        {
            let keys = jwks.current();
            if let Some(key) = keys.keys.get(kid) {
                return self.verify_with_jwk(&token, key);
            }
            unknown_kid = true;
        }
        let credential = self.verify_with_secret(&token, unknown_kid)?;
        let times = TimeClaims::of(&token.claims);
        if self.jwks.is_none() {
            self.verified.insert(text, credential, times);
        }
        self.check_times(times, false)?;
        Ok(Verified::Secret(&self.credentials[credential]))
    }

    /// The `jwt_secrets` path (Kong's) up to the signature: the verifying credential, as an
    /// index into `credentials`; the caller checks the claims. `unknown_kid`: the token named
    /// a `kid` the JWK set does not hold, which is what a missing credential is reported as.
    fn verify_with_secret(&self, token: &Token<'_>, unknown_kid: bool) -> Result<usize, Refusal> {
        let no_credential = |message: &String| {
            Refusal::Message(if unknown_kid { NO_CREDENTIALS_FOR_KID.to_string() } else { message.clone() })
        };
        let name = &self.config.key_claim_name;
        let key = match token.claims.get(name).or_else(|| token.header.get(name)) {
            None | Some(Value::Null) => return Err(no_credential(&self.no_key_claim)),
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(_) => return Err(no_credential(&self.invalid_key_claim)),
        };
        let index = *self.secrets.get(key).ok_or_else(|| no_credential(&self.no_credentials))?;
        let secret = &self.credentials[index];
        if token.algorithm != secret.algorithm {
            return Err("Invalid algorithm".into());
        }
        let valid = match &secret.hmac {
            Some(hmac) => hmac.verify(token.signature, token.signed.as_bytes()),
            None => {
                jsonwebtoken::crypto::verify(token.signature, token.signed.as_bytes(), &secret.key, secret.algorithm)
                    .unwrap_or(false)
            }
        };
        if !valid {
            return Err("Invalid signature".into());
        }
        Ok(index)
    }

    /// The JWK set path: the key's algorithms, the signature, the registered claims (an `exp`
    /// always), `issuer`, `audience`, then the consumer `consumer_claim` names.
    fn verify_with_jwk(&self, token: &Token<'_>, key: &JwksKey) -> Result<Verified<'_>, Refusal> {
        if !key.algorithms.contains(&token.algorithm) {
            return Err("Invalid algorithm".into());
        }
        match jsonwebtoken::crypto::verify(token.signature, token.signed.as_bytes(), &key.key, token.algorithm) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err("Invalid signature".into()),
        }
        self.check_times(TimeClaims::of(&token.claims), token.claims.contains_key("exp"))?;
        if !self.issuers.is_empty() {
            match token.claims.get("iss") {
                None | Some(Value::Null) => return Err("No mandatory 'iss' in claims".into()),
                Some(Value::String(iss)) if self.issuers.contains(iss) => {}
                Some(_) => return Err("Invalid 'iss' in claims".into()),
            }
        }
        if !self.audiences.is_empty() {
            let accepted = |aud: &Value| aud.as_str().is_some_and(|a| self.audiences.iter().any(|x| x == a));
            match token.claims.get("aud") {
                None | Some(Value::Null) => return Err("No mandatory 'aud' in claims".into()),
                Some(Value::Array(auds)) if auds.iter().any(accepted) => {}
                Some(aud) if accepted(aud) => {}
                Some(_) => return Err("Invalid 'aud' in claims".into()),
            }
        }
        let who = self
            .config
            .consumer_claim
            .as_ref()
            .and_then(|claim| token.claims.get(claim))
            .and_then(Value::as_str)
            .and_then(|name| self.consumers_by_claim.get(name));
        // The credential names the subject when the token has one, so per-credential limits
        // count each user of a shared key separately.
        let (credential, credential_value) = match token.claims.get("sub").and_then(Value::as_str) {
            Some(sub) => {
                let c = format!("{}:{sub}", key.credential);
                match HeaderValue::from_str(&c) {
                    Ok(v) => (Arc::from(c), v),
                    Err(_) => (key.credential.clone(), key.credential_value.clone()),
                }
            }
            None => (key.credential.clone(), key.credential_value.clone()),
        };
        Ok(Verified::Jwks { who, credential, credential_value })
    }

    /// `claims_to_verify` and `maximum_expiration`; `exp_present`: the token has an `exp`,
    /// to be checked even when not listed (the JWK set path).
    fn check_times(&self, times: TimeClaims, exp_present: bool) -> Result<(), Refusal> {
        let now = now();
        let mut errors = Map::new();
        let unlisted_exp =
            (exp_present && !self.claims_to_verify.contains(&RegisteredClaim::Exp)).then_some(RegisteredClaim::Exp);
        for claim in self.claims_to_verify.iter().copied().chain(unlisted_exp) {
            let message = match times.get(claim) {
                None => "must be a number",
                Some(exp) if claim == RegisteredClaim::Exp && exp <= now => "token expired",
                Some(nbf) if claim == RegisteredClaim::Nbf && nbf > now => "token not valid yet",
                Some(_) => continue,
            };
            errors.insert(claim.name().to_string(), message.into());
        }
        if !errors.is_empty() {
            return Err(Refusal::Claims(errors));
        }
        if self.config.maximum_expiration > 0.0 {
            let exp = times.exp;
            if exp.is_none_or(|exp| exp - now > self.config.maximum_expiration) {
                errors.insert("exp".into(), "exceeds maximum allowed expiration".into());
                return Err(Refusal::Claims(errors));
            }
        }
        Ok(())
    }

    fn refuse(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>, refusal: Refusal) -> ControlFlow<Answer> {
        anonymous_or(ctx, req, self.anonymous.as_ref(), |ctx| self.unauthorized(ctx, refusal))
    }

    fn skip(&self, ctx: &RequestContext, req: &mut Request<ProxyBody>) -> bool {
        steps_aside(self.config.run_on_preflight, self.anonymous.is_some(), ctx, req)
    }
}

impl Plugin for Jwt {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        if self.skip(ctx, req) {
            return ControlFlow::Continue(());
        }
        match self.find_token(req) {
            Lookup::Missing => self.refuse(ctx, req, "Unauthorized".into()),
            Lookup::Multiple => self.refuse(ctx, req, "Multiple tokens provided".into()),
            Lookup::Token(token) => match self.authenticate(&token) {
                Ok(Verified::Secret(secret)) => {
                    set_consumer(ctx, req, &secret.who, false);
                    ControlFlow::Continue(())
                }
                Ok(Verified::Jwks { who, credential, credential_value }) => {
                    match who {
                        // The identity carries no credential: the key's is set below.
                        Some(who) => set_consumer(ctx, req, who, false),
                        None => {
                            strip_identity_headers(req);
                            ctx.consumer = None;
                        }
                    }
                    req.headers_mut().insert(CREDENTIAL_IDENTIFIER.clone(), credential_value);
                    ctx.credential = Some(credential);
                    ControlFlow::Continue(())
                }
                Err(refusal) => self.refuse(ctx, req, refusal),
            },
        }
    }

    fn is_async(&self) -> bool {
        matches!(self.jwks, Some(Jwks::Remote(_)))
    }

    fn access_async<'a>(
        &'a self,
        ctx: &'a mut RequestContext,
        req: &'a mut Request<ProxyBody>,
    ) -> BoxFuture<'a, ControlFlow<Answer>> {
        Box::pin(async move {
            if let Some(Jwks::Remote(remote)) = &self.jwks {
                remote.ensure_started().await;
            }
            self.access(ctx, req)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal only when every byte is: a difference in any word or in the tail, or a length
    /// that differs, makes them unequal.
    #[test]
    fn word_comparison_tells_every_difference() {
        let token: Vec<u8> = (0..=42u8).collect();
        for len in [0, 1, 7, 8, 9, 16, 42, 43] {
            let a = &token[..len];
            assert!(ct_eq_words(a, a), "{len}");
            for at in 0..len {
                let mut b = a.to_vec();
                b[at] ^= 0x20;
                assert!(!ct_eq_words(a, &b), "{len} bytes, differing at {at}");
            }
        }
        assert!(!ct_eq_words(&token[..8], &token[..9]));
        assert!(!ct_eq_words(&token[..9], &token[..8]));
    }

    fn times(exp: f64) -> TimeClaims {
        TimeClaims { exp: Some(exp), nbf: None }
    }

    /// The keyed HMAC answers as `jsonwebtoken::crypto::verify` does, for every HMAC algorithm
    /// and for signatures that are right, wrong, cut, padded, too long or in the other base64
    /// alphabet.
    #[test]
    fn keyed_hmacs_verify_as_jsonwebtoken_does() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let secret = b"a-shared-secret";
        for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(algorithm),
                &serde_json::json!({"iss": "k"}),
                &jsonwebtoken::EncodingKey::from_secret(secret),
            )
            .unwrap();
            let (signed, signature) = token.rsplit_once('.').unwrap();
            let mac = URL_SAFE_NO_PAD.decode(signature).unwrap();
            let cases = [
                (signed.to_string(), signature.to_string()),
                (format!("{signed}x"), signature.to_string()),
                (signed.to_string(), URL_SAFE_NO_PAD.encode(&mac[1..])),
                (signed.to_string(), format!("{signature}=")),
                (signed.to_string(), STANDARD.encode(&mac)),
                (signed.to_string(), URL_SAFE_NO_PAD.encode([&mac[..], &mac[..]].concat())),
                (signed.to_string(), String::new()),
                (signed.to_string(), "!!".to_string()),
            ];
            let keyed = HmacKey::new(algorithm, secret).expect("an HMAC algorithm");
            let key = DecodingKey::from_secret(secret);
            for (i, (message, signature)) in cases.iter().enumerate() {
                let theirs =
                    jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key, algorithm).unwrap_or(false);
                assert_eq!(keyed.verify(signature, message.as_bytes()), theirs, "{algorithm:?}, case {i}");
                assert_eq!(theirs, i == 0, "{algorithm:?}, case {i}");
            }
        }
        assert!(HmacKey::new(Algorithm::RS256, secret).is_none());
    }

    #[test]
    fn the_token_cache_answers_only_for_the_exact_token() {
        let cache = TokenCache::new();
        assert!(cache.get("a.b.c").is_none(), "nothing is remembered before an insert");
        cache.insert("a.b.c", 3, times(7.0));
        let (credential, t) = cache.get("a.b.c").expect("remembered");
        assert_eq!((credential, t.exp, t.nbf), (3, Some(7.0), None));
        // A token that lands on the same place is not the remembered one...
        let other = (0..100_000)
            .map(|i| format!("a.b.{i}"))
            .find(|t| cache.place(t) == cache.place("a.b.c"))
            .expect("1,024 places: a collision within 100,000 tokens");
        assert!(cache.get(&other).is_none());
        // ...and replaces it.
        cache.insert(&other, 1, times(9.0));
        assert_eq!(cache.get(&other).map(|(c, _)| c), Some(1));
        assert!(cache.get("a.b.c").is_none());
        // Too long to remember.
        let long = "x".repeat(MAX_CACHED_TOKEN_BYTES + 1);
        cache.insert(&long, 0, times(1.0));
        assert!(cache.get(&long).is_none());
        // Another thread remembers nothing of this one's.
        std::thread::scope(|s| {
            s.spawn(|| assert!(cache.get(&other).is_none()));
        });
    }
}
