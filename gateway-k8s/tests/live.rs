//! Live mode against a fake API server (real kube clients over loopback HTTP): watch events
//! of every kind change routing, a lost watch (410 Gone) relists and catches up, and only the
//! replica holding the Lease writes `status.loadBalancer`.

mod common;
mod fake_api;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Answer, HttpClient, client, echo, empty_gateway, send, serve};
use fake_api::FakeApi;
use gateway_core::Gateway;
use gateway_core::admin::AdminSettings;
use gateway_k8s::Applier;
use gateway_k8s::live::{self, LiveSettings, Publish};
use gateway_k8s::translate::Options;
use http_body_util::{BodyExt, Empty};
use tower::ServiceExt;

/// Polls `check` every 25 ms until it returns `Some`, for at most `secs` seconds.
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, secs: u64, mut check: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn get(http: &HttpClient, addr: SocketAddr, path: &str) -> Answer {
    send(http, addr, "GET", "live.test", path, &[]).await
}

/// Waits until `path` answers `status` (and, for 200, from upstream `service`).
async fn wait_for(http: &HttpClient, addr: SocketAddr, path: &str, status: u16, service: Option<&str>) -> Answer {
    let what = format!("GET {path} answers {status} from {service:?}");
    eventually(&what, 10, || async {
        let a = get(http, addr, path).await;
        let from = a.echo().and_then(|e| e["service"].as_str().map(str::to_string));
        (a.status == status && (service.is_none() || from.as_deref() == service)).then_some(a)
    })
    .await
}

async fn ready(gateway: &Gateway) -> u16 {
    let req = http::Request::get("/readyz").body(Empty::<bytes::Bytes>::new()).unwrap();
    let resp = gateway.admin(AdminSettings::default()).oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

fn service(name: &str, port: u16) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{ name: {name}, namespace: default }}
spec: {{ ports: [ {{ name: http, port: 80 }} ] }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: {name}-1, namespace: default, labels: {{ kubernetes.io/service-name: {name} }} }}
addressType: IPv4
ports: [ {{ name: http, port: {port} }} ]
endpoints: [ {{ addresses: [127.0.0.1], conditions: {{ ready: true }} }} ]
"#
    )
}

fn slice(name: &str, port: u16) -> String {
    service(name, port).split("---").nth(1).unwrap().to_string()
}

/// An Ingress on host live.test; `paths` are (path, Service) pairs, all Prefix, port 80.
fn ingress(name: &str, annotations: &str, paths: &[(&str, &str)]) -> String {
    let paths: String = paths
        .iter()
        .map(|(p, s)| {
            format!(
                "\n          - {{ path: {p}, pathType: Prefix, backend: {{ service: {{ name: {s}, port: {{ name: http }} }} }} }}"
            )
        })
        .collect();
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{ name: {name}, namespace: default, annotations: {{ {annotations} }} }}
spec:
  ingressClassName: gateway
  rules:
    - host: live.test
      http:
        paths:{paths}
"#
    )
}

fn stamp_plugin(value: &str) -> String {
    format!(
        r#"
apiVersion: configuration.konghq.com/v1
kind: KongPlugin
metadata: {{ name: stamp, namespace: default }}
plugin: response-transformer
config: {{ add: {{ headers: ["x-stamp:{value}"] }} }}
"#
    )
}

fn settings(identity: &str) -> LiveSettings {
    let mut s = LiveSettings::new(identity, "gateway-system");
    s.debounce = Duration::from_millis(20);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_of_every_kind_change_routing_and_a_lost_watch_resyncs() {
    let (a, b, c) = (echo("a").await.port(), echo("b").await.port(), echo("c").await.port());
    let api = FakeApi::new();
    api.apply(&service("web", a));
    api.apply(&ingress("site", "", &[("/app", "web"), ("/api", "api"), ("/stamped", "web")]));

    let gateway = empty_gateway();
    let running = serve(gateway.clone()).await;
    let http = client();
    let kube = api.client("replica-a").await;
    let applier = Applier::new(gateway.clone(), Options::default());
    let task = tokio::spawn(live::run(kube, gateway.clone(), applier, settings("replica-a")));

    // Ready once the caches have synced and the first config is in; serving it.
    eventually("/readyz answers 200", 10, || async { (ready(&gateway).await == 200).then_some(()) }).await;
    wait_for(&http, running.addr, "/app", 200, Some("a")).await;
    assert_eq!(get(&http, running.addr, "/api").await.status, 503, "no Service `api` yet");

    // Ingress MODIFIED: a new path.
    api.apply(&ingress("site", "", &[("/app", "web"), ("/api", "api"), ("/stamped", "web"), ("/new", "web")]));
    wait_for(&http, running.addr, "/new", 200, Some("a")).await;

    // EndpointSlice MODIFIED: the Service's endpoints move to another upstream.
    api.apply(&slice("web", b));
    wait_for(&http, running.addr, "/app", 200, Some("b")).await;

    // Service (and its slice) ADDED, then the Service DELETED: 200, then 503 again.
    api.apply(&service("api", c));
    wait_for(&http, running.addr, "/api", 200, Some("c")).await;
    api.delete("Service", "default", "api");
    wait_for(&http, running.addr, "/api", 503, None).await;

    // KongPlugin: an Ingress naming a missing plugin fails closed (503); ADDED runs it,
    // MODIFIED changes it, DELETED fails closed again. The Ingress's other paths follow it.
    api.apply(&ingress("site", "konghq.com/plugins: stamp", &[("/app", "web"), ("/stamped", "web")]));
    wait_for(&http, running.addr, "/stamped", 503, None).await;
    api.apply(&stamp_plugin("one"));
    let answer = wait_for(&http, running.addr, "/stamped", 200, Some("b")).await;
    assert_eq!(answer.headers["x-stamp"], "one");
    api.apply(&stamp_plugin("two"));
    eventually("the plugin's new config", 10, || async {
        let a = get(&http, running.addr, "/stamped").await;
        (a.status == 200 && a.headers.get("x-stamp").is_some_and(|v| v == "two")).then_some(())
    })
    .await;
    api.delete("KongPlugin", "default", "stamp");
    wait_for(&http, running.addr, "/stamped", 503, None).await;

    // Ingress DELETED: its paths are gone.
    api.delete("Ingress", "default", "site");
    wait_for(&http, running.addr, "/app", 404, None).await;

    // A change no watch is told of (its events compacted away), then 410 Gone on every
    // watch: the reflectors relist, and the change is served.
    let lists = api.list_requests("ingresses");
    api.apply_unseen(&ingress("back", "", &[("/back", "web")]));
    api.apply_unseen(&slice("web", c));
    api.expire_watches();
    wait_for(&http, running.addr, "/back", 200, Some("c")).await;
    assert!(api.list_requests("ingresses") > lists, "the Ingress reflector relisted");
    assert!(api.status_writes().is_empty(), "no status written without --publish-*");

    task.abort();
}

/// The Lease's holder, once there is one.
fn holder(api: &FakeApi) -> Option<String> {
    api.get("Lease", "gateway-system", "gateway-ingress-leader")?["spec"]["holderIdentity"].as_str().map(str::to_string)
}

/// Who wrote `status.loadBalancer` of Ingress `name`, once someone has.
fn writers(api: &FakeApi, name: &str) -> Vec<String> {
    api.status_writes().into_iter().filter(|w| w.name == name).map(|w| w.client).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_replica_holding_the_lease_writes_status() {
    let web = echo("web").await.port();
    let api = FakeApi::new();
    api.apply(&service("web", web));
    api.apply(&ingress("one", "", &[("/one", "web")]));

    // Each replica publishes different addresses (in a cluster they would be the same): a
    // replica that wrote without the Lease would show, and two writers would fight.
    let published = |name: &str| match name {
        "replica-a" => vec!["192.0.2.10".to_string(), "a.lb.example.com".to_string()],
        _ => vec!["192.0.2.11".to_string()],
    };
    let status_of = |name: &str| {
        api.get("Ingress", "default", name).unwrap()["status"]["loadBalancer"]["ingress"]
            .as_array()
            .map(|list| {
                list.iter().filter_map(|e| e["ip"].as_str().or(e["hostname"].as_str())).map(str::to_string).collect()
            })
            .unwrap_or_default()
    };
    let http = client();
    let mut replicas = Vec::new();
    for name in ["replica-a", "replica-b"] {
        let gateway = empty_gateway();
        let running = serve(gateway.clone()).await;
        let mut s = settings(name);
        s.publish = Publish::Addresses(published(name));
        // Long enough that a late renewal on a loaded machine does not hand the Lease over.
        s.lease_duration = Duration::from_secs(6);
        let kube = api.client(name).await;
        let task = tokio::spawn(live::run(kube, gateway.clone(), Applier::new(gateway, Options::default()), s));
        replicas.push((name, running, task));
    }

    // Both replicas serve, leader or not.
    for (_, running, _) in &replicas {
        wait_for(&http, running.addr, "/one", 200, Some("web")).await;
    }
    let leader = eventually("a Lease holder", 10, || async { holder(&api) }).await;
    let follower = if leader == "replica-a" { "replica-b" } else { "replica-a" };

    let wrote =
        eventually("status of `one`", 10, || async { Some(writers(&api, "one")).filter(|w| !w.is_empty()) }).await;
    assert_eq!(wrote, [leader.as_str()], "written once, by the leader");
    let status: Vec<String> = status_of("one");
    assert_eq!(status, published(&leader));

    // A new Ingress: both replicas serve it, only the leader writes its status.
    api.apply(&ingress("two", "", &[("/two", "web")]));
    for (_, running, _) in &replicas {
        wait_for(&http, running.addr, "/two", 200, Some("web")).await;
    }
    let wrote =
        eventually("status of `two`", 10, || async { Some(writers(&api, "two")).filter(|w| !w.is_empty()) }).await;
    assert_eq!(wrote, [leader.as_str()]);

    // The leader loses the API: after its Lease expires the other replica takes it over,
    // rewrites the status to its addresses, and writes the status of what comes next.
    api.cut_off(&leader);
    eventually("the follower holds the Lease", 30, || async {
        (holder(&api).as_deref() == Some(follower)).then_some(())
    })
    .await;
    api.apply(&ingress("three", "", &[("/three", "web")]));
    let wrote =
        eventually("status of `three`", 10, || async { Some(writers(&api, "three")).filter(|w| !w.is_empty()) }).await;
    assert_eq!(wrote, [follower.to_string()]);
    for name in ["one", "two"] {
        eventually("the new leader's status", 10, || async { (status_of(name) == published(follower)).then_some(()) })
            .await;
        assert_eq!(writers(&api, name), [leader.clone(), follower.to_string()], "Ingress {name}");
    }
    assert_eq!(status_of("three"), published(follower));

    for (_, _, task) in replicas {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_kong_crds_ingresses_still_serve_and_plugins_fail_closed() {
    let web = echo("web").await.port();
    let api = FakeApi::new();
    for plural in ["kongplugins", "kongclusterplugins", "kongconsumers"] {
        api.without(plural);
    }
    api.apply(&service("web", web));
    api.apply(&ingress("plain", "", &[("/plain", "web")]));
    api.apply(&ingress("stamped", "konghq.com/plugins: stamp", &[("/stamped", "web")]));

    let gateway = empty_gateway();
    let running = serve(gateway.clone()).await;
    let http = client();
    let kube = api.client("replica-a").await;
    let task = tokio::spawn(live::run(
        kube,
        gateway.clone(),
        Applier::new(gateway.clone(), Options::default()),
        settings("a"),
    ));
    wait_for(&http, running.addr, "/plain", 200, Some("web")).await;
    assert_eq!(get(&http, running.addr, "/stamped").await.status, 503, "a plugin that cannot exist is missing");
    eventually("/readyz answers 200", 10, || async { (ready(&gateway).await == 200).then_some(()) }).await;
    assert_eq!(api.watch_requests("kongplugins"), 0, "an absent kind is not watched");
    task.abort();
}
