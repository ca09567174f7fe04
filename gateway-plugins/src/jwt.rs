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
//! - like this crate's key-auth, `anonymous` stands in only when the request carries no token;
//!   a token that fails to authenticate is refused even when `anonymous` is set;
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

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use gateway_core::body::{ProxyBody, ResponseBody};
use gateway_core::plugin::{Answer, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, header};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::identity::{Identity, anonymous_consumer, set_consumer, strip_identity_headers, www_authenticate};

/// Kong's priority for jwt.
pub const PRIORITY: i32 = 1450;
/// Kong's upper bound for `maximum_expiration`: one year, in seconds.
const MAX_MAXIMUM_EXPIRATION: f64 = 31_536_000.0;

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
    /// Headers to look for `Bearer <token>` in.
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
}

/// The jwt plugin.
pub struct Jwt {
    config: JwtConfig,
    header_names: Vec<HeaderName>,
    claims_to_verify: Vec<RegisteredClaim>,
    secrets: HashMap<String, Secret>,
    anonymous: Option<Identity>,
    www_authenticate: HeaderValue,
    no_key_claim: String,
    invalid_key_claim: String,
    no_credentials: String,
}

/// The factory to register.
pub fn factory() -> TypedFactory<JwtConfig, impl Fn(JwtConfig, &BuildContext<'_>) -> Result<Jwt, String> + Send + Sync>
{
    typed_factory("jwt", PRIORITY, Jwt::new).with_credentials(&["jwt_secrets"])
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

/// A token, split and decoded; its signature not yet checked.
struct Token<'t> {
    header: Map<String, Value>,
    claims: Map<String, Value>,
    algorithm: Algorithm,
    /// `header.claims`, the signed text.
    signed: &'t str,
    signature: &'t str,
}

/// Splits and decodes a compact JWS, with Kong's messages for what cannot be read.
fn decode(token: &str) -> Result<Token<'_>, &'static str> {
    const BAD_JSON: &str = "Bad token; invalid JSON";
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
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("`header_names`: `{n}` is not a valid header name"))
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
            let secret = Secret { who: Identity::new(consumer.clone(), Some(credential)), algorithm, key };
            if secrets.insert(cred.key.clone(), secret).is_some() {
                return Err(context(&format!("key `{}` is not unique", cred.key)));
            }
        }
        let anonymous = anonymous_consumer(build, config.anonymous.as_deref())?;
        let www_authenticate = www_authenticate("Bearer", config.realm.as_deref())?;
        let name = &config.key_claim_name;
        Ok(Jwt {
            no_key_claim: format!("No mandatory '{name}' in claims"),
            invalid_key_claim: format!("Invalid '{name}' in claims"),
            no_credentials: format!("No credentials found for given '{name}'"),
            config,
            header_names,
            claims_to_verify,
            secrets,
            anonymous,
            www_authenticate,
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

    /// Kong's checks, in Kong's order: decode, credential, algorithm, signature, claims.
    fn authenticate(&self, token: &str) -> Result<&Secret, Refusal> {
        let token = decode(token)?;
        let name = &self.config.key_claim_name;
        let key = match token.claims.get(name).or_else(|| token.header.get(name)) {
            None | Some(Value::Null) => return Err(Refusal::Message(self.no_key_claim.clone())),
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(_) => return Err(Refusal::Message(self.invalid_key_claim.clone())),
        };
        let secret = self.secrets.get(key).ok_or_else(|| Refusal::Message(self.no_credentials.clone()))?;
        if token.algorithm != secret.algorithm {
            return Err("Invalid algorithm".into());
        }
        match jsonwebtoken::crypto::verify(token.signature, token.signed.as_bytes(), &secret.key, secret.algorithm) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err("Invalid signature".into()),
        }
        let now = now();
        let mut errors = Map::new();
        for claim in &self.claims_to_verify {
            let message = match token.claims.get(claim.name()).and_then(Value::as_f64) {
                None => "must be a number",
                Some(exp) if *claim == RegisteredClaim::Exp && exp <= now => "token expired",
                Some(nbf) if *claim == RegisteredClaim::Nbf && nbf > now => "token not valid yet",
                Some(_) => continue,
            };
            errors.insert(claim.name().to_string(), message.into());
        }
        if !errors.is_empty() {
            return Err(Refusal::Claims(errors));
        }
        if self.config.maximum_expiration > 0.0 {
            let exp = token.claims.get("exp").and_then(Value::as_f64);
            if exp.is_none_or(|exp| exp - now > self.config.maximum_expiration) {
                errors.insert("exp".into(), "exceeds maximum allowed expiration".into());
                return Err(Refusal::Claims(errors));
            }
        }
        Ok(secret)
    }

    /// Kong's rule for several auth plugins with `anonymous`: if another one already
    /// authenticated the request, this one steps aside.
    fn skip(&self, ctx: &RequestContext, req: &Request<ProxyBody>) -> bool {
        (!self.config.run_on_preflight && req.method() == Method::OPTIONS)
            || (self.anonymous.is_some() && ctx.credential.is_some())
    }
}

impl Plugin for Jwt {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        if self.skip(ctx, req) {
            return ControlFlow::Continue(());
        }
        strip_identity_headers(req);
        match self.find_token(req) {
            Lookup::Missing => match &self.anonymous {
                Some(anon) => {
                    set_consumer(ctx, req, anon, true);
                    ControlFlow::Continue(())
                }
                None => ControlFlow::Break(self.unauthorized(ctx, "Unauthorized".into())),
            },
            Lookup::Multiple => ControlFlow::Break(self.unauthorized(ctx, "Multiple tokens provided".into())),
            Lookup::Token(token) => match self.authenticate(&token) {
                Ok(secret) => {
                    set_consumer(ctx, req, &secret.who, false);
                    ControlFlow::Continue(())
                }
                Err(refusal) => ControlFlow::Break(self.unauthorized(ctx, refusal)),
            },
        }
    }
}
