//! Property test (proptest): an Ingress and the gateway config it translates to agree. Random
//! Ingress rules (exact, wildcard and no hosts; `Exact` and `Prefix` paths; a default backend
//! or none) are translated and served by a real gateway on loopback, and every random request
//! must reach the backend a plain model of the Ingress rules picks, or get 404.

mod common;

use gateway_k8s::{Applier, Objects, Options};
use proptest::prelude::*;
use proptest::sample::select;

const HOSTS: &[&str] = &["a.test", "b.test", "x.a.test", "c.a.test", "other.org"];
const RULE_HOSTS: &[Option<&str>] = &[None, Some("a.test"), Some("b.test"), Some("*.test"), Some("*.a.test")];
const SEGMENTS: &[&str] = &["a", "ab", "b"];
const BACKENDS: &[&str] = &["one", "two", "three"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Exact,
    Prefix,
}

#[derive(Debug, Clone)]
struct PathRule {
    path: String,
    kind: Kind,
    backend: &'static str,
}

#[derive(Debug, Clone)]
struct Rule {
    host: Option<&'static str>,
    paths: Vec<PathRule>,
}

fn path() -> impl Strategy<Value = String> {
    (prop::collection::vec(select(SEGMENTS), 0..4), any::<bool>()).prop_map(|(segs, slash)| {
        let mut p = format!("/{}", segs.join("/"));
        if slash && !p.ends_with('/') {
            p.push('/');
        }
        p
    })
}

/// What a path competes as: `Prefix` paths ignore a trailing slash.
fn key(p: &PathRule) -> &str {
    match p.kind {
        Kind::Exact => &p.path,
        Kind::Prefix => match p.path.trim_end_matches('/') {
            "" => "/",
            k => k,
        },
    }
}

/// Rules with no two paths competing as the same (host, path, type): the Ingress spec leaves
/// such duplicates to the implementation, so the model does not guess.
fn rules() -> impl Strategy<Value = Vec<Rule>> {
    let path_rule = (path(), select(&[Kind::Exact, Kind::Prefix][..]), select(BACKENDS))
        .prop_map(|(path, kind, backend)| PathRule { path, kind, backend });
    let rule =
        (select(RULE_HOSTS), prop::collection::vec(path_rule, 1..4)).prop_map(|(host, paths)| Rule { host, paths });
    prop::collection::vec(rule, 1..5).prop_map(|mut rules| {
        let mut seen: Vec<(Option<&str>, String, Kind)> = Vec::new();
        for r in &mut rules {
            r.paths.retain(|p| {
                let id = (r.host, key(p).to_string(), p.kind);
                let new = !seen.contains(&id);
                if new {
                    seen.push(id);
                }
                new
            });
        }
        rules.retain(|r| !r.paths.is_empty());
        rules
    })
}

/// The Ingress rules: a host is exact or a `*.` wildcard covering exactly one label; an
/// `Exact` path is the whole path; a `Prefix` path matches by path element. A rule with a
/// host beats a rule without, an exact host beats a wildcard, then the longest path wins, and
/// `Exact` beats `Prefix` at equal length. No match: the default backend, or 404.
fn model(rules: &[Rule], default: bool, host: &str, path: &str) -> Option<&'static str> {
    /// (has a host, an exact host, path length, `Exact`): greater wins.
    type Rank = (bool, bool, usize, bool);
    let mut best: Option<(Rank, &'static str)> = None;
    for r in rules {
        let host_ok = match r.host {
            None => true,
            Some(pattern) => match pattern.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .and_then(|h| h.strip_suffix('.'))
                    .is_some_and(|label| !label.is_empty() && !label.contains('.')),
                None => pattern == host,
            },
        };
        if !host_ok {
            continue;
        }
        for p in &r.paths {
            let k = key(p);
            let hit = match p.kind {
                Kind::Exact => path == k,
                Kind::Prefix => {
                    path.starts_with(k)
                        && (path.len() == k.len() || path.as_bytes()[k.len()] == b'/' || k.ends_with('/'))
                }
            };
            if !hit {
                continue;
            }
            let rank = (r.host.is_some(), r.host.is_some_and(|h| !h.starts_with('*')), k.len(), p.kind == Kind::Exact);
            if best.is_none_or(|(b, _)| rank > b) {
                best = Some((rank, p.backend));
            }
        }
    }
    best.map(|(_, backend)| backend).or(default.then_some("fallback"))
}

fn manifests(rules: &[Rule], default: bool, ports: &[(&str, u16)]) -> String {
    let rules: Vec<serde_json::Value> = rules
        .iter()
        .map(|r| {
            let paths: Vec<serde_json::Value> = r
                .paths
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "path": p.path,
                        "pathType": if p.kind == Kind::Exact { "Exact" } else { "Prefix" },
                        "backend": { "service": { "name": p.backend, "port": { "number": 80 } } },
                    })
                })
                .collect();
            let mut rule = serde_json::json!({ "http": { "paths": paths } });
            if let Some(h) = r.host {
                rule["host"] = h.into();
            }
            rule
        })
        .collect();
    let mut spec = serde_json::json!({ "ingressClassName": "gateway", "rules": rules });
    if default {
        spec["defaultBackend"] = serde_json::json!({ "service": { "name": "fallback", "port": { "number": 80 } } });
    }
    let mut docs = vec![serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": { "name": "generated", "namespace": "default" },
        "spec": spec,
    })];
    for (name, port) in ports {
        docs.push(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": "default" },
            "spec": { "ports": [{ "port": 80, "targetPort": 8080 }] },
        }));
        docs.push(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": { "name": format!("{name}-x1"), "namespace": "default", "labels": { "kubernetes.io/service-name": name } },
            "addressType": "IPv4",
            "ports": [{ "port": port }],
            "endpoints": [{ "addresses": ["127.0.0.1"], "conditions": { "ready": true } }],
        }));
    }
    // JSON documents are YAML documents.
    docs.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n---\n")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn an_ingress_and_its_translation_route_alike(
        rules in rules(),
        default in any::<bool>(),
        requests in prop::collection::vec((select(HOSTS), path()), 1..20),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut ports = Vec::new();
            for name in ["one", "two", "three", "fallback"] {
                ports.push((name, common::echo(name).await.port()));
            }
            let mut objects = Objects::default();
            let unreadable = objects.add_manifest("generated", &manifests(&rules, default, &ports));
            prop_assert!(unreadable.is_empty(), "{:?}", unreadable);
            let gateway = common::empty_gateway();
            let mut applier = Applier::new(gateway.clone(), Options::default());
            let applied = applier.apply(&objects, Vec::new()).unwrap();
            prop_assert!(applied.translation().problems.is_empty(), "{:?}", applied.translation().problems);
            let running = common::serve(gateway).await;
            let client = common::client();
            for (host, path) in &requests {
                let answer = common::send(&client, running.addr, "GET", host, path, &[]).await;
                let got = answer.echo().map(|echo| echo["service"].as_str().unwrap_or("?").to_string());
                let want = model(&rules, default, host, path);
                match want {
                    Some(backend) => prop_assert_eq!(got.as_deref(), Some(backend), "{} {}: {:?}", host, path, answer),
                    None => prop_assert_eq!(answer.status, 404, "{} {}: {:?}", host, path, answer),
                }
            }
            Ok(())
        })?;
    }
}
