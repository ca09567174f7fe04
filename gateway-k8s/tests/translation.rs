//! Table-driven translation tests: each file in `tests/fixtures/` is a set of manifests, then
//! (after a `### cases` line) the problems the translation must report and requests with the
//! backend or status each must get. Requests go through a real gateway on loopback to echo
//! upstreams named by `ECHO_PORT_<name>` in the manifests.

mod common;

use std::collections::BTreeMap;

use gateway_k8s::{Applier, Objects, Options};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expectations {
    /// Substrings; each must match exactly one reported problem, and there must be no other.
    #[serde(default)]
    problems: Vec<String>,
    #[serde(default)]
    options: Option<OptionsSpec>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptionsSpec {
    ingress_class: Option<String>,
    controller_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default = "get")]
    method: String,
    host: String,
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// An echo upstream's name, or a status code the gateway answers with.
    expect: serde_norway::Value,
    upstream_path: Option<String>,
    upstream_host: Option<String>,
    #[serde(default)]
    upstream_headers: BTreeMap<String, String>,
    #[serde(default)]
    response_headers: BTreeMap<String, String>,
    /// Send the request this many times; every answer must match.
    #[serde(default = "one")]
    repeat: usize,
}

fn get() -> String {
    "GET".into()
}

fn one() -> usize {
    1
}

async fn run_fixture(name: &str) {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let (manifests, cases) = text.split_once("\n### cases\n").expect("a `### cases` line");
    let expectations: Expectations = serde_norway::from_str(cases).unwrap_or_else(|e| panic!("{name}: cases: {e}"));
    let manifests = common::with_echo_ports(manifests).await;
    let mut objects = Objects::default();
    let unreadable = objects.add_manifest(name, &manifests);
    assert!(unreadable.is_empty(), "{name}: {unreadable:?}");

    let mut options = Options::default();
    if let Some(o) = expectations.options {
        options.ingress_class = o.ingress_class.unwrap_or(options.ingress_class);
        options.controller_name = o.controller_name.unwrap_or(options.controller_name);
    }
    let gateway = common::empty_gateway();
    let mut applier = Applier::new(gateway.clone(), options);
    let applied = applier.apply(&objects, Vec::new()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let problems: Vec<String> = applied.translation().problems.iter().map(|p| p.to_string()).collect();
    for want in &expectations.problems {
        let hits = problems.iter().filter(|p| p.contains(want.as_str())).count();
        assert_eq!(hits, 1, "{name}: problem `{want}` matched {hits} of {problems:#?}");
    }
    assert_eq!(problems.len(), expectations.problems.len(), "{name}: unexpected problems {problems:#?}");

    let running = common::serve(gateway).await;
    let client = common::client();
    for case in &expectations.cases {
        let what = format!("{name}: {} {}{}", case.method, case.host, case.path);
        let headers: Vec<(String, String)> = case.headers.clone().into_iter().collect();
        for _ in 0..case.repeat {
            let answer = common::send(&client, running.addr, &case.method, &case.host, &case.path, &headers).await;
            match &case.expect {
                serde_norway::Value::Number(n) => {
                    assert_eq!(u64::from(answer.status), n.as_u64().unwrap(), "{what}: {answer:?}");
                }
                serde_norway::Value::String(service) => {
                    let echo = answer.echo().unwrap_or_else(|| panic!("{what}: no upstream answered: {answer:?}"));
                    assert_eq!(answer.status, 200, "{what}");
                    assert_eq!(echo["service"], service.as_str(), "{what}: {echo}");
                    if let Some(p) = &case.upstream_path {
                        assert_eq!(echo["path"], p.as_str(), "{what}: upstream path");
                    }
                    if let Some(h) = &case.upstream_host {
                        assert_eq!(echo["host"], h.as_str(), "{what}: upstream Host");
                    }
                    for (k, v) in &case.upstream_headers {
                        assert_eq!(echo["headers"][k], v.as_str(), "{what}: upstream header {k}");
                    }
                }
                other => panic!("{what}: expect must be a service name or a status, got {other:?}"),
            }
            for (k, v) in &case.response_headers {
                let got = answer.headers.get(k).and_then(|v| v.to_str().ok());
                assert_eq!(got, Some(v.as_str()), "{what}: response header {k}");
            }
        }
    }
}

macro_rules! fixtures {
    ($($test:ident => $file:literal),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                run_fixture($file).await;
            }
        )*
    };
}

fixtures! {
    path_matching_follows_the_kubernetes_docs_table => "path_matching.yaml",
    hosts_exact_wildcard_and_any => "hosts.yaml",
    ingress_classes_filter_what_is_served => "classes.yaml",
    backends_ports_endpoints_and_missing_services => "backends.yaml",
    conflicts_go_to_the_oldest_ingress => "conflicts.yaml",
    kong_annotations_map_onto_routes_and_services => "annotations.yaml",
    kong_plugins_cluster_plugins_and_consumers => "kong.yaml",
}

/// TLS: `spec.tls` hosts with a `kubernetes.io/tls` Secret become SNI certificates; a missing
/// Secret and a Secret the gateway cannot load are reported, and the other hosts keep theirs.
#[test]
fn tls_secrets_become_sni_certificates() {
    let cert = rcgen::generate_simple_self_signed(vec!["t.test".into()]).unwrap();
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": { "name": "web", "namespace": "default" },
                "spec": {
                    "ingressClassName": "gateway",
                    "tls": [
                        { "hosts": ["t.test", "www.t.test"], "secretName": "good" },
                        { "hosts": ["gone.test"], "secretName": "absent" },
                        { "hosts": ["bad.test"], "secretName": "garbage" }
                    ],
                    "rules": [ { "host": "t.test", "http": { "paths": [
                        { "path": "/", "pathType": "Prefix", "backend": { "service": { "name": "x", "port": { "number": 80 } } } }
                    ] } } ]
                }
            },
            {
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": { "name": "good", "namespace": "default" },
                "stringData": { "tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem() }
            },
            {
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": { "name": "garbage", "namespace": "default" },
                "stringData": { "tls.crt": "not a certificate", "tls.key": "not a key" }
            }
        ]
    });
    let mut objects = Objects::default();
    assert!(objects.add_manifest("tls.json", &list.to_string()).is_empty());
    let gateway = common::empty_gateway();
    let check = |c: &gateway_core::config::Config| gateway.reload(c).map(|()| gateway.plugin_failures());
    let t = gateway_k8s::translate_checked(&objects, &Options::default(), check).unwrap();
    assert_eq!(t.config.certificates.len(), 1, "{:#?}", t.config.certificates);
    let snis: Vec<&str> = t.config.certificates[0].snis.iter().map(|s| s.name()).collect();
    assert_eq!(snis, ["t.test", "www.t.test"]);
    let problems: Vec<String> = t.problems.iter().map(ToString::to_string).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("Ingress default/web: spec.tls[1]: TLS Secret `default/absent` not found")),
        "{problems:#?}"
    );
    assert!(problems.iter().any(|p| p.starts_with("Secret default/garbage: refused by the gateway")), "{problems:#?}");
    // The missing Service's path is reported too; nothing else.
    assert_eq!(problems.len(), 3, "{problems:#?}");
}

/// A syntax error the YAML parser cannot get past (an unclosed `{`) is one problem, and the
/// documents before it still load. (The parser repeats the error forever; the fuzz target
/// `ingress_translate` found the loop that collected them.)
#[test]
fn an_unclosed_flow_mapping_is_one_problem_not_a_hang() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec: {ports: [{port: 80}]}\n---\n\
apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: b}\nspec:\n  rules:\n  - http:\n      paths:\n      - {path: /x, pathType: Prefix: v1\nkind: Service\n";
    let mut objects = Objects::default();
    let problems = objects.add_manifest("broken.yaml", text);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].to_string().contains("broken.yaml#2"), "{}", problems[0]);
    assert_eq!(objects.services.len(), 1);
    assert!(objects.ingresses.is_empty());
}

/// A manifest on which the YAML parser panics (found by the fuzz target `ingress_translate`)
/// is a problem with that file, and the process goes on.
#[test]
fn a_manifest_the_parser_panics_on_is_a_problem() {
    let text = include_str!("fixtures/fuzz/parser-panic.yaml");
    let mut objects = Objects::default();
    let problems = objects.add_manifest("panic.yaml", text);
    assert!(!problems.is_empty());
}

/// JSON documents separated by `---` are a YAML stream and are all read (the property test
/// found them refused as "trailing characters" when the file started with `{`); a broken JSON
/// file is still a problem naming the file.
#[test]
fn json_documents_separated_by_dashes_are_all_read() {
    let service = |name: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": "default" },
            "spec": { "ports": [{ "port": 80 }] },
        })
        .to_string()
    };
    let mut objects = Objects::default();
    let problems = objects.add_manifest("stream.yaml", &format!("{}\n---\n{}\n", service("a"), service("b")));
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(objects.services.len(), 2);

    let mut objects = Objects::default();
    let problems = objects.add_manifest("one.json", &service("c"));
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(objects.services.len(), 1);

    let problems = Objects::default().add_manifest("broken.json", "{\"apiVersion\": \"v1\", \"kind\": ");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].to_string().contains("broken.json"), "{}", problems[0]);
}
