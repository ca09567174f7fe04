//! The Kubernetes objects the adapter reads, the Kong kinds it understands, and parsing them
//! from manifest text (multi-document YAML, JSON, `List` kinds).

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API group of the Kong kinds.
pub const KONG_GROUP: &str = "configuration.konghq.com";

macro_rules! kong_kind {
    ($ty:ident, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(KONG_GROUP)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed("v1")
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// The fields KongPlugin and KongClusterPlugin share (at the top level of the object, beside
/// `metadata`: Kong's CRDs have no `spec`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginFields {
    /// The plugin's name in the registry (`rate-limiting`, `key-auth`, ...).
    pub plugin: String,
    /// The plugin's config, as in a Kong config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
    /// Kong's `configFrom` (config from a Secret): reported as not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_from: Option<Value>,
    /// `true` keeps the object but applies nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Protocols the plugin runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<String>>,
    /// Kong's dynamic plugin ordering, passed to the plugin entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Value>,
    /// Kong's instance name (snake case in Kong's CRD too).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "instance_name")]
    pub instance_name: Option<String>,
}

/// `configuration.konghq.com/v1` `KongPlugin`: a configured plugin, attached to Ingresses,
/// Services and KongConsumers of its namespace by the `konghq.com/plugins` annotation.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct KongPlugin {
    /// Standard object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The plugin and its config.
    #[serde(flatten)]
    pub fields: PluginFields,
}
kong_kind!(KongPlugin, "KongPlugin", "kongplugins", kube::core::NamespaceResourceScope);

/// `configuration.konghq.com/v1` `KongClusterPlugin`: a cluster-wide plugin. With the label
/// `global: "true"` it applies to every route; otherwise annotations name it like a
/// KongPlugin (a KongPlugin of the same name in the namespace wins).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct KongClusterPlugin {
    /// Standard object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The plugin and its config.
    #[serde(flatten)]
    pub fields: PluginFields,
}
kong_kind!(KongClusterPlugin, "KongClusterPlugin", "kongclusterplugins", kube::core::ClusterResourceScope);

/// `configuration.konghq.com/v1` `KongConsumer`: a consumer, its credentials (Secrets of its
/// namespace labelled `konghq.com/credential: key-auth|jwt|acl`) and, by annotation, its
/// plugins.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KongConsumer {
    /// Standard object metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The consumer's username.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The consumer's custom id.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "custom_id")]
    pub custom_id: Option<String>,
    /// Names of credential Secrets in the consumer's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<String>,
}
kong_kind!(KongConsumer, "KongConsumer", "kongconsumers", kube::core::NamespaceResourceScope);

/// Every object the translation reads, by kind. Order inside a kind does not matter: the
/// translation sorts what it needs to.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// `networking.k8s.io/v1` Ingresses.
    pub ingresses: Vec<Ingress>,
    /// `networking.k8s.io/v1` IngressClasses.
    pub ingress_classes: Vec<IngressClass>,
    /// `v1` Services.
    pub services: Vec<Service>,
    /// `discovery.k8s.io/v1` EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// `v1` Secrets (TLS certificates and consumer credentials).
    pub secrets: Vec<Secret>,
    /// KongPlugins.
    pub kong_plugins: Vec<KongPlugin>,
    /// KongClusterPlugins.
    pub kong_cluster_plugins: Vec<KongClusterPlugin>,
    /// KongConsumers.
    pub kong_consumers: Vec<KongConsumer>,
}

/// A problem reading a manifest document: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestProblem {
    /// The file, with the document's index when the file holds several (`a.yaml#2`).
    pub source: String,
    /// What is wrong, naming the object when it has a name.
    pub message: String,
}

impl std::fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.source, self.message)
    }
}

/// Kinds that are valid Kubernetes objects but mean nothing to the gateway: skipped silently,
/// so a folder holding a whole application's manifests loads.
const IGNORED_KINDS: &[&str] = &[
    "Namespace",
    "ServiceAccount",
    "ConfigMap",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Pod",
    "Job",
    "CronJob",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
    "Endpoints",
    "Lease",
];

impl Objects {
    /// Adds every object in one manifest text (YAML with `---` separated documents, or JSON;
    /// `kind: List` items are unpacked). Documents that cannot be read are returned as
    /// problems naming `source` and the document; the others are added.
    pub fn add_manifest(&mut self, source: &str, text: &str) -> Vec<ManifestProblem> {
        let mut problems = Vec::new();
        // A JSON file is one document; JSON documents separated by `---` are a YAML stream
        // (JSON is YAML), read below.
        let json = text.trim_start().starts_with('{').then(|| serde_json::from_str::<Value>(text).ok()).flatten();
        let documents: Vec<Result<Value, String>> = if let Some(value) = json {
            vec![Ok(value)]
        } else {
            // The parser cannot be trusted past a syntax error: it repeats the error forever
            // (an unclosed `{`) or panics (`unexpected end of mapping`). Both were found by
            // the `ingress_translate` fuzz target. So reading stops at the first error, and
            // a panic in the parser is a problem with the file, not the end of the process.
            let read = std::panic::catch_unwind(|| {
                let mut documents = Vec::new();
                for doc in serde_norway::Deserializer::from_str(text) {
                    let doc = Value::deserialize(doc).map_err(|e| format!("{e} (the rest of the file is not read)"));
                    let failed = doc.is_err();
                    documents.push(doc);
                    if failed {
                        break;
                    }
                }
                documents
            });
            read.unwrap_or_else(|_| vec![Err("the YAML parser failed on this file; it is not read".to_string())])
        };
        let many = documents.len() > 1;
        for (i, doc) in documents.into_iter().enumerate() {
            let at = if many { format!("{source}#{}", i + 1) } else { source.to_string() };
            match doc {
                Ok(Value::Null) => {}
                Ok(value) => self.add_value(&at, value, &mut problems),
                Err(message) => problems.push(ManifestProblem { source: at, message }),
            }
        }
        problems
    }

    fn add_value(&mut self, at: &str, value: Value, problems: &mut Vec<ManifestProblem>) {
        let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        let name = value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
        let namespace = value.pointer("/metadata/namespace").and_then(Value::as_str).map(str::to_string);
        let mut fail = |message: String| {
            let who = match (&namespace, name.is_empty()) {
                (_, true) => kind.clone(),
                (Some(ns), false) => format!("{kind} {ns}/{name}"),
                (None, false) => format!("{kind} {name}"),
            };
            problems.push(ManifestProblem { source: at.to_string(), message: format!("{who}: {message}") });
        };
        if kind.ends_with("List") && value.get("items").is_some() {
            if let Some(Value::Array(items)) = value.get("items").cloned() {
                for (i, item) in items.into_iter().enumerate() {
                    self.add_value(&format!("{at} items[{i}]"), item, problems);
                }
            }
            return;
        }
        if kind.is_empty() || api_version.is_empty() {
            fail("not a Kubernetes object: `apiVersion` and `kind` are required".into());
            return;
        }
        macro_rules! push {
            ($list:ident, $expected:literal) => {{
                if api_version != $expected {
                    fail(format!("apiVersion `{api_version}` is not supported, use `{}`", $expected));
                    return;
                }
                match serde_json::from_value(value) {
                    Ok(object) => self.$list.push(object),
                    Err(e) => fail(e.to_string()),
                }
            }};
        }
        match kind.as_str() {
            "Ingress" => push!(ingresses, "networking.k8s.io/v1"),
            "IngressClass" => push!(ingress_classes, "networking.k8s.io/v1"),
            "Service" => push!(services, "v1"),
            "EndpointSlice" => push!(endpoint_slices, "discovery.k8s.io/v1"),
            "Secret" => push!(secrets, "v1"),
            "KongPlugin" => push!(kong_plugins, "configuration.konghq.com/v1"),
            "KongClusterPlugin" => push!(kong_cluster_plugins, "configuration.konghq.com/v1"),
            "KongConsumer" => push!(kong_consumers, "configuration.konghq.com/v1"),
            other if IGNORED_KINDS.contains(&other) => {}
            other => fail(format!("kind `{other}` ({api_version}) is not read by the gateway; skipped")),
        }
    }
}

/// The namespace of an object's metadata (`default` when unset, as `kubectl apply` does).
pub(crate) fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// An object's annotations (empty when it has none).
pub(crate) fn annotations(meta: &ObjectMeta) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    meta.annotations.as_ref().unwrap_or(&EMPTY)
}

/// An object's labels (empty when it has none).
pub(crate) fn labels(meta: &ObjectMeta) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    meta.labels.as_ref().unwrap_or(&EMPTY)
}
