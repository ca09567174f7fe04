//! TLS on both sides: certificates chosen by SNI for the gateway's listeners, and verified
//! client configs for `https`/`grpcs` upstreams. rustls runs on its `ring` provider: it builds
//! with a C compiler alone (no cmake, no Go, unlike aws-lc-rs), which keeps a cold build on a
//! fresh machine short, and it offers the same TLS 1.2/1.3 suites that matter here.
//!
//! Certificates come from the config's `certificates` and `snis` entities:
//!
//! ```
//! use gateway_core::config::Config;
//!
//! let config = Config::from_yaml(r#"
//! _format_version: "3.0"
//! certificates:
//!   - id: api-cert
//!     cert: /etc/gateway/api.crt   # or the PEM text itself
//!     key: /etc/gateway/api.key
//!     snis: ["api.example.com", "*.api.example.com"]
//! "#).unwrap();
//! assert_eq!(config.certificates[0].snis[1].name(), "*.api.example.com");
//! ```
//!
//! The certificates live in the snapshot, so a reload swaps them like routes: new handshakes
//! see the new set, open connections keep the session they negotiated.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::Config;

/// The one crypto provider of the gateway.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// Server certificates by name, compiled from the config.
#[derive(Debug, Default)]
pub(crate) struct CertStore {
    /// Exact names and wildcard patterns (`*.example.com`, `example.*`), lower case.
    by_name: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// For clients that send no name, or one nothing matches.
    default: Option<Arc<CertifiedKey>>,
}

impl CertStore {
    /// The certificate for a client hello's server name: exact name, then `*.rest`, then
    /// `first.*`, then the default.
    pub(crate) fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            // rustls hands over the name lower-cased already.
            if let Some(c) = self.by_name.get(name) {
                return Some(c.clone());
            }
            if let Some((_, rest)) = name.split_once('.') {
                let mut key = String::with_capacity(rest.len() + 2);
                key.push_str("*.");
                key.push_str(rest);
                if let Some(c) = self.by_name.get(key.as_str()) {
                    return Some(c.clone());
                }
            }
            if let Some((first, _)) = name.rsplit_once('.') {
                let key = format!("{first}.*");
                if let Some(c) = self.by_name.get(key.as_str()) {
                    return Some(c.clone());
                }
            }
        }
        self.default.clone()
    }

    /// Serves `key` for `name` (`*`: the default), or reports why not.
    fn insert(&mut self, at: String, name: &str, key: &Arc<CertifiedKey>, problem: &mut dyn FnMut(String, String)) {
        match check_sni(name) {
            Ok(n) if n == "*" => {
                if self.default.replace(key.clone()).is_some() {
                    problem(at, "SNI `*` is given twice".into());
                }
            }
            Ok(n) => {
                if self.by_name.insert(n.into(), key.clone()).is_some() {
                    problem(at, format!("SNI `{name}` is given twice"));
                }
            }
            Err(e) => problem(at, e),
        }
    }

    /// Whether no certificate is loaded.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_name.is_empty() && self.default.is_none()
    }
}

/// Reads a PEM value: the text itself when it holds a PEM header, else a file path.
pub(crate) fn pem_bytes(value: &str) -> Result<Vec<u8>, String> {
    if value.contains("-----BEGIN") {
        return Ok(value.as_bytes().to_vec());
    }
    std::fs::read(value.trim()).map_err(|e| format!("cannot read PEM file `{}`: {e}", value.trim()))
}

/// Every certificate in a PEM value.
pub(crate) fn parse_certs(value: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = pem_bytes(value)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no `-----BEGIN CERTIFICATE-----` block found".into());
    }
    Ok(certs)
}

fn certified_key(cert: &str, key: &str) -> Result<Arc<CertifiedKey>, String> {
    let chain = parse_certs(cert).map_err(|e| format!("`cert`: {e}"))?;
    let key_pem = pem_bytes(key).map_err(|e| format!("`key`: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("`key`: no usable private key: {e}"))?;
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| format!("`cert` and `key` do not make a usable pair: {e}"))
}

fn check_sni(name: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    let bare = lower.strip_prefix("*.").or_else(|| lower.strip_suffix(".*")).unwrap_or(&lower);
    let valid = !bare.is_empty()
        && !bare.contains('*')
        && bare.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if lower == "*" || valid {
        Ok(lower)
    } else {
        Err(format!("invalid SNI `{name}` (a DNS name, `*.` or `.*` wildcard at one end, or `*`)"))
    }
}

/// Compiles `certificates` and `snis`; problems go to `problem(at, message)`.
pub(crate) fn compile_certificates(config: &Config, problem: &mut dyn FnMut(String, String)) -> CertStore {
    let mut store = CertStore::default();
    let mut by_id: HashMap<&str, Arc<CertifiedKey>> = HashMap::new();
    let mut first_without_snis = None;
    for (i, c) in config.certificates.iter().enumerate() {
        let at = format!("certificates[{i}]");
        let unsupported =
            crate::config::unsupported_fields(&[("cert_alt", &c.cert_alt, &[]), ("key_alt", &c.key_alt, &[])]);
        for f in &unsupported {
            problem(at.clone(), format!("`{f}` is a Kong field this gateway does not support yet"));
        }
        if !unsupported.is_empty() {
            continue;
        }
        let key = match certified_key(&c.cert, &c.key) {
            Ok(k) => k,
            Err(e) => {
                problem(at, e);
                continue;
            }
        };
        if let Some(id) = &c.id
            && by_id.insert(id, key.clone()).is_some()
        {
            problem(at.clone(), format!("duplicate certificate id `{id}`"));
        }
        if c.snis.is_empty() && first_without_snis.is_none() {
            first_without_snis = Some(key.clone());
        }
        for (j, sni) in c.snis.iter().enumerate() {
            store.insert(format!("{at}.snis[{j}]"), sni.name(), &key, problem);
        }
    }
    for (i, sni) in config.snis.iter().enumerate() {
        let at = format!("snis[{i}] (name \"{}\")", sni.name);
        match sni.certificate.key().and_then(|k| by_id.get(k)) {
            Some(key) => store.insert(at, &sni.name, key, problem),
            None => problem(
                at,
                format!("certificate `{}` does not exist (or failed to load)", sni.certificate.key().unwrap_or("?")),
            ),
        }
    }
    if store.default.is_none() {
        store.default = first_without_snis;
    }
    store
}

/// Resolves server certificates from whatever store the current snapshot holds, falling back
/// to a self-signed certificate (as Kong does) so that a TLS listener always answers.
pub(crate) struct SnapshotCerts {
    pub(crate) current: Box<dyn Fn() -> Arc<CertStore> + Send + Sync>,
    pub(crate) fallback: Arc<CertifiedKey>,
}

impl std::fmt::Debug for SnapshotCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotCerts").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for SnapshotCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = (self.current)();
        Some(store.resolve(hello.server_name()).unwrap_or_else(|| self.fallback.clone()))
    }
}

/// A self-signed certificate for `localhost`, made at startup: what a TLS listener serves
/// when the config has no certificate for a client.
pub(crate) fn self_signed() -> Result<Arc<CertifiedKey>, String> {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der()).map_err(|e| e.to_string())?;
    CertifiedKey::from_der(vec![generated.cert.der().clone()], key, &provider())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// The listeners' TLS config: TLS 1.2 and 1.3, rustls' default suites, ALPN `h2` then
/// `http/1.1`, certificates from `resolver`.
pub(crate) fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The system's trust roots, loaded once.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "while loading the system's CA certificates");
            }
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    "no system CA certificates found: https upstreams will fail verification unless they name `ca_certificates`"
                );
            }
            Arc::new(roots)
        })
        .clone()
}

/// How a service verifies its upstream: the key of the upstream client cache, next to the
/// timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct UpstreamTls {
    /// `tls_verify: false` turns verification off.
    pub(crate) skip_verify: bool,
    /// The service's own CA certificates; `None` means the system's roots.
    pub(crate) roots: Option<Arc<[CertificateDer<'static>]>>,
}

/// A client config for upstream TLS, without ALPN: the connector adds `h2` for gRPC services
/// and nothing otherwise (HTTP/1.1, what Kong speaks to https upstreams).
pub(crate) fn client_config(tls: &UpstreamTls) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3");
    if tls.skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider()))).with_no_client_auth()
    } else {
        let roots = match &tls.roots {
            None => system_roots(),
            Some(certs) => {
                let mut store = RootCertStore::empty();
                store.add_parsable_certificates(certs.iter().cloned());
                Arc::new(store)
            }
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    }
}

/// `tls_verify: false`: accepts any certificate, but still checks that the peer holds its key.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str]) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn problems(yaml: &str) -> (CertStore, Vec<String>) {
        let config = Config::from_yaml(yaml).unwrap();
        let mut out = Vec::new();
        let store = compile_certificates(&config, &mut |at, m| out.push(format!("{at}: {m}")));
        (store, out)
    }

    #[test]
    fn names_resolve_exact_then_wildcards_then_default() {
        let (a_cert, a_key) = pair(&["a.example.com"]);
        let (w_cert, w_key) = pair(&["*.example.com"]);
        let (d_cert, d_key) = pair(&["default"]);
        let yaml = format!(
            "_format_version: \"3.0\"\ncertificates:\n- {{cert: {a_cert:?}, key: {a_key:?}, snis: [a.example.com]}}\n- {{id: w, cert: {w_cert:?}, key: {w_key:?}}}\n- {{cert: {d_cert:?}, key: {d_key:?}, snis: [{{name: \"*\"}}]}}\nsnis:\n- {{name: \"*.example.com\", certificate: {{id: w}}}}\n- {{name: \"api.*\", certificate: w}}\n"
        );
        let (store, errs) = problems(&yaml);
        assert!(errs.is_empty(), "{errs:?}");
        let der = |k: Option<Arc<CertifiedKey>>| k.unwrap().cert[0].clone();
        let a = der(store.resolve(Some("a.example.com")));
        let w = der(store.resolve(Some("b.example.com")));
        let d = der(store.resolve(None));
        assert_ne!(a, w);
        assert_ne!(w, d);
        assert_eq!(der(store.resolve(Some("api.internal"))), w);
        assert_eq!(der(store.resolve(Some("x.b.example.com"))), d, "a wildcard covers one label");
        assert_eq!(der(store.resolve(Some("other.org"))), d);
    }

    #[test]
    fn bad_certificates_are_reported_by_position() {
        let (cert, key) = pair(&["a"]);
        let (_, other_key) = pair(&["b"]);
        let yaml = format!(
            "_format_version: \"3.0\"\ncertificates:\n- {{cert: \"-----BEGIN CERTIFICATE-----\\nn*pe\\n-----END CERTIFICATE-----\\n\", key: x}}\n- {{cert: {cert:?}, key: {other_key:?}}}\n- {{cert: /no/such/file.pem, key: /no/such/key.pem}}\n- {{cert: {cert:?}, key: {key:?}, snis: [\"a.*.b\"]}}\nsnis:\n- {{name: x.org, certificate: missing}}\n"
        );
        let (_, errs) = problems(&yaml);
        let want = [
            "certificates[0]: `cert`: invalid PEM",
            "certificates[1]: `cert` and `key` do not make a usable pair",
            "certificates[2]: `cert`: cannot read PEM file `/no/such/file.pem`",
            "certificates[3].snis[0]: invalid SNI `a.*.b`",
            "snis[0] (name \"x.org\"): certificate `missing` does not exist",
        ];
        for w in want {
            assert!(errs.iter().any(|e| e.starts_with(w)), "missing {w:?} in {errs:#?}");
        }
    }
}
