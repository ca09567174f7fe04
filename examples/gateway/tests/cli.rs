//! The `gateway` binary, run as a user would: real processes, real files, real signals.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gateway-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A blocking upstream that answers every request with its request line's target (see
/// [`spawn_slow_upstream`]).
fn spawn_upstream() -> SocketAddr {
    spawn_slow_upstream()
}

/// One request on a fresh connection; returns (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

fn config(upstream: SocketAddr, prefix: &str) -> String {
    format!(
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://{upstream}{prefix}\n  routes:\n  - name: r\n    paths: [\"/\"]\n"
    )
}

struct Running {
    child: Child,
    tls: SocketAddr,
    stderr: Arc<Mutex<String>>,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Running {
    fn start(config: &Path) -> Running {
        Running::start_with(config, &[], &[])
    }

    fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Running {
        Running::start_with(config, &[], env)
    }

    fn start_with(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Running {
        Running::start_source(&[std::ffi::OsStr::new("--config"), config.as_os_str()], args, env)
    }

    /// Runs `gateway run SOURCE... ARGS...` on free loopback ports.
    fn start_source(source: &[&std::ffi::OsStr], args: &[&str], env: &[(&str, &str)]) -> Running {
        let addr = free_port();
        let admin = free_port();
        let tls = free_port();
        let mut child = bin()
            .arg("run")
            .args(source)
            .args(["--listen", &addr.to_string(), "--admin-listen", &admin.to_string(), "--workers", "2"])
            .args(["--listen-tls", &tls.to_string()])
            .args(["--shutdown-grace", "5s"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let r = Running { child, tls, stderr, addr, admin };
        r.wait_for(|| http_get(addr, "/").is_some(), "the gateway to listen");
        r
    }

    fn wait_for(&self, mut cond: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}; stderr:\n{}", self.stderr.lock().unwrap());
    }

    /// Waits for the process to exit (at most 10 s) and returns its status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "still running 10 s after the signal");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn validate_accepts_a_good_file_and_explains_a_bad_one() {
    let dir = temp_dir("validate");
    let good = dir.join("good.yml");
    std::fs::write(&good, config("127.0.0.1:9".parse().unwrap(), "")).unwrap();
    let out = bin().arg("validate").arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A plugin that refuses its config: the gateway would serve the rest, but the file is
    // not valid, and the problem says where.
    let plugin = dir.join("plugin.yml");
    std::fs::write(
        &plugin,
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://127.0.0.1:9\n  routes:\n  - name: r\n    paths: [/]\n    plugins: [{name: jwt, config: {colour: red}}]\n",
    )
    .unwrap();
    let out = bin().arg("validate").arg(&plugin).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plugin.yml") && err.contains("routes[0]") && err.contains("colour"), "{err}");
    assert_eq!(err.matches("colour").count(), 1, "said once: {err}");

    let bad = dir.join("bad.yml");
    std::fs::write(&bad, "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://127.0.0.1:9\n  colour: red\n")
        .unwrap();
    let out = bin().arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yml:5:"), "{err}");
    assert!(err.contains("unknown field `colour`"), "{err}");

    let semantic = dir.join("semantic.yml");
    std::fs::write(&semantic, "_format_version: \"3.0\"\nroutes:\n- name: r\n  paths: [\"~/(\"]\n").unwrap();
    let out = bin().arg("validate").arg(&semantic).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("semantic.yml: routes[0] (name \"r\").paths[0]: invalid regex"), "{err}");
}

#[test]
fn routes_prints_the_table_in_precedence_order() {
    let dir = temp_dir("routes");
    let file = dir.join("kong.yml");
    std::fs::write(
        &file,
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://127.0.0.1:9\n  routes:\n  - {name: catch-all, paths: [\"/\"]}\n  - {name: api, paths: [\"/api\"]}\n  - {name: host, hosts: [a.example], paths: [\"/\"]}\n",
    )
    .unwrap();
    let out = bin().args(["routes", "--config"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let order: Vec<&str> = text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert_eq!(order, vec!["host", "api", "catch-all"], "{text}");
}

#[test]
fn run_reloads_on_file_change_and_rename_and_survives_a_bad_file() {
    let upstream = spawn_upstream();
    let dir = temp_dir("reload");
    let file = dir.join("kong.yml");
    std::fs::write(&file, config(upstream, "/one")).unwrap();
    let gw = Running::start(&file);
    assert_eq!(http_get(gw.addr, "/x").unwrap(), (200, "/one/x".to_string()));

    // Edit in place: the file watcher reloads.
    std::fs::write(&file, config(upstream, "/two")).unwrap();
    gw.wait_for(|| http_get(gw.addr, "/x").is_some_and(|r| r.1 == "/two/x"), "the file change to apply");

    // A broken file is refused; the running config keeps serving.
    std::fs::write(&file, "_format_version: \"3.0\"\nservices: [{name: s, url: http://x, bogus: 1}]\n").unwrap();
    gw.wait_for(|| gw.stderr.lock().unwrap().contains("config rejected"), "the bad file to be rejected");
    assert!(gw.stderr.lock().unwrap().contains("unknown field `bogus`"));
    assert_eq!(http_get(gw.addr, "/x").unwrap(), (200, "/two/x".to_string()));

    // Replace the file by rename, as editors do.
    let tmp = dir.join("kong.yml.tmp");
    std::fs::write(&tmp, config(upstream, "/three")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    gw.wait_for(|| http_get(gw.addr, "/x").is_some_and(|r| r.1 == "/three/x"), "the renamed file to apply");
}

#[test]
fn run_reloads_on_sighup_and_follows_a_configmap_style_symlink_swap() {
    let upstream = spawn_upstream();
    let dir = temp_dir("sighup");
    // Kubernetes mounts ConfigMaps as dir/kong.yml -> ..data/kong.yml, ..data -> ..v1.
    let v1 = dir.join("..v1");
    let v2 = dir.join("..v2");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v1.join("kong.yml"), config(upstream, "/one")).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/kong.yml", dir.join("kong.yml")).unwrap();
    let gw = Running::start(&dir.join("kong.yml"));
    assert_eq!(http_get(gw.addr, "/x").unwrap(), (200, "/one/x".to_string()));

    // Editing the target in its own folder is invisible to the watcher: only SIGHUP applies it.
    std::fs::write(v1.join("kong.yml"), config(upstream, "/edited")).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(http_get(gw.addr, "/x").unwrap(), (200, "/one/x".to_string()), "reloaded without a trigger");
    gw.signal("-HUP");
    gw.wait_for(|| http_get(gw.addr, "/x").is_some_and(|r| r.1 == "/edited/x"), "the SIGHUP reload");

    // The ConfigMap update: a new version folder and an atomic swap of `..data`.
    std::fs::write(v2.join("kong.yml"), config(upstream, "/two")).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    gw.wait_for(|| http_get(gw.addr, "/x").is_some_and(|r| r.1 == "/two/x"), "the symlink swap to apply");
}

#[test]
fn sigterm_stops_the_gateway_cleanly() {
    let upstream = spawn_upstream();
    let dir = temp_dir("term");
    let file = dir.join("kong.yml");
    std::fs::write(&file, config(upstream, "")).unwrap();
    let mut gw = Running::start(&file);
    gw.signal("-TERM");
    let status = gw.wait_exit();
    assert!(status.success(), "exit status {status}");
    assert!(http_get(gw.addr, "/").is_none(), "still accepting after exit");
}

#[test]
fn a_bad_config_at_start_exits_1_with_the_problem() {
    let dir = temp_dir("badstart");
    let file = dir.join("kong.yml");
    std::fs::write(&file, "_format_version: \"1.1\"\n").unwrap();
    let out = bin()
        .args(["run", "--config"])
        .arg(&file)
        .args(["--listen", &free_port().to_string(), "--listen-tls", "off"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only \"3.0\" is supported"));
}

/// The admin API answers on the admin listener; with `GATEWAY_ADMIN_TOKEN` set, only to the
/// token (probes excepted).
#[test]
fn admin_api_on_the_admin_listener_with_a_token() {
    let upstream = spawn_upstream();
    let dir = temp_dir("admin");
    let file = dir.join("kong.yml");
    std::fs::write(&file, config(upstream, "")).unwrap();
    let gw = Running::start_with_env(&file, &[("GATEWAY_ADMIN_TOKEN", "s3cret-t0ken")]);
    gw.wait_for(|| http_get(gw.admin, "/healthz").is_some_and(|(s, _)| s == 200), "the admin listener");
    assert_eq!(http_get(gw.admin, "/readyz").unwrap().0, 200);
    assert_eq!(http_get(gw.admin, "/services").unwrap().0, 401);
    let mut s = TcpStream::connect(gw.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /services HTTP/1.1\r\nhost: a\r\nauthorization: Bearer s3cret-t0ken\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains(r#""name":"s""#), "{out}");
    assert!(!gw.stderr.lock().unwrap().contains("s3cret-t0ken"), "the token must not be logged");
}

/// `--log-format json`: every stderr line is a JSON object; the access log line carries the
/// request. `--latency-headers` adds the latency headers.
#[test]
fn json_logs_and_latency_headers() {
    let upstream = spawn_upstream();
    let dir = temp_dir("jsonlog");
    let file = dir.join("kong.yml");
    std::fs::write(&file, config(upstream, "")).unwrap();
    let gw = Running::start_with(&file, &["--log-format", "json", "--latency-headers"], &[]);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /logged?apikey=hidden HTTP/1.1\r\nhost: logs.test\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.to_ascii_lowercase().contains("x-gateway-upstream-latency: "), "{out}");
    gw.wait_for(|| gw.stderr.lock().unwrap().contains("/logged"), "the access log line");
    let text = gw.stderr.lock().unwrap().clone();
    let mut access = None;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "gateway::access" && v["path"] == "/logged" {
            access = Some(v);
        }
    }
    let access = access.expect("an access line");
    assert_eq!(access["status"], 200);
    assert_eq!(access["host"], "logs.test");
    assert_eq!(access["route"], "r");
    assert_eq!(access["upstream"], upstream.to_string());
    assert!(access["latency_us"].as_u64().is_some());
    assert!(!text.contains("hidden"), "query strings stay out of the log");
}

/// `--access-log off`: requests are served and no access line is written, even once the
/// gateway has drained and flushed its logs on SIGTERM.
#[test]
fn access_log_off_writes_no_access_line() {
    let upstream = spawn_upstream();
    let dir = temp_dir("nolog");
    let file = dir.join("kong.yml");
    std::fs::write(&file, config(upstream, "")).unwrap();
    let mut gw = Running::start_with(&file, &["--log-format", "json", "--access-log", "off"], &[]);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /quiet HTTP/1.1\r\nhost: logs.test\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    Command::new("kill").args(["-TERM", &gw.child.id().to_string()]).status().unwrap();
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "{status}");
    gw.wait_for(|| gw.stderr.lock().unwrap().contains("stopped"), "the shutdown line");
    let text = gw.stderr.lock().unwrap().clone();
    assert!(!text.contains("gateway::access"), "{text}");
}

/// The upstream connection flags are parsed, and a bad value names the flag.
#[test]
fn upstream_flags_are_checked() {
    let out = bin().args(["run", "--config", "x.yml", "--dns-resolver", "dns.example"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dns-resolver") && err.contains("not a nameserver address"), "{err}");
    let out = bin().args(["run", "--config", "x.yml", "--upstream-keepalive-idle-timeout", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream-keepalive-idle-timeout"));
    let out = bin().args(["run", "--config", "x.yml", "--trusted-ips", "10.0.0.0/8,proxy.local"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--trusted-ips") && err.contains("`proxy.local` is neither an IP address nor a CIDR"),
        "{err}"
    );
    // Limits come from flags or from the environment, checked alike.
    let out = bin().args(["run", "--config", "x.yml"]).env("GATEWAY_BODY_READ_TIMEOUT", "slowly").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--body-read-timeout") && err.contains("`slowly` is not a duration"), "{err}");
    // Good values get as far as reading the (missing) config.
    let out = bin()
        .args(["run", "--config", "/nonexistent/kong.yml", "--dns-resolver", "127.0.0.1:5353"])
        .args(["--body-read-timeout", "off", "--header-read-timeout", "5s"])
        .env("GATEWAY_MAX_HEADERS", "50")
        .args(["--trusted-ips", "10.0.0.0/8,192.168.1.1", "--trusted-ips", "::1"])
        .args(["--upstream-keepalive-pool-size", "0", "--upstream-keepalive-idle-timeout", "5s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/kong.yml"));
}

/// `--listen-tls` serves the config's certificates (here from PEM files) by SNI, and picks up
/// a new certificate when the config changes.
#[test]
fn listen_tls_serves_certificates_from_files_by_sni() {
    use rustls::pki_types::ServerName;
    let dir = temp_dir("tls");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str, file: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    };
    let api = leaf("api.example.com", "api");
    let upstream = spawn_upstream();
    let file = dir.join("kong.yml");
    let with_cert = |name: &str| {
        format!(
            "{}certificates:\n- cert: {}\n  key: {}\n  snis: [{name}]\n",
            config(upstream, ""),
            dir.join("api.crt").display(),
            dir.join("api.key").display()
        )
    };
    std::fs::write(&file, with_cert("api.example.com")).unwrap();
    let gw = Running::start(&file);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let get = |name: &str| -> Result<(Vec<u8>, String), String> {
        let server_name = ServerName::try_from(name.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(client.clone(), server_name).unwrap();
        let tcp = TcpStream::connect(gw.tls).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        write!(tls, "GET /over-tls HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        let _ = tls.read_to_string(&mut out);
        let peer = tls.conn.peer_certificates().ok_or("no certificate")?[0].to_vec();
        Ok((peer, out))
    };
    gw.wait_for(|| get("api.example.com").is_ok(), "the TLS listener");
    let (peer, out) = get("api.example.com").unwrap();
    assert_eq!(peer, api);
    assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("/over-tls"), "{out}");
    // Not covered by any certificate: the self-signed fallback, which the CA does not vouch for.
    assert!(get("other.example.com").is_err());

    // The same files now serve another name after a config change.
    let other = leaf("other.example.com", "api");
    std::fs::write(&file, with_cert("other.example.com")).unwrap();
    gw.wait_for(|| get("other.example.com").is_ok_and(|(p, _)| p == other), "the new certificate");
}

/// An upstream that answers with its request target, after a second when the target
/// contains `slow`.
fn spawn_slow_upstream() -> SocketAddr {
    spawn_counting_upstream(Arc::default())
}

/// [`spawn_slow_upstream`], counting the requests it has read (before any wait).
fn spawn_counting_upstream(seen: Arc<std::sync::atomic::AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut header = String::new();
                    while reader.read_line(&mut header).unwrap_or(0) > 0 && header != "\r\n" {
                        header.clear();
                    }
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if target.contains("slow") {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{}", target.len(), target);
                    if stream.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Manifests for one Ingress `/app` (host-less) to Service `app`, whose `konghq.com/path`
/// annotation is `prefix`, with the upstream in its EndpointSlice.
fn manifests(upstream: SocketAddr, prefix: &str) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{ name: app, namespace: default }}
spec:
  ingressClassName: gateway
  rules: [ {{ http: {{ paths: [ {{ path: /app, pathType: Prefix, backend: {{ service: {{ name: app, port: {{ number: 80 }} }} }} }} ] }} }} ]
---
apiVersion: v1
kind: Service
metadata: {{ name: app, namespace: default, annotations: {{ konghq.com/path: "{prefix}" }} }}
spec: {{ ports: [ {{ port: 80 }} ] }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: app-1, namespace: default, labels: {{ kubernetes.io/service-name: app }} }}
addressType: IPv4
ports: [ {{ port: {} }} ]
endpoints: [ {{ addresses: ["{}"] }} ]
"#,
        upstream.port(),
        upstream.ip()
    )
}

#[test]
fn run_manifests_serves_a_folder_and_follows_edits_without_dropping_requests() {
    let upstream = spawn_slow_upstream();
    let dir = temp_dir("manifests");
    std::fs::write(dir.join("app.yaml"), manifests(upstream, "/one")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a manifest, not read").unwrap();
    let gw = Running::start_source(&[std::ffi::OsStr::new("--manifests"), dir.as_os_str()], &[], &[]);
    gw.wait_for(
        || http_get(gw.addr, "/app/x").is_some_and(|r| r == (200, "/one/app/x".into())),
        "the Ingress to serve",
    );

    // A request in flight while the folder changes finishes on the config it started with.
    let addr = gw.addr;
    let in_flight = std::thread::spawn(move || http_get(addr, "/app/slow"));
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(dir.join("app.yaml"), manifests(upstream, "/two")).unwrap();
    gw.wait_for(|| http_get(gw.addr, "/app/x").is_some_and(|r| r.1 == "/two/app/x"), "the edit to apply");
    assert_eq!(in_flight.join().unwrap(), Some((200, "/one/app/slow".to_string())));

    // A new file with a broken document and a broken object: both reported, by file and by
    // object; the rest keeps serving.
    std::fs::write(
        dir.join("more.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: not-a-list}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: other}\nspec:\n  ingressClassName: gateway\n  \
         rules: [{http: {paths: [{path: /other, pathType: Prefix, backend: {service: {name: nope, port: {number: 80}}}}]}}]\n",
    )
    .unwrap();
    gw.wait_for(|| gw.stderr.lock().unwrap().contains("Service `default/nope` not found"), "the problems to be logged");
    let log = gw.stderr.lock().unwrap().clone();
    assert!(log.contains("Service broken: invalid type") && log.contains("more.yaml#1"), "{log}");
    assert_eq!(http_get(gw.addr, "/other").unwrap().0, 503);
    assert_eq!(http_get(gw.addr, "/app/x").unwrap(), (200, "/two/app/x".to_string()));
}

#[test]
fn k8s_translate_prints_the_config_and_the_problems() {
    let dir = temp_dir("translate");
    std::fs::write(dir.join("app.yaml"), manifests("127.0.0.1:9".parse().unwrap(), "/one")).unwrap();
    let out = bin().args(["k8s", "translate"]).arg(&dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("name: default.app.0.0") && stdout.contains("target: 127.0.0.1:9"), "{stdout}");

    std::fs::write(dir.join("bad.yaml"), "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: bad, annotations: {konghq.com/methods: \"G T\"}}\nspec: {ingressClassName: gateway, rules: [{http: {paths: [{path: /b, pathType: Prefix, backend: {service: {name: app, port: {number: 80}}}}]}}]}\n").unwrap();
    let out = bin().args(["k8s", "translate"]).arg(&dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("problem: Ingress default/bad: annotation `konghq.com/methods`: `G T` is not an HTTP method"),
        "{stderr}"
    );
}

/// One request on a kept-alive connection; returns the status. Reads the head, then as many
/// body bytes as `content-length` says, so the connection stays usable.
fn keep_alive_exchange(s: &mut TcpStream, path: &str) -> u16 {
    write!(s, "GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
            .and_then(Result::ok)
            .unwrap_or(0);
        if body.len() >= length {
            return head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// 10,000 idle keep-alive connections are held open while new clients are still served, and
/// the idle ones stay usable. (The gateway raises its open-files limit to the hard limit; the
/// test needs about 10,500 open files in each process.)
#[test]
fn ten_thousand_idle_connections_are_held_while_new_requests_succeed() {
    const IDLE: usize = 10_000;
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    if limit < IDLE as u64 + 500 {
        eprintln!("SKIPPED: this test holds {IDLE} connections, but open files are limited to {limit}");
        return;
    }
    let upstream = spawn_upstream();
    let dir = temp_dir("idle");
    let file = dir.join("kong.yml");
    std::fs::write(&file, config(upstream, "")).unwrap();
    // The keep-alive idle timeout is the header timeout: longer than the test.
    let gw = Running::start_with(&file, &["--header-read-timeout", "120s", "--access-log", "off"], &[]);
    let before = rss_kib(gw.child.id());
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE);
    for _ in 0..IDLE / 100 {
        let mut batch: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(gw.addr).unwrap()).collect();
        for s in &mut batch {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(keep_alive_exchange(s, "/idle"), 200);
        }
        idle.extend(batch);
        assert!(started.elapsed() < Duration::from_secs(90), "opening the connections took too long");
    }
    let held = rss_kib(gw.child.id());
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(http_get(gw.addr, "/new").map(|(status, _)| status), Some(200));
        assert!(t.elapsed() < Duration::from_secs(2), "a new request took {:?}", t.elapsed());
    }
    for s in idle.iter_mut().step_by(97) {
        assert_eq!(keep_alive_exchange(s, "/again"), 200);
    }
    eprintln!(
        "{IDLE} idle connections: RSS {} -> {} MiB (+{:.1} KiB each); opened in {:?}",
        before / 1024,
        held / 1024,
        (held.saturating_sub(before)) as f64 / IDLE as f64,
        started.elapsed()
    );
}

/// What a client got from one request.
#[derive(Debug, PartialEq)]
enum Outcome {
    Answer(u16, String),
    Refused,
    Broken(String),
}

fn request(addr: SocketAddr, path: &str) -> Outcome {
    let Ok(mut s) = TcpStream::connect(addr) else { return Outcome::Refused };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if write!(s, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").is_err() {
        return Outcome::Broken("write failed".into());
    }
    let mut out = String::new();
    match s.read_to_string(&mut out) {
        Ok(_) => match (out.split_whitespace().nth(1).and_then(|c| c.parse().ok()), out.split_once("\r\n\r\n")) {
            (Some(status), Some((_, body))) => Outcome::Answer(status, body.to_string()),
            _ => Outcome::Broken(out),
        },
        Err(e) => Outcome::Broken(format!("{e}: {out}")),
    }
}

/// SIGTERM with requests in flight (each held a second by the upstream): every one of them
/// gets its whole answer, then the gateway exits 0 and refuses new connections.
#[test]
fn sigterm_under_load_lets_every_in_flight_request_finish() {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upstream = spawn_counting_upstream(seen.clone());
    let dir = temp_dir("term-load");
    let file = dir.join("kong.yml");
    std::fs::write(&file, config(upstream, "")).unwrap();
    let mut gw = Running::start(&file);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (addr, stop) = (gw.addr, stop.clone());
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    outcomes.push(request(addr, &format!("/slow/{i}")));
                }
                outcomes
            })
        })
        .collect();
    // Every client's first request is at the upstream, held there for a second.
    gw.wait_for(|| seen.load(std::sync::atomic::Ordering::SeqCst) >= 8, "8 requests at the upstream");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let signalled = Instant::now();
    gw.signal("-TERM");
    let status = gw.wait_exit();
    let exited = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    for (i, client) in clients.into_iter().enumerate() {
        let outcomes = client.join().unwrap();
        // Each client had one request in flight when the signal came, and started no other.
        assert_eq!(outcomes, vec![Outcome::Answer(200, format!("/slow/{i}"))], "client {i}");
    }
    assert!(exited >= Duration::from_millis(300), "exited after {exited:?}, before the in-flight requests ended");
    assert_eq!(request(gw.addr, "/"), Outcome::Refused);
}
