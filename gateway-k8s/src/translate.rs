//! The translation: a set of Kubernetes objects to one core [`Config`].
//!
//! It is a pure function of its input ([`translate`]); [`translate_checked`] adds the one
//! impure step, compiling the result, and keeps every other object serving when the compiler
//! refuses something an object produced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use gateway_core::config::{
    Certificate, Config, ConfigError, Consumer, PathType, Plugin, Problem, Route, RouteProtocol, Service,
    ServiceProtocol, SniName, Target, Upstream,
};
use k8s_openapi::api::core::v1::{Secret, Service as K8sService, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressServiceBackend};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use crate::objects::{KongClusterPlugin, KongPlugin, Objects, PluginFields, annotations, labels, namespace};

/// Struct-update syntax for config entities (their not-yet-supported Kong fields are private
/// to the core, which rules out `..Default::default()` here).
macro_rules! with {
    ($base:expr, { $($field:ident : $value:expr),* $(,)? }) => {{
        let mut v = $base;
        $(v.$field = $value;)*
        v
    }};
}

/// The ingress class served when none is configured.
pub const DEFAULT_INGRESS_CLASS: &str = "gateway";
/// The `spec.controller` of an IngressClass this gateway serves, when none is configured.
pub const DEFAULT_CONTROLLER_NAME: &str = "gateway.dev/ingress-controller";

const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const CREDENTIAL_LABEL: &str = "konghq.com/credential";
const KONG: &str = "konghq.com/";
/// The Kong service (and its upstream without targets) that answers 503 for every path whose
/// backend is missing, has no ready endpoint, or belongs to a broken object.
pub const UNAVAILABLE: &str = "k8s-unavailable";

/// What the translation needs to know besides the objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The ingress class served (`--ingress-class`, default [`DEFAULT_INGRESS_CLASS`]).
    pub ingress_class: String,
    /// The IngressClass `spec.controller` that means this gateway (`--controller-name`,
    /// default [`DEFAULT_CONTROLLER_NAME`]).
    pub controller_name: String,
}

impl Default for Options {
    fn default() -> Self {
        Options { ingress_class: DEFAULT_INGRESS_CLASS.into(), controller_name: DEFAULT_CONTROLLER_NAME.into() }
    }
}

/// Names one Kubernetes object: `Ingress default/web`, `KongClusterPlugin global-cors`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The object's kind.
    pub kind: String,
    /// Its namespace (none for cluster-scoped kinds).
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl ObjectRef {
    fn new(kind: &str, meta: &ObjectMeta, namespaced: bool) -> Self {
        ObjectRef {
            kind: kind.into(),
            namespace: namespaced.then(|| namespace(meta).to_string()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// Kong-controller style tags that record the object an entity came from.
    fn tags(&self) -> Vec<String> {
        let mut tags = vec![format!("k8s-kind:{}", self.kind)];
        if let Some(ns) = &self.namespace {
            tags.push(format!("k8s-namespace:{ns}"));
        }
        tags.push(format!("k8s-name:{}", self.name));
        tags
    }

    fn from_tags(tags: &[String]) -> Option<Self> {
        let get = |key: &str| tags.iter().find_map(|t| t.strip_prefix(key)).map(str::to_string);
        Some(ObjectRef { kind: get("k8s-kind:")?, namespace: get("k8s-namespace:"), name: get("k8s-name:")? })
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A problem found on one object. The object's own routes answer 503 (or the object is left
/// out, see [`translate_checked`]); every other object keeps serving.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectProblem {
    /// The object the problem is on.
    pub object: ObjectRef,
    /// What is wrong.
    pub message: String,
}

impl ObjectProblem {
    /// A short, bounded category for metrics labels (the message has names in it).
    pub fn reason(&self) -> &'static str {
        let m = self.message.as_str();
        if m.starts_with("refused by the gateway") {
            "refused by the gateway"
        } else if m.contains("is broken") {
            "depends on a broken object"
        } else if m.contains("not found") || m.contains("has no port") || m.contains("names no port") {
            "missing reference"
        } else if m.contains("annotation") {
            "bad annotation"
        } else if m.contains("already") {
            "conflict"
        } else {
            "invalid"
        }
    }
}

impl fmt::Display for ObjectProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// The result of a translation.
#[derive(Debug, Clone, Default)]
pub struct Translation {
    /// The config: one Kong service and upstream per (Service, port) in use, one route per
    /// Ingress path, certificates from TLS Secrets, consumers from KongConsumers.
    pub config: Config,
    /// Problems, sorted by object.
    pub problems: Vec<ObjectProblem>,
    /// The Ingresses of our class (they get `status.loadBalancer` in live mode).
    pub ingresses: Vec<ObjectRef>,
}

/// How badly the compiler found an object broken (see [`translate_checked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// Its routes answer 503, with no plugins; a plugin in this state is missing.
    Quarantined,
    /// Left out entirely.
    Dropped,
}

type Faults = BTreeMap<ObjectRef, Fault>;

/// Translates `objects` into a config. Pure: the same objects give the same config.
///
/// Ingress v1 semantics:
/// - `Exact` paths match the whole path, case-sensitively; `Prefix` paths match by path
///   element (`/aaa` matches `/aaa/ccc`, not `/aaaccc`; a trailing slash is ignored);
///   `ImplementationSpecific` is `Prefix`, except a path starting with `/~` (Kong's regex
///   marker) or any path of an Ingress annotated `nginx.ingress.kubernetes.io/use-regex:
///   "true"`, which is a regex anchored at the start of the path;
/// - the longest path wins, and `Exact` beats `Prefix` at equal length; a rule with a host
///   beats a rule without one (the core router's precedence);
/// - `*.foo.com` matches exactly one label; rules without a host match any host;
/// - the oldest Ingress's `spec.defaultBackend` serves requests nothing else matches;
/// - when two Ingresses claim the same host, path and path type, the older one wins (by
///   `creationTimestamp`, objects without one counting as newest, then by namespace/name)
///   and the other's path is reported.
pub fn translate(objects: &Objects, options: &Options) -> Translation {
    translate_with(objects, options, &Faults::new())
}

/// [`translate`], then `check` (normally the gateway's own compile: `Gateway::reload`, then
/// `Gateway::plugin_failures` for the `Ok` side).
///
/// When the check refuses the config, each problem is traced to the object that produced it
/// (by the entity's `k8s-*` tags): that object's routes are made to answer 503 without its
/// plugins (or, if its routes themselves are refused, it is left out), the problem is
/// reported on it, and the translation is tried again. Only the broken objects lose service.
///
/// Problems the check accepts the config with (a plugin whose config its plugin refused: the
/// routes it applies to answer 500) are reported on the object too.
///
/// The returned error is the check's, when a problem could not be traced to an object.
pub fn translate_checked(
    objects: &Objects,
    options: &Options,
    mut check: impl FnMut(&Config) -> Result<Vec<Problem>, ConfigError>,
) -> Result<Translation, ConfigError> {
    let mut faults = Faults::new();
    let mut found: Vec<ObjectProblem> = Vec::new();
    loop {
        let mut translation = translate_with(objects, options, &faults);
        let error = match check(&translation.config) {
            Ok(soft) => {
                for problem in soft {
                    if let Some(object) = origin_at(&translation.config, &problem.at) {
                        let message =
                            format!("{}: {}; the routes it applies to answer 500", problem.at, problem.message);
                        found.push(ObjectProblem { object, message });
                    }
                }
                translation.problems.extend(found);
                translation.problems.sort();
                translation.problems.dedup();
                return Ok(translation);
            }
            Err(error) => error,
        };
        let mut progress = false;
        for problem in &error.problems {
            let Some(object) = origin_at(&translation.config, &problem.at) else {
                return Err(error);
            };
            let fault = faults.entry(object.clone()).or_insert(Fault::Quarantined);
            let message = format!("refused by the gateway: {}: {}", problem.at, problem.message);
            if !found.iter().any(|p| p.object == object && p.message == message) {
                found.push(ObjectProblem { object: object.clone(), message });
                progress = true;
            } else if *fault == Fault::Quarantined {
                *fault = Fault::Dropped;
                progress = true;
            }
        }
        if !progress {
            return Err(error);
        }
    }
}

/// The object an entity named by a compile problem's `at` (`services[2] (name "x").routes[0]
/// .plugins[1].config`) came from: the deepest entity on the path that carries `k8s-*` tags.
fn origin_at(config: &Config, at: &str) -> Option<ObjectRef> {
    let mut found = None;
    let mut service: Option<&Service> = None;
    let mut route: Option<&Route> = None;
    let mut consumer: Option<&Consumer> = None;
    // Drop the ` (name "...")` labels: names hold dots.
    let mut path = String::with_capacity(at.len());
    let mut rest = at;
    while let Some(i) = rest.find(" (name \"") {
        path.push_str(&rest[..i]);
        rest = rest[i..].find("\")").map_or("", |j| &rest[i + j + 2..]);
    }
    path.push_str(rest);
    for segment in path.split('.') {
        let Some((field, rest)) = segment.split_once('[') else { break };
        let Some(index) = rest.split(']').next().and_then(|i| i.parse::<usize>().ok()) else { break };
        let tags: Option<&[String]> = match (field, service, route, consumer) {
            ("services", None, None, None) => {
                service = config.services.get(index);
                service.map(|s| &s.tags[..])
            }
            ("routes", Some(s), None, _) => {
                route = s.routes.get(index);
                route.map(|r| &r.tags[..])
            }
            ("routes", None, None, None) => {
                route = config.routes.get(index);
                route.map(|r| &r.tags[..])
            }
            ("upstreams", None, None, None) => config.upstreams.get(index).map(|u| &u.tags[..]),
            ("certificates", None, None, None) => config.certificates.get(index).map(|c| &c.tags[..]),
            ("consumers", None, None, None) => {
                consumer = config.consumers.get(index);
                consumer.map(|c| &c.tags[..])
            }
            ("plugins", s, r, c) => {
                let list = match (r, s, c) {
                    (Some(r), _, _) => &r.plugins,
                    (None, Some(s), _) => &s.plugins,
                    (None, None, Some(c)) => &c.plugins,
                    (None, None, None) => &config.plugins,
                };
                list.get(index).map(|p| &p.tags[..])
            }
            _ => None,
        };
        match tags.and_then(ObjectRef::from_tags) {
            Some(object) => found = Some(object),
            None if tags.is_none() => break,
            None => {}
        }
    }
    found
}

/// A backend a route can be sent to: a Kong service by index, or the 503 service.
#[derive(Clone, Copy)]
enum Backend {
    Service(usize),
    Unavailable,
}

struct Translator<'a> {
    objects: &'a Objects,
    options: &'a Options,
    faults: &'a Faults,
    config: Config,
    problems: Vec<ObjectProblem>,
    services: HashMap<(&'a str, &'a str), &'a K8sService>,
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    secrets: HashMap<(&'a str, &'a str), &'a Secret>,
    plugins: HashMap<(&'a str, &'a str), &'a KongPlugin>,
    cluster_plugins: HashMap<&'a str, &'a KongClusterPlugin>,
    /// Kong service index by (namespace, Service, port as written).
    backends: HashMap<(String, String, String), Result<usize, String>>,
    unavailable: Option<usize>,
    /// Broken Services already reported.
    reported: BTreeSet<ObjectRef>,
}

fn translate_with(objects: &Objects, options: &Options, faults: &Faults) -> Translation {
    let mut t = Translator {
        objects,
        options,
        faults,
        config: with!(Config::default(), { format_version: "3.0".into()}),
        problems: Vec::new(),
        services: objects
            .services
            .iter()
            .filter_map(|s| Some(((namespace(&s.metadata), s.metadata.name.as_deref()?), s)))
            .collect(),
        slices: HashMap::new(),
        secrets: objects
            .secrets
            .iter()
            .filter_map(|s| Some(((namespace(&s.metadata), s.metadata.name.as_deref()?), s)))
            .collect(),
        plugins: objects
            .kong_plugins
            .iter()
            .filter_map(|p| Some(((namespace(&p.metadata), p.metadata.name.as_deref()?), p)))
            .collect(),
        cluster_plugins: objects
            .kong_cluster_plugins
            .iter()
            .filter_map(|p| Some((p.metadata.name.as_deref()?, p)))
            .collect(),
        backends: HashMap::new(),
        unavailable: None,
        reported: BTreeSet::new(),
    };
    for slice in &objects.endpoint_slices {
        if let Some(service) = labels(&slice.metadata).get(SERVICE_NAME_LABEL) {
            t.slices.entry((namespace(&slice.metadata), service.as_str())).or_default().push(slice);
        }
    }
    let ingresses = t.ingresses();
    let served = ingresses.iter().map(|i| ObjectRef::new("Ingress", &i.metadata, true)).collect();
    t.routes(&ingresses);
    t.tls(&ingresses);
    t.consumers();
    t.global_plugins();
    let mut problems = t.problems;
    problems.sort();
    problems.dedup();
    Translation { config: t.config, problems, ingresses: served }
}

/// `"true"`/`"false"`, any case.
fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("`{value}` is not true or false")),
    }
}

fn parse_number<T: std::str::FromStr>(value: &str) -> Result<T, String> {
    value.trim().parse().map_err(|_| format!("`{value}` is not a valid number"))
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// The route fields an Ingress's annotations set.
#[derive(Default)]
struct RouteAnnotations {
    strip_path: Option<bool>,
    preserve_host: Option<bool>,
    methods: Vec<String>,
    protocols: Option<Vec<RouteProtocol>>,
    https_redirect_status_code: Option<u16>,
    regex_priority: Option<i64>,
    headers: BTreeMap<String, Vec<String>>,
    use_regex: bool,
}

/// The Kong annotations that belong on a Service (in Kong's controller too).
const SERVICE_ANNOTATIONS: &[&str] =
    &["connect-timeout", "read-timeout", "write-timeout", "retries", "host-header", "path", "protocol"];

fn route_annotations(meta: &ObjectMeta) -> (RouteAnnotations, Vec<String>, Vec<String>) {
    let mut a = RouteAnnotations::default();
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    for (key, value) in annotations(meta) {
        if key == "nginx.ingress.kubernetes.io/use-regex" {
            match parse_bool(value) {
                Ok(v) => a.use_regex = v,
                Err(e) => errors.push(format!("annotation `{key}`: {e}")),
            }
            continue;
        }
        let Some(name) = key.strip_prefix(KONG) else { continue };
        let result: Result<(), String> = match name {
            "strip-path" => parse_bool(value).map(|v| a.strip_path = Some(v)),
            "preserve-host" => parse_bool(value).map(|v| a.preserve_host = Some(v)),
            "methods" => split_list(value)
                .map(|m| {
                    if m.bytes().all(|b| b.is_ascii_alphabetic()) {
                        Ok(m.to_ascii_uppercase())
                    } else {
                        Err(format!("`{m}` is not an HTTP method"))
                    }
                })
                .collect::<Result<_, _>>()
                .map(|v| a.methods = v),
            "protocols" => split_list(value)
                .map(|p| {
                    serde_json::from_value::<RouteProtocol>(Value::String(p.to_ascii_lowercase()))
                        .map_err(|_| format!("`{p}` is not a protocol (http, https, grpc, grpcs)"))
                })
                .collect::<Result<_, _>>()
                .map(|v| a.protocols = Some(v)),
            "https-redirect-status-code" => parse_number::<u16>(value).and_then(|code| {
                if [301, 302, 307, 308, 426].contains(&code) {
                    a.https_redirect_status_code = Some(code);
                    Ok(())
                } else {
                    Err(format!("`{value}` must be 301, 302, 307, 308 or 426"))
                }
            }),
            "regex-priority" => parse_number(value).map(|v| a.regex_priority = Some(v)),
            "plugins" | "ingress.class" => Ok(()),
            other => match other.strip_prefix("headers.") {
                Some(header) if !header.is_empty() => {
                    a.headers.insert(header.to_ascii_lowercase(), split_list(value).map(str::to_string).collect());
                    Ok(())
                }
                _ if SERVICE_ANNOTATIONS.contains(&other) => {
                    notes.push(format!("annotation `{key}` belongs on the Service and is ignored here"));
                    Ok(())
                }
                _ => {
                    notes.push(format!("annotation `{key}` is not supported and is ignored"));
                    Ok(())
                }
            },
        };
        if let Err(e) = result {
            errors.push(format!("annotation `{key}`: {e}"));
        }
    }
    (a, errors, notes)
}

impl<'a> Translator<'a> {
    fn problem(&mut self, object: &ObjectRef, message: impl Into<String>) {
        self.problems.push(ObjectProblem { object: object.clone(), message: message.into() });
    }

    fn fault(&self, object: &ObjectRef) -> Option<Fault> {
        self.faults.get(object).copied()
    }

    /// Whether a class name is ours: an IngressClass of that name decides by its controller;
    /// without one, the configured class name is ours.
    fn class_is_ours(&self, class: &str) -> bool {
        match self.objects.ingress_classes.iter().find(|c| c.metadata.name.as_deref() == Some(class)) {
            Some(ic) => {
                ic.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(self.options.controller_name.as_str())
            }
            None => class == self.options.ingress_class,
        }
    }

    fn default_class_is_ours(&self) -> bool {
        self.objects.ingress_classes.iter().any(|ic| {
            annotations(&ic.metadata).get(DEFAULT_CLASS_ANNOTATION).is_some_and(|v| v == "true")
                && ic.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(self.options.controller_name.as_str())
        })
    }

    /// Our Ingresses, oldest first (then by namespace/name).
    fn ingresses(&mut self) -> Vec<&'a Ingress> {
        let default_ours = self.default_class_is_ours();
        let mut ours: Vec<&Ingress> = self
            .objects
            .ingresses
            .iter()
            .filter(|i| {
                let legacy = annotations(&i.metadata).get(CLASS_ANNOTATION);
                let class =
                    legacy.map(String::as_str).or(i.spec.as_ref().and_then(|s| s.ingress_class_name.as_deref()));
                match class {
                    Some(class) => self.class_is_ours(class),
                    None => default_ours,
                }
            })
            .filter(|i| self.fault(&ObjectRef::new("Ingress", &i.metadata, true)) != Some(Fault::Dropped))
            .collect();
        ours.sort_by(|a, b| {
            let key = |i: &&Ingress| {
                (
                    i.metadata.creation_timestamp.is_none(),
                    i.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    namespace(&i.metadata).to_string(),
                    i.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        ours
    }

    /// The plugins an object's `konghq.com/plugins` (or legacy `plugins.konghq.com`)
    /// annotation names, resolved in its namespace: a KongPlugin, else a KongClusterPlugin.
    fn annotated_plugins(&self, meta: &ObjectMeta) -> Result<Vec<Plugin>, String> {
        let a = annotations(meta);
        let Some(list) = a.get("konghq.com/plugins").or_else(|| a.get("plugins.konghq.com")) else {
            return Ok(Vec::new());
        };
        let ns = namespace(meta);
        let mut plugins = Vec::new();
        for name in split_list(list) {
            let (object, fields) = if let Some(p) = self.plugins.get(&(ns, name)) {
                (ObjectRef::new("KongPlugin", &p.metadata, true), &p.fields)
            } else if let Some(p) = self.cluster_plugins.get(name) {
                (ObjectRef::new("KongClusterPlugin", &p.metadata, false), &p.fields)
            } else {
                return Err(format!(
                    "plugin `{name}` not found: no KongPlugin `{name}` in namespace `{ns}` and no KongClusterPlugin `{name}`"
                ));
            };
            if self.fault(&object).is_some() {
                return Err(format!("plugin `{name}`: {object} is broken (see its problems)"));
            }
            if let Some(plugin) =
                plugin_entity(&object, fields).map_err(|e| format!("plugin `{name}`: {object}: {e}"))?
            {
                plugins.push(plugin);
            }
        }
        Ok(plugins)
    }

    /// The 503 service, created on first use.
    fn unavailable(&mut self) -> usize {
        if let Some(i) = self.unavailable {
            return i;
        }
        self.config.upstreams.push(with!(Upstream::default(), { name: format!("{UNAVAILABLE}.svc")}));
        self.config.services.push(with!(Service::default(), {
                    name: Some(UNAVAILABLE.into()),
                    host: Some(format!("{UNAVAILABLE}.svc")),
                    port: Some(80),
                    retries: Some(0),
        }));
        let i = self.config.services.len() - 1;
        self.unavailable = Some(i);
        i
    }

    /// The Kong service for an Ingress backend, created on first use. `Err` says why the
    /// backend cannot serve (its paths answer 503).
    fn backend(&mut self, ns: &'a str, backend: &'a IngressServiceBackend) -> Result<usize, String> {
        let port_key = match &backend.port {
            Some(p) => match (&p.number, &p.name) {
                (Some(n), _) => n.to_string(),
                (None, Some(n)) => n.clone(),
                (None, None) => return Err(format!("backend Service `{}` names no port", backend.name)),
            },
            None => return Err(format!("backend Service `{}` names no port", backend.name)),
        };
        let key = (ns.to_string(), backend.name.clone(), port_key.clone());
        if let Some(found) = self.backends.get(&key) {
            return found.clone();
        }
        let result = self.make_backend(ns, backend, &port_key);
        self.backends.insert(key, result.clone());
        result
    }

    fn make_backend(
        &mut self,
        ns: &'a str,
        backend: &'a IngressServiceBackend,
        port_key: &str,
    ) -> Result<usize, String> {
        let name = backend.name.as_str();
        let Some(svc) = self.services.get(&(ns, name)).copied() else {
            return Err(format!("Service `{ns}/{name}` not found"));
        };
        let svc_ref = ObjectRef::new("Service", &svc.metadata, true);
        if self.fault(&svc_ref).is_some() {
            return Err(format!("{svc_ref} is broken (see its problems)"));
        }
        let spec = svc.spec.as_ref();
        let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
        let number = backend.port.as_ref().and_then(|p| p.number);
        let port: Option<&ServicePort> = match number {
            Some(n) => ports.iter().find(|p| p.port == n),
            None => ports.iter().find(|p| p.name.as_deref() == Some(port_key)),
        };
        let external =
            spec.filter(|s| s.type_.as_deref() == Some("ExternalName")).and_then(|s| s.external_name.clone());
        let upstream_name = format!("{name}.{ns}.{port_key}.svc");
        let mut targets = BTreeSet::new();
        match (&external, port) {
            (Some(host), _) => {
                let Some(number) = port.map(|p| p.port).or(number) else {
                    return Err(format!("ExternalName {svc_ref} has no port `{port_key}`"));
                };
                targets.insert(format!("{host}:{number}"));
            }
            (None, None) => return Err(format!("{svc_ref} has no port `{port_key}`")),
            (None, Some(port)) => {
                for slice in self.slices.get(&(ns, name)).into_iter().flatten() {
                    let Some(target_port) = slice
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or(""))
                        .and_then(|p| p.port)
                    else {
                        continue;
                    };
                    let ipv6 = slice.address_type == "IPv6";
                    for endpoint in &slice.endpoints {
                        let conditions = endpoint.conditions.as_ref();
                        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                        if !ready || terminating {
                            continue;
                        }
                        for address in &endpoint.addresses {
                            targets.insert(if ipv6 {
                                format!("[{address}]:{target_port}")
                            } else {
                                format!("{address}:{target_port}")
                            });
                        }
                    }
                }
            }
        }
        // Service-level annotations (Kong's controller reads these on the Service).
        let mut service = with!(Service::default(), {
                    name: Some(format!("{ns}.{name}.{port_key}")),
                    host: Some(upstream_name.clone()),
                    port: Some(80),
                    tags: svc_ref.tags(),
        });
        if port.and_then(|p| p.app_protocol.as_deref()).is_some_and(|p| p.eq_ignore_ascii_case("https")) {
            service.protocol = Some(ServiceProtocol::Https);
        }
        let mut upstream = with!(Upstream::default(), {
                    name: upstream_name,
                    targets: targets.into_iter().map(|t| Target { target: t, ..Target::default() }).collect(),
                    tags: svc_ref.tags(),
        });
        let mut errors = Vec::new();
        for (key, value) in annotations(&svc.metadata) {
            let Some(a) = key.strip_prefix(KONG) else { continue };
            let timeout = |v: &str| {
                parse_number::<u64>(v).and_then(|ms| if ms == 0 { Err("must be above 0".to_string()) } else { Ok(ms) })
            };
            let result = match a {
                "connect-timeout" => timeout(value).map(|v| service.connect_timeout = Some(v)),
                "read-timeout" => timeout(value).map(|v| service.read_timeout = Some(v)),
                "write-timeout" => timeout(value).map(|v| service.write_timeout = Some(v)),
                "retries" => parse_number(value).map(|v| service.retries = Some(v)),
                "host-header" => {
                    upstream.host_header = Some(value.trim().to_string());
                    Ok(())
                }
                "path" => {
                    if value.starts_with('/') {
                        service.path = Some(value.clone());
                        Ok(())
                    } else {
                        Err(format!("`{value}` must start with `/`"))
                    }
                }
                "protocol" => serde_json::from_value::<ServiceProtocol>(Value::String(value.to_ascii_lowercase()))
                    .ok()
                    .filter(|p| {
                        matches!(
                            p,
                            ServiceProtocol::Http
                                | ServiceProtocol::Https
                                | ServiceProtocol::Grpc
                                | ServiceProtocol::Grpcs
                        )
                    })
                    .map(|p| service.protocol = Some(p))
                    .ok_or_else(|| format!("`{value}` is not http, https, grpc or grpcs")),
                _ => Ok(()),
            };
            if let Err(e) = result {
                errors.push(format!("annotation `{key}`: {e}"));
            }
        }
        // `annotated_plugins` reads `konghq.com/plugins`, else the legacy `plugins.konghq.com`.
        match self.annotated_plugins(&svc.metadata) {
            Ok(plugins) => service.plugins = plugins,
            Err(e) => errors.push(format!("plugins annotation: {e}")),
        }
        if !errors.is_empty() {
            if self.reported.insert(svc_ref.clone()) {
                for e in errors {
                    self.problem(&svc_ref, e);
                }
            }
            return Err(format!("{svc_ref} is broken (see its problems)"));
        }
        self.config.upstreams.push(upstream);
        self.config.services.push(service);
        Ok(self.config.services.len() - 1)
    }

    fn routes(&mut self, ingresses: &[&'a Ingress]) {
        // (host, path type, path) -> the Ingress that claimed it first.
        let mut claimed: HashMap<(&str, &str, &str), ObjectRef> = HashMap::new();
        let mut default_backend: Option<(ObjectRef, &'a str, &'a IngressBackend)> = None;
        for &ingress in ingresses {
            let me = ObjectRef::new("Ingress", &ingress.metadata, true);
            let ns = namespace(&ingress.metadata);
            let (a, errors, notes) = route_annotations(&ingress.metadata);
            for note in notes {
                self.problem(&me, note);
            }
            let mut broken = self.fault(&me).is_some();
            for e in errors {
                self.problem(&me, e);
                broken = true;
            }
            let plugins = match self.annotated_plugins(&ingress.metadata) {
                Ok(p) => p,
                Err(e) => {
                    self.problem(&me, e);
                    broken = true;
                    Vec::new()
                }
            };
            let Some(spec) = &ingress.spec else { continue };
            if let Some(backend) = &spec.default_backend {
                match &default_backend {
                    None => default_backend = Some((me.clone(), ns, backend)),
                    Some((winner, _, _)) => {
                        let message = format!("spec.defaultBackend ignored: {winner} (older) already sets one");
                        self.problem(&me, message);
                    }
                }
            }
            for (ri, rule) in spec.rules.iter().flatten().enumerate() {
                let host = rule.host.as_deref().unwrap_or("");
                if let Err(e) = check_host(host) {
                    self.problem(&me, format!("spec.rules[{ri}].host: {e}"));
                    continue;
                }
                for (pi, path) in rule.http.iter().flat_map(|h| &h.paths).enumerate() {
                    let at = format!("spec.rules[{ri}].http.paths[{pi}]");
                    let raw = path.path.as_deref().unwrap_or("/");
                    let (path_type, kong_path) = match path.path_type.as_str() {
                        "Exact" => (PathType::Exact, raw.to_string()),
                        "Prefix" => (PathType::ElementPrefix, raw.to_string()),
                        "ImplementationSpecific" => match raw.strip_prefix("/~") {
                            Some(re) => (PathType::Kong, format!("~{re}")),
                            None if a.use_regex => (PathType::Kong, format!("~{raw}")),
                            None => (PathType::ElementPrefix, raw.to_string()),
                        },
                        other => {
                            self.problem(
                                &me,
                                format!("{at}.pathType: `{other}` is not Exact, Prefix or ImplementationSpecific"),
                            );
                            continue;
                        }
                    };
                    if path_type != PathType::Kong && !raw.starts_with('/') {
                        self.problem(&me, format!("{at}.path: `{raw}` must start with `/`"));
                        continue;
                    }
                    let type_key = match path_type {
                        PathType::Exact => "Exact",
                        PathType::ElementPrefix => "Prefix",
                        PathType::Kong => "Regex",
                    };
                    // `/foo/` and `/foo` are the same Prefix.
                    let claim_path = if path_type == PathType::ElementPrefix && raw.len() > 1 {
                        raw.trim_end_matches('/')
                    } else {
                        raw
                    };
                    if let Some(winner) = claimed.get(&(host, type_key, claim_path)) {
                        let message = format!(
                            "{at}: host `{host}` path `{raw}` ({}) is already served by {winner} (older); ignored here",
                            path.path_type
                        );
                        self.problem(&me, message);
                        continue;
                    }
                    claimed.insert((host, type_key, claim_path), me.clone());
                    let target =
                        if broken { Backend::Unavailable } else { self.route_backend(&me, ns, &path.backend, &at) };
                    let route = with!(Route::default(), {
                                            name: Some(format!("{ns}.{}.{ri}.{pi}", me.name)),
                                            hosts: if host.is_empty() { Vec::new() } else { vec![host.to_string()] },
                                            paths: vec![kong_path],
                                            path_type: path_type,
                                            wildcard_single_label: true,
                                            methods: a.methods.clone(),
                                            headers: a.headers.clone(),
                                            protocols: a.protocols.clone(),
                                            https_redirect_status_code: a.https_redirect_status_code,
                                            regex_priority: a.regex_priority,
                                            // Kong's controller defaults: paths are not stripped, Host is kept.
                                            strip_path: Some(a.strip_path.unwrap_or(false)),
                                            preserve_host: Some(a.preserve_host.unwrap_or(true)),
                                            plugins: if matches!(target, Backend::Unavailable) { Vec::new() } else { plugins.clone() },
                                            tags: me.tags(),
                    });
                    let service = match target {
                        Backend::Service(i) => i,
                        Backend::Unavailable => self.unavailable(),
                    };
                    self.config.services[service].routes.push(route);
                }
            }
        }
        // The default backend is a top-level route declared after every rule: at equal
        // precedence with a host-less `/` rule, the rule wins.
        if let Some((me, ns, backend)) = default_backend {
            let broken = self.fault(&me).is_some();
            let target =
                if broken { Backend::Unavailable } else { self.route_backend(&me, ns, backend, "spec.defaultBackend") };
            let service = match target {
                Backend::Service(i) => i,
                Backend::Unavailable => self.unavailable(),
            };
            let service_name = self.config.services[service].name.clone().unwrap_or_default();
            self.config.routes.push(with!(Route::default(), {
                            name: Some(format!("{ns}.{}.default-backend", me.name)),
                            paths: vec!["/".into()],
                            strip_path: Some(false),
                            preserve_host: Some(true),
                            service: Some(gateway_core::config::EntityRef::Name(service_name)),
                            tags: me.tags(),
            }));
        }
    }

    fn route_backend(&mut self, me: &ObjectRef, ns: &'a str, backend: &'a IngressBackend, at: &str) -> Backend {
        let Some(service) = &backend.service else {
            self.problem(me, format!("{at}.backend: only Service backends are supported; answering 503"));
            return Backend::Unavailable;
        };
        match self.backend(ns, service) {
            Ok(i) => Backend::Service(i),
            Err(e) => {
                self.problem(me, format!("{at}.backend: {e}; answering 503"));
                Backend::Unavailable
            }
        }
    }

    fn tls(&mut self, ingresses: &[&'a Ingress]) {
        let mut by_secret: HashMap<(&str, &str), usize> = HashMap::new();
        let mut hosts_taken: HashMap<String, ObjectRef> = HashMap::new();
        for &ingress in ingresses {
            let me = ObjectRef::new("Ingress", &ingress.metadata, true);
            let ns = namespace(&ingress.metadata);
            for (i, tls) in ingress.spec.iter().flat_map(|s| s.tls.iter().flatten()).enumerate() {
                let at = format!("spec.tls[{i}]");
                let Some(secret_name) = tls.secret_name.as_deref() else {
                    self.problem(&me, format!("{at}: no secretName"));
                    continue;
                };
                let Some(secret) = self.secrets.get(&(ns, secret_name)).copied() else {
                    self.problem(
                        &me,
                        format!("{at}: TLS Secret `{ns}/{secret_name}` not found; its hosts get no certificate"),
                    );
                    continue;
                };
                let secret_ref = ObjectRef::new("Secret", &secret.metadata, true);
                if self.fault(&secret_ref).is_some() {
                    continue;
                }
                let index = match by_secret.get(&(ns, secret_name)) {
                    Some(i) => *i,
                    None => {
                        let (Some(cert), Some(key)) = (secret_text(secret, "tls.crt"), secret_text(secret, "tls.key"))
                        else {
                            self.problem(
                                &secret_ref,
                                "a TLS Secret needs `tls.crt` and `tls.key` (type kubernetes.io/tls)",
                            );
                            self.problem(&me, format!("{at}: Secret `{ns}/{secret_name}` is not a TLS Secret"));
                            continue;
                        };
                        self.config.certificates.push(with!(Certificate::default(), {
                                                    cert: cert,
                                                    key: key,
                                                    tags: secret_ref.tags(),
                        }));
                        let index = self.config.certificates.len() - 1;
                        by_secret.insert((ns, secret_name), index);
                        index
                    }
                };
                for host in tls.hosts.iter().flatten() {
                    let host = host.to_ascii_lowercase();
                    if let Some(winner) = hosts_taken.get(&host) {
                        if *winner != me {
                            let message =
                                format!("{at}: host `{host}` already has a certificate from {winner} (older)");
                            self.problem(&me, message);
                        }
                        continue;
                    }
                    hosts_taken.insert(host.clone(), me.clone());
                    self.config.certificates[index].snis.push(SniName::Name(host));
                }
            }
        }
        // A certificate no host ended up using is left out.
        self.config.certificates.retain(|c| !c.snis.is_empty());
    }

    fn consumers(&mut self) {
        let objects = self.objects;
        let mut consumers: Vec<_> =
            objects.kong_consumers.iter().filter(|c| self.class_annotation_ok(&c.metadata)).collect();
        consumers.sort_by_key(|c| (namespace(&c.metadata), c.metadata.name.as_deref()));
        for c in consumers {
            let me = ObjectRef::new("KongConsumer", &c.metadata, true);
            if self.fault(&me).is_some() {
                continue;
            }
            if c.username.is_none() && c.custom_id.is_none() {
                self.problem(&me, "needs `username` or `custom_id`; left out");
                continue;
            }
            let plugins = match self.annotated_plugins(&c.metadata) {
                Ok(p) => p,
                Err(e) => {
                    self.problem(&me, format!("{e}; left out"));
                    continue;
                }
            };
            let mut consumer = json!({ "tags": me.tags() });
            if let Some(u) = &c.username {
                consumer["username"] = json!(u);
            }
            if let Some(id) = &c.custom_id {
                consumer["custom_id"] = json!(id);
            }
            let ns = namespace(&c.metadata);
            let mut ok = true;
            for name in &c.credentials {
                match self.credential(ns, name) {
                    Ok((section, value)) => {
                        let list = consumer.as_object_mut().map(|o| o.entry(section).or_insert_with(|| json!([])));
                        if let Some(Value::Array(list)) = list {
                            list.push(value);
                        }
                    }
                    Err(e) => {
                        self.problem(&me, format!("credentials: {e}; left out"));
                        ok = false;
                    }
                }
            }
            if !ok {
                continue;
            }
            match serde_json::from_value::<Consumer>(consumer) {
                Ok(mut consumer) => {
                    consumer.plugins = plugins;
                    self.config.consumers.push(consumer);
                }
                Err(e) => self.problem(&me, format!("credentials: {e}; left out")),
            }
        }
    }

    /// One credential Secret as a Kong credential section entry.
    fn credential(&self, ns: &str, name: &str) -> Result<(&'static str, Value), String> {
        let Some(secret) = self.secrets.get(&(ns, name)) else {
            return Err(format!("Secret `{ns}/{name}` not found"));
        };
        let kind =
            labels(&secret.metadata).get(CREDENTIAL_LABEL).cloned().or_else(|| secret_text(secret, "kongCredType"));
        let Some(kind) = kind else {
            return Err(format!("Secret `{ns}/{name}` has no `{CREDENTIAL_LABEL}` label"));
        };
        let field = |f: &str| secret_text(secret, f);
        let require = |f: &str| field(f).ok_or_else(|| format!("{kind} Secret `{ns}/{name}` has no `{f}`"));
        match kind.as_str() {
            "key-auth" | "key_auth" | "keyauth_credential" => {
                Ok(("keyauth_credentials", json!({ "key": require("key")? })))
            }
            "jwt" | "jwt_secret" => {
                let mut v = json!({ "key": require("key")? });
                for f in ["algorithm", "secret", "rsa_public_key"] {
                    if let Some(x) = field(f) {
                        v[f] = json!(x);
                    }
                }
                Ok(("jwt_secrets", v))
            }
            "acl" => Ok(("acls", json!({ "group": require("group")? }))),
            other => {
                Err(format!("Secret `{ns}/{name}`: credential type `{other}` is not supported (key-auth, jwt, acl)"))
            }
        }
    }

    /// Objects carrying a `kubernetes.io/ingress.class` annotation for another class are not
    /// ours (Kong's controller rule for consumers and cluster plugins).
    fn class_annotation_ok(&self, meta: &ObjectMeta) -> bool {
        annotations(meta).get(CLASS_ANNOTATION).is_none_or(|c| self.class_is_ours(c))
    }

    fn global_plugins(&mut self) {
        let objects = self.objects;
        let mut globals: Vec<&KongClusterPlugin> = objects
            .kong_cluster_plugins
            .iter()
            .filter(|p| labels(&p.metadata).get("global").is_some_and(|v| v == "true"))
            .filter(|p| self.class_annotation_ok(&p.metadata))
            .collect();
        globals.sort_by_key(|p| p.metadata.name.as_deref());
        for p in globals {
            let me = ObjectRef::new("KongClusterPlugin", &p.metadata, false);
            if self.fault(&me).is_some() {
                continue;
            }
            match plugin_entity(&me, &p.fields) {
                Ok(Some(plugin)) => self.config.plugins.push(plugin),
                Ok(None) => {}
                Err(e) => self.problem(&me, format!("{e}; not applied")),
            }
        }
    }
}

/// The plugin entity a KongPlugin or KongClusterPlugin makes; `None` when it is disabled.
fn plugin_entity(object: &ObjectRef, p: &PluginFields) -> Result<Option<Plugin>, String> {
    if p.config_from.is_some() {
        return Err("`configFrom` is not supported".into());
    }
    if p.disabled {
        return Ok(None);
    }
    let protocols = match &p.protocols {
        Some(list) => Some(
            list.iter()
                .map(|x| {
                    serde_json::from_value::<RouteProtocol>(Value::String(x.clone()))
                        .map_err(|_| format!("`{x}` is not a protocol"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    let mut plugin = Plugin::default();
    plugin.name.clone_from(&p.plugin);
    plugin.config.clone_from(&p.config);
    plugin.protocols = protocols;
    plugin.ordering.clone_from(&p.ordering);
    plugin.instance_name.clone_from(&p.instance_name);
    plugin.tags = object.tags();
    Ok(Some(plugin))
}

/// A Secret's value as text, from `data` or `stringData`.
fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.clone());
    }
    secret.data.as_ref().and_then(|d| d.get(key)).and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// An Ingress rule host: a DNS name, or `*.` and a DNS name.
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!("`{host}` is not a valid host (a DNS name, optionally starting with `*.`)"))
    }
}
