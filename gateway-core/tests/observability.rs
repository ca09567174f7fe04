//! Metrics, the access log and latency headers, as an operator sees them: `/metrics` parsed as
//! the exposition format after a known sequence of requests, bounded cardinality, JSON access
//! log lines.

mod common;
#[path = "common/logs.rs"]
mod logs;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use gateway_core::admin::{AdminService, AdminSettings};
use gateway_core::body::ProxyBody;
use gateway_core::config::Config;
use gateway_core::plugin::{Answer, Plugin, PluginRegistry, RequestContext, typed_factory};
use gateway_core::{Gateway, Observability};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use logs::*;
use tower::ServiceExt;

/// One parsed sample: metric name and labels (sorted) to value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the text exposition format (Prometheus / OpenMetrics): comments skipped, every
/// sample line split into name, labels (with escapes) and value.
fn parse_exposition(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let mut labels = BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "label value must be quoted: {line}");
                    let mut val = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some('n') => val.push('\n'),
                                Some(other) => val.push(other),
                                None => panic!("dangling escape: {line}"),
                            },
                            '"' => break,
                            c => val.push(c),
                        }
                    }
                    labels.insert(key.trim_start_matches(',').to_string(), val);
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                (name.to_string(), labels)
            }
        };
        assert!(out.insert((name, labels), value).is_none(), "duplicate series: {line}");
    }
    out
}

fn sample(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples.get(&(name.to_string(), labels)).copied()
}

async fn scrape(admin: &AdminService) -> (String, Samples) {
    let resp = admin.clone().oneshot(Request::get("/metrics").body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let samples = parse_exposition(&text);
    (text, samples)
}

/// Answers every request with 429, as a rate limiter over its limit would.
struct Refuse;
impl Plugin for Refuse {
    fn access(&self, ctx: &mut RequestContext, _req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        ControlFlow::Break(ctx.error(StatusCode::TOO_MANY_REQUESTS, "API rate limit exceeded"))
    }
}

fn registry() -> PluginRegistry {
    let mut r = PluginRegistry::default();
    r.register(typed_factory("refuse", 900, |_: serde_json::Value, _| Ok(Refuse)));
    r
}

fn config(upstream: std::net::SocketAddr, closed: std::net::SocketAddr) -> String {
    format!(
        r#"_format_version: "3.0"
services:
- name: echo
  url: http://{upstream}
  routes:
  - name: echo-route
    paths: ["/echo"]
  - name: limited
    paths: ["/limited"]
    plugins: [{{name: refuse}}]
- name: down
  url: http://{closed}
  retries: 0
  routes: [{{name: down-route, paths: ["/down"]}}]
"#
    )
}

fn build(yaml: &str, observe: Observability) -> Gateway {
    Gateway::builder().plugins(registry()).observability(observe).build(&Config::parse(yaml).unwrap()).unwrap()
}

#[tokio::test]
async fn metrics_follow_a_known_sequence_of_requests() {
    let up = echo_upstream().await;
    let closed = closed_port().await;
    let yaml = config(up.addr, closed);
    let gw = start_running(build(&yaml, Observability::default()), Default::default()).await;
    let admin = gw.gateway.admin(AdminSettings::default());

    let mut egress = 0u64;
    for _ in 0..3 {
        let a = get(&gw.url("/echo/x")).await;
        assert_eq!(a.status, 200);
        egress += a.body.len() as u64;
    }
    let posted = send(Request::post(gw.url("/echo/upload")).body(full("0123456789")).unwrap()).await;
    assert_eq!(posted.status, 200);
    egress += posted.body.len() as u64;
    for _ in 0..2 {
        assert_eq!(get(&gw.url("/limited")).await.status, 429);
    }
    assert_eq!(get(&gw.url("/nowhere")).await.status, 404);
    assert_eq!(get(&gw.url("/down")).await.status, 502);

    let (_, m) = scrape(&admin).await;
    let req = |route: &str, service: &str, code: &str| {
        sample(&m, "gateway_http_requests_total", &[("route", route), ("service", service), ("code", code)])
    };
    assert_eq!(req("echo-route", "echo", "2xx"), Some(4.0));
    assert_eq!(req("limited", "echo", "4xx"), Some(2.0));
    assert_eq!(req("", "", "4xx"), Some(1.0), "unmatched requests count under empty labels");
    assert_eq!(req("down-route", "down", "5xx"), Some(1.0));
    assert_eq!(req("echo-route", "echo", "5xx"), None, "no zero series");
    assert_eq!(
        sample(&m, "gateway_rate_limit_rejections_total", &[("route", "limited"), ("service", "echo")]),
        Some(2.0)
    );

    // Histograms: the echo service saw 6 requests (4 proxied, 2 refused by the plugin); 4
    // reached the upstream.
    let count = |name: &str, service: &str| sample(&m, &format!("{name}_count"), &[("service", service)]);
    assert_eq!(count("gateway_request_latency_seconds", "echo"), Some(6.0));
    assert_eq!(count("gateway_upstream_latency_seconds", "echo"), Some(4.0));
    assert_eq!(count("gateway_proxy_latency_seconds", "echo"), Some(6.0));
    let buckets: Vec<(f64, f64)> = m
        .iter()
        .filter(|((name, l), _)| name == "gateway_upstream_latency_seconds_bucket" && l["service"] == "echo")
        .map(|((_, l), v)| (if l["le"] == "+Inf" { f64::INFINITY } else { l["le"].parse().unwrap() }, *v))
        .collect();
    let mut sorted = buckets.clone();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(sorted.windows(2).all(|w| w[0].1 <= w[1].1), "buckets are cumulative: {sorted:?}");
    assert_eq!(sorted.last(), Some(&(f64::INFINITY, 4.0)), "+Inf counts every request");
    let sum = sample(&m, "gateway_upstream_latency_seconds_sum", &[("service", "echo")]).unwrap();
    assert!(sum > 0.0 && sum < 4.0 * 5.0, "{sum}");

    let bw = |dir: &str| sample(&m, "gateway_bandwidth_bytes_total", &[("service", "echo"), ("direction", dir)]);
    assert_eq!(bw("ingress"), Some(10.0), "the POST's 10 bytes");
    let limited_bodies = 2 * get(&gw.url("/limited")).await.body.len() as u64;
    assert_eq!(bw("egress"), Some((egress + limited_bodies) as f64), "every body byte sent to clients");

    assert_eq!(sample(&m, "gateway_connections_accepted_total", &[]).map(|v| v >= 1.0), Some(true));
    assert!(sample(&m, "gateway_connections_active", &[]).is_some());
    assert_eq!(sample(&m, "gateway_config_reloads_total", &[("result", "success")]), Some(0.0));
    assert!(sample(&m, "gateway_config_age_seconds", &[]).unwrap() >= 0.0);

    // A reload that keeps the route keeps its counters; the reload is counted.
    gw.gateway.reload(&Config::parse(&yaml.replace("retries: 0", "retries: 1")).unwrap()).unwrap();
    let (_, m) = scrape(&admin).await;
    assert_eq!(
        sample(&m, "gateway_http_requests_total", &[("route", "echo-route"), ("service", "echo"), ("code", "2xx")]),
        Some(4.0)
    );
    assert_eq!(sample(&m, "gateway_config_reloads_total", &[("result", "success")]), Some(1.0));
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_health_is_a_metric() {
    let up = echo_upstream().await;
    let closed = closed_port().await;
    let yaml = format!(
        r#"_format_version: "3.0"
upstreams:
- name: pool
  healthchecks:
    active: {{type: tcp, healthy: {{interval: 0.1, successes: 1}}, unhealthy: {{interval: 0.1, tcp_failures: 1}}}}
  targets: [{{target: "{}"}}, {{target: "{closed}"}}]
services: [{{name: s, host: pool, routes: [{{name: r, paths: ["/"]}}]}}]
"#,
        up.addr
    );
    let gw = start_gateway(&yaml).await;
    let admin = gw.gateway.admin(AdminSettings::default());
    let closed_label = closed.to_string();
    let up_label = up.addr.to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, m) = scrape(&admin).await;
        let health = |t: &str| sample(&m, "gateway_upstream_target_health", &[("upstream", "pool"), ("target", t)]);
        if health(&closed_label) == Some(0.0) {
            assert_eq!(health(&up_label), Some(1.0));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the closed target never showed as down");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn cardinality_stays_bounded_with_10000_distinct_paths() {
    let up = echo_upstream().await;
    let closed = closed_port().await;
    let gw = start_running(build(&config(up.addr, closed), Observability::default()), Default::default()).await;
    let admin = gw.gateway.admin(AdminSettings::default());
    assert_eq!(get(&gw.url("/echo/warm")).await.status, 200);
    assert_eq!(get(&gw.url("/unrouted/warm")).await.status, 404);
    let series = |m: &Samples| m.keys().map(|(n, l)| format!("{n}{l:?}")).collect::<BTreeSet<_>>();
    let (_, before) = scrape(&admin).await;

    // 10,000 distinct paths: half routed, half unmatched; 8 clients at a time.
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let base = gw.url("");
            tokio::spawn(async move {
                // One keep-alive client per task, not a connection per request.
                let client = client();
                for i in 0..1250 {
                    let path = if i % 2 == 0 { format!("/echo/{t}/{i}") } else { format!("/unrouted/{t}/{i}") };
                    let req = Request::get(format!("{base}{path}")).body(full("")).unwrap();
                    let resp = client.request(req).await.unwrap();
                    let status = resp.status();
                    resp.into_body().collect().await.unwrap();
                    assert!(status == 200 || status == 404, "{path}: {status}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (text, after) = scrape(&admin).await;
    assert_eq!(series(&before), series(&after), "new series appeared");
    assert!(!text.contains("/echo/"), "a path leaked into a label");
    assert_eq!(
        sample(&after, "gateway_http_requests_total", &[("route", "echo-route"), ("service", "echo"), ("code", "2xx")]),
        Some(5001.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn json_access_log_lines_parse_and_carry_the_request() {
    captured_log();

    let up = echo_upstream().await;
    let closed = closed_port().await;
    let gw = start_running(build(&config(up.addr, closed), Observability::default()), Default::default()).await;
    let ok = get(&gw.url("/echo/items?apikey=SECRET")).await;
    let refused = get(&gw.url("/limited")).await;
    let gw_addr = gw.addr;
    gw.shutdown().await;

    let text = captured_log();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v: &serde_json::Value| {
            v["target"] == "gateway::access"
                && [&ok, &refused].iter().any(|a| v["request_id"] == a.headers["x-request-id"].to_str().unwrap())
        })
        .collect();
    assert_eq!(lines.len(), 2, "one line per request: {text}");
    let first = &lines[0];
    assert_eq!(first["request_id"], ok.headers["x-request-id"].to_str().unwrap());
    assert_eq!(first["client_ip"], "127.0.0.1");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], gw_addr.to_string());
    assert_eq!(first["path"], "/echo/items", "no query string: it may carry credentials");
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "echo-route");
    assert_eq!(first["service"], "echo");
    assert_eq!(first["upstream"], up.addr.to_string());
    assert_eq!(first["bytes_out"], ok.body.len());
    assert_eq!(first["complete"], true);
    assert_eq!(first["trace_id"].as_str().map(str::len), Some(32), "the trace id sent upstream");
    assert!(first["latency_us"].as_u64().unwrap() >= first["upstream_latency_us"].as_u64().unwrap());
    assert!(first["timestamp"].is_string());
    assert!(!text.contains("apikey=SECRET"));
    let second = &lines[1];
    assert_eq!((second["status"].as_u64(), second["route"].as_str()), (Some(429), Some("limited")));
    assert_eq!(second["upstream"], "-");
    assert_eq!(second["bytes_out"], refused.body.len());
}

#[tokio::test]
async fn latency_headers_when_enabled() {
    let up = echo_upstream().await;
    let closed = closed_port().await;
    let gw = start_running(build(&config(up.addr, closed), Observability::default()), Default::default()).await;
    let a = get(&gw.url("/echo/slow/30")).await;
    assert!(a.headers.get("x-gateway-upstream-latency").is_none(), "off by default");
    gw.shutdown().await;

    let mut observe = Observability::default();
    observe.latency_headers = true;
    let gw = start_running(build(&config(up.addr, closed), observe), Default::default()).await;
    let a = get(&gw.url("/echo/slow/30")).await;
    let ms = |h: &str| a.headers[h].to_str().unwrap().parse::<u64>().unwrap();
    assert!(ms("x-gateway-upstream-latency") >= 30, "the upstream slept 30 ms");
    assert!(ms("x-gateway-proxy-latency") < 1000);
    let refused = get(&gw.url("/limited")).await;
    assert!(refused.headers.get("x-gateway-upstream-latency").is_none(), "no upstream was called");
    assert!(refused.headers.get("x-gateway-proxy-latency").is_some());
    gw.shutdown().await;

    // Everything off: no metrics counted.
    let gw = start_running(build(&config(up.addr, closed), Observability::off()), Default::default()).await;
    assert_eq!(get(&gw.url("/echo/x")).await.status, 200);
    let (_, m) = scrape(&gw.gateway.admin(AdminSettings::default())).await;
    assert!(m.keys().all(|(n, _)| n != "gateway_http_requests_total"));
    gw.shutdown().await;
}

#[tokio::test]
async fn w3c_trace_context_reaches_the_upstream() {
    let up = echo_upstream().await;
    let closed = closed_port().await;
    let gw = start_running(build(&config(up.addr, closed), Observability::default()), Default::default()).await;
    let parse = |v: &str| -> (String, String, String, String) {
        let parts: Vec<&str> = v.split('-').collect();
        assert_eq!(parts.len(), 4, "{v}");
        assert!(parts.iter().all(|p| p.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())), "{v}");
        (parts[0].into(), parts[1].into(), parts[2].into(), parts[3].into())
    };

    // No trace from the client: a new one starts.
    let echo = get(&gw.url("/echo/a")).await.echo();
    let (version, trace, parent, flags) = parse(echo.header("traceparent").expect("traceparent sent upstream"));
    assert_eq!((version.as_str(), trace.len(), parent.len(), flags.as_str()), ("00", 32, 16, "00"));
    let again = get(&gw.url("/echo/a")).await.echo();
    assert_ne!(parse(again.header("traceparent").unwrap()).1, trace, "each request its own trace");

    // The client's trace continues: same trace id and flags, a new parent id, tracestate kept.
    let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let echo = send(
        Request::get(gw.url("/echo/b"))
            .header("traceparent", client)
            .header("tracestate", "congo=t61rcWkgMzE")
            .body(full(""))
            .unwrap(),
    )
    .await
    .echo();
    let (version, trace, parent, flags) = parse(echo.header("traceparent").unwrap());
    assert_eq!((version.as_str(), trace.as_str(), flags.as_str()), ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01"));
    assert_ne!(parent, "00f067aa0ba902b7", "the gateway's hop has its own parent id");
    assert_eq!(echo.header("tracestate"), Some("congo=t61rcWkgMzE"));

    // Malformed (upper-case hex, zero trace id, bad version): replaced, tracestate dropped.
    for bad in [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "garbage",
    ] {
        let echo = send(
            Request::get(gw.url("/echo/c"))
                .header("traceparent", bad)
                .header("tracestate", "congo=t61rcWkgMzE")
                .body(full(""))
                .unwrap(),
        )
        .await
        .echo();
        let (_, trace, _, _) = parse(echo.header("traceparent").unwrap());
        assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad} was accepted");
        assert_eq!(echo.header("tracestate"), None, "{bad}: tracestate without a valid traceparent");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_finish_hook_sees_each_request_with_the_trace_sent_upstream() {
    use gateway_core::observe::TraceContext;
    let up = echo_upstream().await;
    let closed = closed_port().await;
    type Seen = Vec<(u16, String, Option<TraceContext>, bool)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let mut observe = Observability::off();
    let sink = seen.clone();
    observe.on_finish = Some(Arc::new(move |r: &gateway_core::observe::RequestRecord<'_>| {
        sink.lock().unwrap().push((r.status, r.route.to_string(), r.trace, r.complete));
    }));
    let gw = start_running(build(&config(up.addr, closed), observe), Default::default()).await;

    // A new trace: sampled, since a hook exports it.
    let echo = get(&gw.url("/echo/a")).await.echo();
    let sent = echo.header("traceparent").unwrap().to_string();
    // The client's trace, not sampled by the client: the flag is kept.
    let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let echo2 =
        send(Request::get(gw.url("/echo/b")).header("traceparent", client).body(full("")).unwrap()).await.echo();
    let sent2 = echo2.header("traceparent").unwrap().to_string();
    assert_eq!(get(&gw.url("/limited")).await.status, 429);
    gw.shutdown().await;

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let (status, route, trace, complete) = &seen[0];
    assert_eq!((*status, route.as_str(), *complete), (200, "echo-route", true));
    let t = trace.expect("a trace for a proxied request");
    assert_eq!(sent, format!("00-{:032x}-{:016x}-01", t.trace_id, t.span_id));
    assert!(t.sampled && t.parent_span_id.is_none());
    let t2 = seen[1].2.unwrap();
    assert_eq!(t2.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    assert_eq!(t2.parent_span_id, Some(0x00f067aa0ba902b7));
    assert!(!t2.sampled);
    assert_eq!(sent2, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-00", t2.span_id));
    assert_eq!((seen[2].0, seen[2].2), (429, None), "no upstream, no trace");
}

/// Authenticates every request as the config's first consumer.
struct AsFirstConsumer(Arc<gateway_core::plugin::ConsumerInfo>);
impl Plugin for AsFirstConsumer {
    fn access(&self, ctx: &mut RequestContext, _req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        ctx.consumer = Some(self.0.clone());
        ControlFlow::Continue(())
    }
}

#[tokio::test]
async fn consumer_labels_only_when_enabled() {
    let up = echo_upstream().await;
    let yaml = format!(
        r#"_format_version: "3.0"
consumers: [{{username: alice}}, {{username: bob}}]
services:
- name: s
  url: http://{}
  routes: [{{name: r, paths: ["/"], plugins: [{{name: as-first-consumer}}]}}]
"#,
        up.addr
    );
    for enabled in [false, true] {
        let mut registry = registry();
        registry.register(typed_factory("as-first-consumer", 1000, |_: serde_json::Value, ctx| {
            Ok(AsFirstConsumer(ctx.consumers()[0].clone()))
        }));
        let mut observe = Observability::default();
        observe.consumer_labels = enabled;
        let gateway =
            Gateway::builder().plugins(registry).observability(observe).build(&Config::parse(&yaml).unwrap()).unwrap();
        let gw = start_running(gateway, Default::default()).await;
        for _ in 0..2 {
            assert_eq!(get(&gw.url("/x")).await.status, 200);
        }
        let (_, m) = scrape(&gw.gateway.admin(AdminSettings::default())).await;
        let alice = sample(&m, "gateway_consumer_requests_total", &[("consumer", "alice"), ("code", "2xx")]);
        assert_eq!(alice, enabled.then_some(2.0), "enabled: {enabled}");
        assert!(m.keys().all(|(_, l)| l.get("consumer").is_none_or(|c| c == "alice")), "no series for bob");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn rejected_source_objects_are_a_gauge() {
    let gateway = Gateway::from_yaml("_format_version: \"3.0\"\n").unwrap();
    let admin = gateway.admin(AdminSettings::default());
    let (_, m) = scrape(&admin).await;
    assert!(m.keys().all(|(n, _)| n != "gateway_source_objects_rejected"));
    gateway.set_rejected(vec![gateway_core::observe::Rejected {
        kind: "Ingress".into(),
        reason: "unknown plugin".into(),
        count: 2,
    }]);
    let (_, m) = scrape(&admin).await;
    assert_eq!(
        sample(&m, "gateway_source_objects_rejected", &[("kind", "Ingress"), ("reason", "unknown plugin")]),
        Some(2.0)
    );
    gateway.set_rejected(Vec::new());
    let (_, m) = scrape(&admin).await;
    assert!(m.keys().all(|(n, _)| n != "gateway_source_objects_rejected"), "a new report replaces the old");
}
