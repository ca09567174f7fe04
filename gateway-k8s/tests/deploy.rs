//! `deploy/`: every manifest parses, the CRD schemas match the Rust types (no drift), and the
//! IngressClass names the controller the gateway answers to by default.

use std::collections::BTreeSet;

use gateway_k8s::translate::DEFAULT_CONTROLLER_NAME;
use gateway_k8s::{KongClusterPlugin, KongConsumer, KongPlugin, Objects, PluginFields};
use kube::Resource;
use serde_json::Value;

fn deploy_documents() -> Vec<(String, Value)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let value: Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{}#{i}: {e}", file.display()));
            if !value.is_null() {
                docs.push((format!("{}#{i}", file.display()), value));
            }
        }
    }
    docs
}

#[test]
fn every_deploy_manifest_parses_and_the_class_is_ours() {
    let docs = deploy_documents();
    assert!(docs.len() >= 10, "{} documents", docs.len());
    let mut objects = Objects::default();
    for (at, doc) in &docs {
        assert!(doc["apiVersion"].is_string() && doc["kind"].is_string(), "{at}: apiVersion and kind");
        assert!(doc["metadata"]["name"].is_string(), "{at}: metadata.name");
        let problems = objects.add_manifest(at, &doc.to_string());
        assert!(problems.is_empty(), "{problems:?}");
    }
    let class = &objects.ingress_classes[0];
    assert_eq!(class.spec.as_ref().unwrap().controller.as_deref(), Some(DEFAULT_CONTROLLER_NAME));
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|(_, d)| d["kind"].as_str()).collect();
    for kind in
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "IngressClass"]
    {
        assert!(kinds.contains(kind), "deploy/ has no {kind}");
    }
    let deployment = docs.iter().find(|(_, d)| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment.1["spec"]["replicas"], 2);
}

/// The top-level fields a fully populated value serializes (its CRD's properties).
fn fields(value: Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().filter(|k| *k != "metadata").cloned().collect()
}

fn full_plugin() -> PluginFields {
    PluginFields {
        plugin: "p".into(),
        config: Some(Value::Object(Default::default())),
        config_from: Some(Value::Object(Default::default())),
        disabled: true,
        protocols: Some(vec!["http".into()]),
        ordering: Some(Value::Object(Default::default())),
        instance_name: Some("i".into()),
    }
}

#[test]
fn crd_schemas_match_the_rust_types() {
    let docs = deploy_documents();
    let crd = |kind: &str| {
        docs.iter()
            .map(|(_, d)| d)
            .find(|d| d["kind"] == "CustomResourceDefinition" && d["spec"]["names"]["kind"] == kind)
            .unwrap_or_else(|| panic!("no CRD for {kind}"))
            .clone()
    };
    let check = |kind: &str, plural: &str, group: &str, namespaced: bool, rust: BTreeSet<String>| {
        let crd = crd(kind);
        assert_eq!(crd["spec"]["group"], group, "{kind}");
        assert_eq!(crd["spec"]["names"]["plural"], plural, "{kind}");
        assert_eq!(crd["metadata"]["name"], format!("{plural}.{group}"), "{kind}");
        assert_eq!(crd["spec"]["scope"], if namespaced { "Namespaced" } else { "Cluster" }, "{kind}");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        let declared: BTreeSet<String> = schema
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !["apiVersion", "kind", "metadata"].contains(&k.as_str()))
            .cloned()
            .collect();
        assert_eq!(declared, rust, "{kind}: CRD properties vs Rust fields");
    };
    let plugin = KongPlugin { fields: full_plugin(), ..Default::default() };
    check(
        "KongPlugin",
        &KongPlugin::plural(&()),
        &KongPlugin::group(&()),
        true,
        fields(serde_json::to_value(plugin).unwrap()),
    );
    let cluster = KongClusterPlugin { fields: full_plugin(), ..Default::default() };
    check(
        "KongClusterPlugin",
        &KongClusterPlugin::plural(&()),
        &KongClusterPlugin::group(&()),
        false,
        fields(serde_json::to_value(cluster).unwrap()),
    );
    let consumer = KongConsumer {
        username: Some("u".into()),
        custom_id: Some("c".into()),
        credentials: vec!["s".into()],
        ..Default::default()
    };
    check(
        "KongConsumer",
        &KongConsumer::plural(&()),
        &KongConsumer::group(&()),
        true,
        fields(serde_json::to_value(consumer).unwrap()),
    );
}
