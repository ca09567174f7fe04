//! The plugin API through the real proxy: phases, order, scope, failures, layers.

mod common;

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use common::*;
use gateway_core::Gateway;
use gateway_core::body::{ProxyBody, ResponseBody};
use gateway_core::config::Config;
use gateway_core::plugin::{
    Answer, ConsumerInfo, Plugin, PluginRegistry, RequestContext, UpstreamLayer, typed_factory,
};
use gateway_core::server::ServerSettings;
use http::{HeaderValue, Request, Response, StatusCode};

type Journal = Arc<Mutex<Vec<String>>>;

/// Records every phase it sees; tags the upstream request and the response with its `tag`.
struct Recorder {
    tag: String,
    journal: Journal,
    deny: bool,
    layer: bool,
    /// Its access hook is async (and yields once before deciding).
    is_async: bool,
}

impl Recorder {
    fn note(&self, phase: &str) {
        self.journal.lock().unwrap().push(format!("{phase}:{}", self.tag));
    }
}

impl Plugin for Recorder {
    fn access(&self, ctx: &mut RequestContext, _req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        self.note(if self.is_async { "access-async" } else { "access" });
        if self.deny {
            ControlFlow::Break(ctx.error(StatusCode::UNAUTHORIZED, "denied by test"))
        } else {
            ControlFlow::Continue(())
        }
    }
    fn is_async(&self) -> bool {
        self.is_async
    }
    fn access_async<'a>(
        &'a self,
        ctx: &'a mut RequestContext,
        req: &'a mut Request<ProxyBody>,
    ) -> gateway_core::plugin::BoxFuture<'a, ControlFlow<Answer>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.access(ctx, req)
        })
    }
    fn before_upstream(&self, _ctx: &mut RequestContext, req: &mut Request<ProxyBody>) {
        self.note("before");
        req.headers_mut().append("x-tags", HeaderValue::from_str(&self.tag).unwrap());
    }
    fn response(&self, _ctx: &mut RequestContext, resp: &mut Response<ResponseBody>) {
        self.note("response");
        resp.headers_mut().append("x-seen-by", HeaderValue::from_str(&self.tag).unwrap());
    }
    fn log(&self, _ctx: &RequestContext, status: StatusCode) {
        self.note(&format!("log{}", status.as_u16()));
    }
    fn layer(&self) -> Option<UpstreamLayer> {
        if !self.layer {
            return None;
        }
        let tag = self.tag.clone();
        Some(Arc::new(move |inner| {
            let tag = tag.clone();
            tower::util::BoxCloneSyncService::new(tower::ServiceExt::map_response(
                inner,
                move |mut r: Response<ResponseBody>| {
                    r.headers_mut().insert("x-layer", HeaderValue::from_str(&tag).unwrap());
                    r
                },
            ))
        }))
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecorderConfig {
    tag: String,
    #[serde(default)]
    deny: bool,
    #[serde(default)]
    layer: bool,
    #[serde(default, rename = "async")]
    is_async: bool,
}

/// Identifies the consumer named in `x-user` (a stand-in for an authentication plugin).
struct HeaderAuth;

impl Plugin for HeaderAuth {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        let user = req.headers().get("x-user").and_then(|v| v.to_str().ok()).map(str::to_string);
        if let Some(user) = user {
            // The test config lists consumers alice (0) and bob (1).
            let index = if user == "alice" { 0 } else { 1 };
            ctx.consumer = Some(Arc::new(ConsumerInfo {
                index,
                id: user.clone().into(),
                username: Some(user.into()),
                custom_id: None,
            }));
        }
        ControlFlow::Continue(())
    }
}

fn registry(journal: &Journal) -> PluginRegistry {
    let mut r = PluginRegistry::default();
    for (name, priority) in [("high", 20), ("middle", 15), ("low", 10), ("also-low", 10)] {
        let j = journal.clone();
        r.register(typed_factory(name, priority, move |c: RecorderConfig, _| {
            Ok(Recorder { tag: c.tag, journal: j.clone(), deny: c.deny, layer: c.layer, is_async: c.is_async })
        }));
    }
    r.register(typed_factory("header-auth", 1000, |_: serde_json::Value, _| Ok(HeaderAuth)));
    r
}

async fn start(yaml: &str, journal: &Journal) -> RunningGateway {
    let gateway = Gateway::builder().plugins(registry(journal)).build(&Config::from_yaml(yaml).unwrap()).unwrap();
    start_running(gateway, ServerSettings::default()).await
}

fn take(journal: &Journal) -> Vec<String> {
    std::mem::take(&mut *journal.lock().unwrap())
}

/// The tags the upstream received (`x-tags`, in `before_upstream` order) and the ones the
/// response collected (`x-seen-by`, in `response` order).
fn tags_and_seen(resp: &common::Answer) -> (Vec<String>, Vec<String>) {
    let tags = resp.echo().headers.get("x-tags").cloned().unwrap_or_default();
    let seen = resp.headers.get_all("x-seen-by").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    (tags, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phases_run_in_order_and_the_response_unwinds_like_an_onion() {
    let up = echo_upstream().await;
    let journal = Journal::default();
    let gw = start(
        &format!(
            r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes: [{{name: r, paths: ["/"]}}]
  plugins:
  - {{name: low, config: {{tag: L}}}}
  - {{name: high, config: {{tag: H}}}}
"#,
            up.addr
        ),
        &journal,
    )
    .await;
    let resp = get(&gw.url("/x")).await;
    assert_eq!(resp.status, StatusCode::OK);
    let (tags, seen) = tags_and_seen(&resp);
    assert_eq!(tags, ["H", "L"]);
    assert_eq!(seen, ["L", "H"], "the response unwinds in reverse order");
    assert_eq!(
        take(&journal),
        ["access:H", "access:L", "before:H", "before:L", "response:L", "response:H", "log200:H", "log200:L"]
    );
    assert_eq!(gw.gateway.routes()[0].plugins, vec!["high", "low"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_answer_skips_later_access_hooks_and_the_upstream() {
    let up = echo_upstream().await;
    let journal = Journal::default();
    let gw = start(
        &format!(
            r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes: [{{name: r, paths: ["/"]}}]
  plugins:
  - {{name: high, config: {{tag: H, deny: true}}}}
  - {{name: low, config: {{tag: L}}}}
"#,
            up.addr
        ),
        &journal,
    )
    .await;
    let resp = get(&gw.url("/x")).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json()["message"], "denied by test");
    assert_eq!(resp.json()["request_id"], resp.headers["x-request-id"].to_str().unwrap());
    assert_eq!(take(&journal), ["access:H", "response:L", "response:H", "log401:H", "log401:L"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_access_hook_between_sync_ones_keeps_every_phase_in_order() {
    let up = echo_upstream().await;
    let journal = Journal::default();
    let gw = start(
        &format!(
            r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes:
  - name: passes
    paths: ["/pass"]
    plugins:
    - {{name: low, config: {{tag: L}}}}
    - {{name: middle, config: {{tag: M, async: true}}}}
    - {{name: high, config: {{tag: H}}}}
  - name: answers
    paths: ["/deny"]
    plugins:
    - {{name: low, config: {{tag: L}}}}
    - {{name: middle, config: {{tag: M, async: true, deny: true}}}}
    - {{name: high, config: {{tag: H}}}}
"#,
            up.addr
        ),
        &journal,
    )
    .await;
    let resp = get(&gw.url("/pass")).await;
    assert_eq!(resp.status, StatusCode::OK);
    let (tags, seen) = tags_and_seen(&resp);
    assert_eq!(tags, ["H", "M", "L"]);
    assert_eq!(seen, ["L", "M", "H"]);
    assert_eq!(
        take(&journal),
        [
            "access:H",
            "access-async:M",
            "access:L",
            "before:H",
            "before:M",
            "before:L",
            "response:L",
            "response:M",
            "response:H",
            "log200:H",
            "log200:M",
            "log200:L"
        ]
    );

    // The async hook answers: the later access hook and the upstream are skipped, the
    // response and log hooks all run.
    let resp = get(&gw.url("/deny")).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json()["request_id"], resp.headers["x-request-id"].to_str().unwrap());
    assert_eq!(
        take(&journal),
        ["access:H", "access-async:M", "response:L", "response:M", "response:H", "log401:H", "log401:M", "log401:L"]
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ties_follow_declaration_order_and_ordering_overrides_priority() {
    let up = echo_upstream().await;
    let journal = Journal::default();
    let gw = start(
        &format!(
            r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes:
  - name: ties
    paths: ["/ties"]
    plugins:
    - {{name: also-low, config: {{tag: A}}}}
    - {{name: low, config: {{tag: L}}}}
  - name: override
    paths: ["/override"]
    plugins:
    - {{name: high, config: {{tag: H}}}}
    - {{name: low, config: {{tag: L}}, ordering: {{before: {{access: [high]}}}}}}
"#,
            up.addr
        ),
        &journal,
    )
    .await;
    assert_eq!(get(&gw.url("/ties")).await.echo().headers["x-tags"], vec!["A", "L"]);
    assert_eq!(get(&gw.url("/override")).await.echo().headers["x-tags"], vec!["L", "H"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_specific_instance_wins() {
    let up = echo_upstream().await;
    let journal = Journal::default();
    let gw = start(
        &format!(
            r#"_format_version: "3.0"
consumers:
- username: alice
  plugins: [{{name: low, config: {{tag: consumer-alice}}}}]
- username: bob
services:
- name: s
  url: http://{up}
  routes:
  - {{name: with-route-plugin, paths: ["/route"], plugins: [{{name: low, config: {{tag: route}}}}]}}
  - {{name: service-only, paths: ["/service"]}}
  plugins: [{{name: low, config: {{tag: service}}}}, {{name: header-auth}}]
- name: other
  url: http://{up}
  routes: [{{name: global-only, paths: ["/global"]}}]
  plugins: [{{name: header-auth}}]
plugins:
- {{name: low, config: {{tag: global}}}}
- {{name: low, route: with-route-plugin, consumer: bob, config: {{tag: bob-on-route}}}}
"#,
            up = up.addr
        ),
        &journal,
    )
    .await;
    let tags = |path: &'static str, user: Option<&'static str>| {
        let url = gw.url(path);
        async move {
            let mut req = Request::get(url);
            if let Some(u) = user {
                req = req.header("x-user", u);
            }
            send(req.body(full("")).unwrap()).await.echo().headers["x-tags"].clone()
        }
    };
    assert_eq!(tags("/route", None).await, ["route"]);
    assert_eq!(tags("/service", None).await, ["service"]);
    assert_eq!(tags("/global", None).await, ["global"]);
    // Consumer-only beats service and global, but not route+service... except here the route
    // instance is route-only (rank 3), so alice's consumer instance (rank 4) wins everywhere.
    assert_eq!(tags("/route", Some("alice")).await, ["consumer-alice"]);
    assert_eq!(tags("/global", Some("alice")).await, ["consumer-alice"]);
    // consumer+route beats everything on that route, and only there.
    assert_eq!(tags("/route", Some("bob")).await, ["bob-on-route"]);
    assert_eq!(tags("/service", Some("bob")).await, ["service"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_plugin_config_fails_only_its_routes() {
    let up = echo_upstream().await;
    let journal = Journal::default();
    let gw = start(
        &format!(
            r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes:
  - {{name: broken, paths: ["/broken"], plugins: [{{name: low, config: {{tag: x, colour: red}}}}]}}
  - {{name: cycle, paths: ["/cycle"], plugins: [
      {{name: high, config: {{tag: H}}, ordering: {{after: [low]}}}},
      {{name: low, config: {{tag: L}}, ordering: {{after: [high]}}}}]}}
  - {{name: fine, paths: ["/fine"]}}
"#,
            up.addr
        ),
        &journal,
    )
    .await;
    for path in ["/broken", "/cycle"] {
        let resp = get(&gw.url(path)).await;
        assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        assert_eq!(resp.json()["message"], "An unexpected error occurred");
    }
    assert_eq!(get(&gw.url("/fine")).await.status, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_layers_wrap_the_upstream_call() {
    let up = echo_upstream().await;
    let journal = Journal::default();
    let gw = start(
        &format!(
            r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes: [{{name: r, paths: ["/"]}}]
  plugins: [{{name: high, config: {{tag: H, layer: true}}}}]
"#,
            up.addr
        ),
        &journal,
    )
    .await;
    let resp = get(&gw.url("/x")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.headers["x-layer"], "H");
    assert_eq!(resp.echo().headers["x-tags"], vec!["H"]);
    gw.shutdown().await;
}

#[test]
fn unknown_plugins_and_unowned_credentials_are_config_errors() {
    let journal = Journal::default();
    let config = Config::from_yaml(
        "_format_version: \"3.0\"\nplugins: [{name: nope}]\nconsumers: [{username: a, keyauth_credentials: [{key: k}]}]\n",
    )
    .unwrap();
    let err = Gateway::builder().plugins(registry(&journal)).build(&config).unwrap_err().to_string();
    assert!(err.contains("plugins[0]: unknown plugin `nope`"), "{err}");
    assert!(err.contains("consumers[0].keyauth_credentials: `keyauth_credentials` needs a plugin"), "{err}");
}
