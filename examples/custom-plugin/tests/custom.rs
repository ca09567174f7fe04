//! The custom plugin, configured from YAML, through a real gateway and upstream.

#[path = "../../../gateway-core/tests/common/mod.rs"]
mod common;

use common::*;
use gateway_core::Gateway;
use gateway_core::config::Config;
use gateway_core::server::ServerSettings;
use http::{Request, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_custom_plugin_filters_and_tags_from_its_yaml_config() {
    let up = echo_upstream().await;
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kong.yml"))
        .unwrap()
        .replace("127.0.0.1:9000", &up.addr.to_string());
    let gateway =
        Gateway::builder().plugins(custom_plugin::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
    let gw = start_running(gateway, ServerSettings::default()).await;

    let refused = send(Request::get(gw.url("/")).header("user-agent", "curl/8.0").body(full("")).unwrap()).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["message"], "User-Agent not allowed");

    let passed = send(Request::get(gw.url("/")).header("user-agent", "Mozilla/5.0").body(full("")).unwrap()).await;
    assert_eq!(passed.status, StatusCode::OK);
    assert_eq!(passed.echo().header("x-user-agent-filter"), Some("passed 2 rules"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_the_plugin_config_fails_its_route_and_names_the_field() {
    let up = echo_upstream().await;
    let yaml = format!(
        r#"_format_version: "3.0"
services:
- name: s
  url: http://{}
  routes: [{{name: r, paths: ["/"]}}]
  plugins: [{{name: user-agent-filter, config: {{deny: [x], stauts: 403}}}}]
"#,
        up.addr
    );
    let gateway =
        Gateway::builder().plugins(custom_plugin::registry()).build(&Config::from_yaml(&yaml).unwrap()).unwrap();
    // The gateway loads; the route is the one that fails, closed.
    let gw = start_running(gateway, ServerSettings::default()).await;
    let resp = get(&gw.url("/")).await;
    assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR);
    gw.shutdown().await;
    let err = custom_plugin::UserAgentFilter::new(serde_json::from_str(r#"{"deny": []}"#).unwrap()).err().unwrap();
    assert!(err.contains("`deny` must list"), "{err}");
    let typo =
        serde_json::from_str::<custom_plugin::UserAgentFilterConfig>(r#"{"deny": ["x"], "stauts": 403}"#).unwrap_err();
    assert!(typo.to_string().contains("unknown field `stauts`"), "{typo}");
}
