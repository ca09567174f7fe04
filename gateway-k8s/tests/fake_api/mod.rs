//! A fake Kubernetes API server on 127.0.0.1:0 for the live-mode tests, spoken to by real
//! kube `Client`s over HTTP: list and watch (newline-delimited JSON events, resumable from a
//! resourceVersion) for the kinds the gateway reads, `410 Gone` on demand, Leases with the
//! conflict rule of server-side apply, and `ingresses/status` patches recorded per client.
//!
//! Each client gets its own listener, labelled, so a test can tell which replica wrote what
//! and can cut one replica off the API.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The kinds served: plural, apiVersion, kind, namespaced.
const KINDS: &[(&str, &str, &str, bool)] = &[
    ("ingresses", "networking.k8s.io/v1", "Ingress", true),
    ("ingressclasses", "networking.k8s.io/v1", "IngressClass", false),
    ("services", "v1", "Service", true),
    ("secrets", "v1", "Secret", true),
    ("endpointslices", "discovery.k8s.io/v1", "EndpointSlice", true),
    ("kongplugins", "configuration.konghq.com/v1", "KongPlugin", true),
    ("kongclusterplugins", "configuration.konghq.com/v1", "KongClusterPlugin", false),
    ("kongconsumers", "configuration.konghq.com/v1", "KongConsumer", true),
    ("leases", "coordination.k8s.io/v1", "Lease", true),
];

fn kind_of(plural: &str) -> Option<&'static (&'static str, &'static str, &'static str, bool)> {
    KINDS.iter().find(|k| k.0 == plural)
}

/// A `ingresses/status` patch the API accepted.
#[derive(Debug, Clone)]
pub struct StatusWrite {
    /// The label of the client that sent it.
    pub client: String,
    pub namespace: String,
    pub name: String,
    pub patch: Value,
}

struct Watch {
    client: String,
    plural: String,
    namespace: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// (plural, namespace or "", name) → object, with apiVersion and kind.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every event, for watches resuming from a resourceVersion.
    log: Vec<(u64, String, String, Bytes)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    watches: Vec<Watch>,
    status_writes: Vec<StatusWrite>,
    /// Clients answered 503 (cut off the API).
    down: HashSet<String>,
    /// Count of watch requests, per plural.
    watch_requests: BTreeMap<String, usize>,
    /// Count of list requests, per plural.
    list_requests: BTreeMap<String, usize>,
    /// Kinds answered 404, as when their CRD is not installed.
    absent: HashSet<String>,
}

impl State {
    /// Stores `object` under a new resourceVersion; with `notify`, logs and sends the event.
    fn store(&mut self, plural: &str, mut object: Value, event: &str, notify: bool) -> Value {
        let (_, api_version, kind, namespaced) = *kind_of(plural).expect("a served kind");
        self.resource_version += 1;
        let rv = self.resource_version;
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(kind);
        let meta = &mut object["metadata"];
        let name = meta["name"].as_str().expect("metadata.name").to_string();
        let namespace = if namespaced {
            if meta["namespace"].is_null() {
                meta["namespace"] = json!("default");
            }
            meta["namespace"].as_str().unwrap().to_string()
        } else {
            String::new()
        };
        meta["resourceVersion"] = json!(rv.to_string());
        if meta["uid"].is_null() {
            meta["uid"] = json!(format!("uid-{plural}-{namespace}-{name}"));
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = json!(format!("2026-01-01T00:{:02}:{:02}Z", rv / 60 % 60, rv % 60));
        }
        let key = (plural.to_string(), namespace.clone(), name);
        if event == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key, object.clone());
        }
        if notify {
            let mut line = serde_json::to_vec(&json!({ "type": event, "object": object })).unwrap();
            line.push(b'\n');
            let line = Bytes::from(line);
            self.log.push((rv, plural.to_string(), namespace.clone(), line.clone()));
            self.watches.retain(|w| {
                if w.plural != plural || w.namespace.as_ref().is_some_and(|ns| *ns != namespace) {
                    return !w.tx.is_closed();
                }
                w.tx.send(line.clone()).is_ok()
            });
        }
        object
    }
}

/// The fake API server's state; listeners are added by [`FakeApi::client`].
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// A kube client talking to this API over its own loopback listener, labelled `label`.
    pub async fn client(&self, label: &str) -> kube::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = self.clone();
        let label = label.to_string();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let api = api.clone();
                let label = label.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let api = api.clone();
                        let label = label.clone();
                        async move { Ok::<_, Infallible>(api.handle(&label, req).await) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        config.default_namespace = "default".into();
        kube::Client::try_from(config).unwrap()
    }

    /// Creates or replaces every object of the YAML documents in `yaml`, sending the events.
    pub fn apply(&self, yaml: &str) {
        self.apply_with(yaml, true);
    }

    /// As [`FakeApi::apply`], but no watch is told (as if the events were lost to a
    /// compaction): only a relist finds the change.
    pub fn apply_unseen(&self, yaml: &str) {
        self.apply_with(yaml, false);
    }

    fn apply_with(&self, yaml: &str, notify: bool) {
        let mut state = self.state.lock().unwrap();
        for doc in serde_norway::Deserializer::from_str(yaml) {
            let object: Value = serde::Deserialize::deserialize(doc).unwrap();
            if object.is_null() {
                continue;
            }
            let kind = object["kind"].as_str().expect("kind");
            let plural = KINDS.iter().find(|k| k.2 == kind).expect("a served kind").0;
            let (_, _, _, namespaced) = *kind_of(plural).unwrap();
            let ns = if namespaced { object["metadata"]["namespace"].as_str().unwrap_or("default") } else { "" };
            let key = (plural.to_string(), ns.to_string(), object["metadata"]["name"].as_str().unwrap().to_string());
            let event = if state.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
            state.store(plural, object, event, notify);
        }
    }

    /// Deletes an object, sending the DELETED event.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        let plural = KINDS.iter().find(|k| k.2 == kind).expect("a served kind").0;
        let key = (plural.to_string(), namespace.to_string(), name.to_string());
        let object = state.objects.get(&key).cloned().expect("the object exists");
        state.store(plural, object, "DELETED", true);
    }

    /// Compacts the history: every open watch gets a `410 Gone` error event and ends, and
    /// watches resuming from before now get the same.
    pub fn expire_watches(&self) {
        let mut state = self.state.lock().unwrap();
        // Resuming from the current resourceVersion (after a relist) is fine; from before, not.
        state.compacted = state.resource_version;
        state.log.clear();
        for w in state.watches.drain(..) {
            let _ = w.tx.send(gone());
        }
    }

    /// Answers every request of client `label` with 503, and ends its watches.
    pub fn cut_off(&self, label: &str) {
        let mut state = self.state.lock().unwrap();
        state.down.insert(label.to_string());
        state.watches.retain(|w| w.client != label);
    }

    /// Answers 404 for a kind, as when its CRD is not installed (set before clients start).
    pub fn without(&self, plural: &str) {
        self.state.lock().unwrap().absent.insert(plural.to_string());
    }

    pub fn status_writes(&self) -> Vec<StatusWrite> {
        self.state.lock().unwrap().status_writes.clone()
    }

    pub fn watch_requests(&self, plural: &str) -> usize {
        self.state.lock().unwrap().watch_requests.get(plural).copied().unwrap_or(0)
    }

    pub fn list_requests(&self, plural: &str) -> usize {
        self.state.lock().unwrap().list_requests.get(plural).copied().unwrap_or(0)
    }

    /// An object as stored, if any.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let plural = KINDS.iter().find(|k| k.2 == kind).expect("a served kind").0;
        let key = (plural.to_string(), namespace.to_string(), name.to_string());
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    async fn handle(&self, label: &str, req: Request<Incoming>) -> Response<Body> {
        if self.state.lock().unwrap().down.contains(label) {
            return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "cut off");
        }
        let Some(path) = Path::parse(req.uri().path()) else {
            return status(StatusCode::NOT_FOUND, "NotFound", "no such path");
        };
        if kind_of(&path.plural).is_none() || self.state.lock().unwrap().absent.contains(&path.plural) {
            return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
        }
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let method = req.method().clone();
        let content_type =
            req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        match (method, &path.name) {
            (Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                self.watch(label, &path, &query)
            }
            (Method::GET, None) => self.list(&path),
            (Method::GET, Some(name)) => match self.state.lock().unwrap().objects.get(&path.key(name)) {
                Some(o) => json_response(StatusCode::OK, o),
                None => status(StatusCode::NOT_FOUND, "NotFound", &format!("{} \"{name}\" not found", path.plural)),
            },
            (Method::POST, None) => {
                let mut object: Value = serde_json::from_slice(&body).unwrap();
                if let Some(ns) = &path.namespace {
                    object["metadata"]["namespace"] = json!(ns);
                }
                let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
                let mut state = self.state.lock().unwrap();
                if state.objects.contains_key(&path.key(&name)) {
                    return status(StatusCode::CONFLICT, "AlreadyExists", &format!("\"{name}\" already exists"));
                }
                let stored = state.store(&path.plural, object, "ADDED", true);
                json_response(StatusCode::CREATED, &stored)
            }
            (Method::PATCH, Some(name)) => {
                let patch: Value = serde_json::from_slice(&body).unwrap();
                self.patch(label, &path, name, &content_type, patch)
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not supported by the fake API"),
        }
    }

    fn list(&self, path: &Path) -> Response<Body> {
        let mut state = self.state.lock().unwrap();
        *state.list_requests.entry(path.plural.clone()).or_default() += 1;
        let (_, api_version, kind, _) = *kind_of(&path.plural).unwrap();
        let crd = api_version.contains("konghq.com");
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((p, ns, _), _)| *p == path.plural && path.namespace.as_ref().is_none_or(|n| n == ns))
            .map(|(_, o)| {
                let mut o = o.clone();
                // Lists of built-in kinds carry no apiVersion/kind per item; custom resources do.
                if !crd {
                    let map = o.as_object_mut().unwrap();
                    map.remove("apiVersion");
                    map.remove("kind");
                }
                o
            })
            .collect();
        json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": api_version,
                "kind": format!("{kind}List"),
                "metadata": { "resourceVersion": state.resource_version.to_string() },
                "items": items,
            }),
        )
    }

    fn watch(&self, label: &str, path: &Path, query: &BTreeMap<String, String>) -> Response<Body> {
        let mut state = self.state.lock().unwrap();
        *state.watch_requests.entry(path.plural.clone()).or_default() += 1;
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        if from < state.compacted {
            let _ = tx.send(gone());
            drop(tx);
        } else {
            for (rv, plural, ns, line) in &state.log {
                if *rv > from && *plural == path.plural && path.namespace.as_ref().is_none_or(|n| n == ns) {
                    let _ = tx.send(line.clone());
                }
            }
            state.watches.push(Watch {
                client: label.to_string(),
                plural: path.plural.clone(),
                namespace: path.namespace.clone(),
                tx,
            });
        }
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
        });
        Response::builder()
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(StreamBody::new(stream.boxed()).boxed_unsync())
            .unwrap()
    }

    fn patch(&self, label: &str, path: &Path, name: &str, content_type: &str, patch: Value) -> Response<Body> {
        let mut state = self.state.lock().unwrap();
        let key = path.key(name);
        let current = state.objects.get(&key).cloned();
        if path.subresource.as_deref() == Some("status") {
            let Some(mut object) = current else {
                return status(StatusCode::NOT_FOUND, "NotFound", &format!("\"{name}\" not found"));
            };
            merge(&mut object["status"], &patch["status"]);
            state.status_writes.push(StatusWrite {
                client: label.to_string(),
                namespace: key.1.clone(),
                name: name.to_string(),
                patch,
            });
            let stored = state.store(&path.plural, object, "MODIFIED", true);
            return json_response(StatusCode::OK, &stored);
        }
        let apply = content_type.starts_with("application/apply-patch");
        let object = match current {
            Some(mut object) => {
                // Server-side apply without force: another manager's value of a field is a
                // conflict (the Lease's holder is the field that matters here).
                let held = &object["spec"]["holderIdentity"];
                let wanted = &patch["spec"]["holderIdentity"];
                if apply && held.is_string() && wanted.is_string() && held != wanted {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "Apply failed with 1 conflict: conflict with another manager: .spec.holderIdentity",
                    );
                }
                merge(&mut object, &patch);
                object
            }
            None if apply => {
                let mut object = patch;
                object["metadata"]["name"] = json!(name);
                if let Some(ns) = &path.namespace {
                    object["metadata"]["namespace"] = json!(ns);
                }
                object
            }
            None => return status(StatusCode::NOT_FOUND, "NotFound", &format!("\"{name}\" not found")),
        };
        let stored = state.store(&path.plural, object, "MODIFIED", true);
        json_response(StatusCode::OK, &stored)
    }
}

/// `/api/v1/[namespaces/NS/]PLURAL[/NAME[/SUB]]` or the same under `/apis/GROUP/VERSION/`.
struct Path {
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Path {
    fn parse(path: &str) -> Option<Path> {
        let rest = if let Some(rest) = path.strip_prefix("/api/v1/") {
            rest
        } else {
            let rest = path.strip_prefix("/apis/")?;
            let mut parts = rest.splitn(3, '/');
            let (_group, _version) = (parts.next()?, parts.next()?);
            parts.next()?
        };
        let mut segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let mut namespace = None;
        if segments.len() >= 3 && segments[0] == "namespaces" {
            namespace = Some(segments[1].to_string());
            segments.drain(..2);
        }
        let mut segments = segments.into_iter().map(str::to_string);
        Some(Path { plural: segments.next()?, namespace, name: segments.next(), subresource: segments.next() })
    }

    fn key(&self, name: &str) -> (String, String, String) {
        (self.plural.clone(), self.namespace.clone().unwrap_or_default(), name.to_string())
    }
}

/// RFC 7386 JSON merge patch (a strategic merge patch of scalar fields does the same).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().unwrap();
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The event a watch gets when its resourceVersion has been compacted away.
fn gone() -> Bytes {
    let event = json!({
        "type": "ERROR",
        "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410,
        },
    });
    let mut line = serde_json::to_vec(&event).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())).boxed_unsync())
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}
