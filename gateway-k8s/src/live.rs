//! Live mode: kube-rs reflectors over the kinds the translation reads, a debounced recompile
//! on any change, and `status.loadBalancer` written on the Ingresses served by the replica
//! holding a `coordination.k8s.io/v1` Lease.
//!
//! Every replica serves traffic from the start (once its caches are synced it reports ready);
//! only the leader writes status, so replicas never fight over it.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use gateway_core::Gateway;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass, IngressLoadBalancerIngress};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use crate::apply::{Applied, Applier};
use crate::objects::{KongClusterPlugin, KongConsumer, KongPlugin, Objects};
use crate::translate::ObjectRef;

/// Where the addresses written to `status.loadBalancer` come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Publish {
    /// No status is written.
    #[default]
    Nothing,
    /// The load-balancer addresses (else the external IPs) of this Service.
    Service {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// These IPs or host names.
    Addresses(Vec<String>),
}

/// Settings of the live mode.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// Namespaces watched; empty for all.
    pub namespaces: Vec<String>,
    /// Status addresses.
    pub publish: Publish,
    /// This replica's name in the Lease (the pod name in a cluster).
    pub identity: String,
    /// Namespace and name of the Lease that elects the status writer.
    pub lease: (String, String),
    /// Lease duration; a dead leader is replaced after it.
    pub lease_duration: Duration,
    /// Changes closer together than this are applied together.
    pub debounce: Duration,
}

impl LiveSettings {
    /// Defaults for `identity`: 15 s lease, 200 ms debounce, all namespaces, no status.
    pub fn new(identity: impl Into<String>, lease_namespace: impl Into<String>) -> Self {
        LiveSettings {
            namespaces: Vec::new(),
            publish: Publish::Nothing,
            identity: identity.into(),
            lease: (lease_namespace.into(), "gateway-ingress-leader".into()),
            lease_duration: Duration::from_secs(15),
            debounce: Duration::from_millis(200),
        }
    }
}

/// A failure that stops the live mode (a lost watch is retried, not an error).
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The API server refused a call the mode needs.
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// The leader election could not start.
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
}

/// The reflector stores of one kind, one per watched namespace (or one for all).
struct Stores<K: Resource + 'static>(Vec<Store<K>>)
where
    K::DynamicType: Eq + std::hash::Hash + Clone;

impl<K> Stores<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    fn state(&self) -> Vec<K> {
        self.0.iter().flat_map(|s| s.state()).map(|k| Arc::unwrap_or_clone(k)).collect()
    }

    async fn wait_until_ready(&self) {
        for s in &self.0 {
            let _ = s.wait_until_ready().await;
        }
    }
}

/// Starts a reflector per namespace for `K`, waking `changed` on every event. Managed fields
/// are dropped before objects are stored (they are most of an object's size).
fn reflect<K>(apis: Vec<Api<K>>, changed: &Arc<Notify>) -> Stores<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let mut stores = Vec::new();
    for api in apis {
        let (store, writer) = reflector::store();
        let changed = changed.clone();
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o| {
                o.meta_mut().managed_fields = None;
            })
            .reflect(writer);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => changed.notify_one(),
                    Err(e) => {
                        tracing::warn!(kind = %K::kind(&Default::default()), error = %e, "watch failed; retrying")
                    }
                }
            }
        });
        stores.push(store);
    }
    Stores(stores)
}

/// The APIs of a namespaced kind: one per watched namespace, or one for all.
fn namespaced<K>(client: &Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect()
    }
}

/// Whether the API server serves `K` (a Kong CRD may not be installed): a list of one item.
async fn served<K>(client: &Client) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all_with(client.clone(), &K::DynamicType::default());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

struct Reflectors {
    ingresses: Stores<Ingress>,
    classes: Stores<IngressClass>,
    services: Stores<Service>,
    slices: Stores<EndpointSlice>,
    secrets: Stores<Secret>,
    plugins: Option<Stores<KongPlugin>>,
    cluster_plugins: Option<Stores<KongClusterPlugin>>,
    consumers: Option<Stores<KongConsumer>>,
}

impl Reflectors {
    fn objects(&self) -> Objects {
        Objects {
            ingresses: self.ingresses.state(),
            ingress_classes: self.classes.state(),
            services: self.services.state(),
            endpoint_slices: self.slices.state(),
            secrets: self.secrets.state(),
            kong_plugins: self.plugins.as_ref().map(Stores::state).unwrap_or_default(),
            kong_cluster_plugins: self.cluster_plugins.as_ref().map(Stores::state).unwrap_or_default(),
            kong_consumers: self.consumers.as_ref().map(Stores::state).unwrap_or_default(),
        }
    }

    async fn wait_until_ready(&self) {
        self.ingresses.wait_until_ready().await;
        self.classes.wait_until_ready().await;
        self.services.wait_until_ready().await;
        self.slices.wait_until_ready().await;
        self.secrets.wait_until_ready().await;
        if let Some(s) = &self.plugins {
            s.wait_until_ready().await;
        }
        if let Some(s) = &self.cluster_plugins {
            s.wait_until_ready().await;
        }
        if let Some(s) = &self.consumers {
            s.wait_until_ready().await;
        }
    }
}

/// Runs the live mode until the process ends: `gateway` serves what the cluster's Ingresses
/// say, reported ready (`/readyz`) once every cache has synced and the first config is in.
///
/// Returns only on a failure to start (the API server unreachable or refusing the first
/// calls); lost watches afterwards are retried with backoff.
pub async fn run(
    client: Client,
    gateway: Gateway,
    mut applier: Applier,
    settings: LiveSettings,
) -> Result<(), LiveError> {
    gateway.set_ready(false);
    let changed = Arc::new(Notify::new());
    let ns = &settings.namespaces;
    let mut kong = Vec::new();
    for (kind, present) in [
        ("KongPlugin", served::<KongPlugin>(&client).await?),
        ("KongClusterPlugin", served::<KongClusterPlugin>(&client).await?),
        ("KongConsumer", served::<KongConsumer>(&client).await?),
    ] {
        if !present {
            tracing::warn!(kind, "the API server does not serve {kind} (CRD not installed?); not watched");
        }
        kong.push(present);
    }
    let reflectors = Reflectors {
        ingresses: reflect(namespaced(&client, ns), &changed),
        classes: reflect(vec![Api::all(client.clone())], &changed),
        services: reflect(namespaced(&client, ns), &changed),
        slices: reflect(namespaced(&client, ns), &changed),
        secrets: reflect(namespaced(&client, ns), &changed),
        plugins: kong[0].then(|| reflect(namespaced(&client, ns), &changed)),
        cluster_plugins: kong[1].then(|| reflect(vec![Api::all(client.clone())], &changed)),
        consumers: kong[2].then(|| reflect(namespaced(&client, ns), &changed)),
    };
    reflectors.wait_until_ready().await;

    let leader = elect(&client, &settings).await?;
    let mut status =
        StatusWriter { client: client.clone(), publish: settings.publish.clone(), leader, written: HashMap::new() };
    let mut ready = false;
    // Refused status writes are retried, backing off from 5 s to 5 min (a missing RBAC
    // right fails every time).
    let mut status_retry: Option<Duration> = None;
    loop {
        let objects = reflectors.objects();
        match applier.apply(&objects, Vec::new()) {
            Ok(applied) => {
                if let Applied::Reloaded(t) = &applied {
                    tracing::info!(
                        ingresses = t.ingresses.len(),
                        routes = gateway.routes().len(),
                        problems = t.problems.len(),
                        "cluster config applied"
                    );
                }
                if !ready {
                    gateway.set_ready(true);
                    ready = true;
                }
                status_retry = if status.update(&applied.translation().ingresses, &objects).await {
                    None
                } else {
                    Some(status_retry.map_or(STATUS_RETRY, |d| (d * 2).min(STATUS_RETRY_MAX)))
                };
            }
            Err(e) => tracing::error!("cluster config rejected, the previous config keeps serving:\n{e}"),
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = status.leader_changed() => {}
            // A status write the API refused is tried again, even if nothing else changes.
            _ = tokio::time::sleep(status_retry.unwrap_or_default()), if status_retry.is_some() => {}
        }
        // Debounce: a rollout is a burst of EndpointSlice events; apply them together.
        tokio::time::sleep(settings.debounce).await;
    }
}

/// Starts the leader election; the receiver says whether this replica holds the Lease.
async fn elect(client: &Client, settings: &LiveSettings) -> Result<watch::Receiver<bool>, LiveError> {
    if settings.publish == Publish::Nothing {
        // Nothing to write: no need to hold a Lease.
        let (_, rx) = watch::channel(false);
        return Ok(rx);
    }
    let secs = settings.lease_duration.as_secs().max(2);
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), settings.lease.1.clone())
        .with_namespace(settings.lease.0.clone())
        .with_identity(settings.identity.clone())
        .with_duration(secs)
        .with_grace((secs / 3).max(1))
        .build()
        .await?;
    let (rx, task) = manager.watch().await;
    tokio::spawn(async move {
        if let Ok(Err(e)) = task.await {
            tracing::error!(error = %e, "leader election stopped; this replica no longer writes status");
        }
    });
    Ok(rx)
}

/// How long after a refused status write it is first tried again; doubled up to
/// [`STATUS_RETRY_MAX`] while writes keep failing.
const STATUS_RETRY: Duration = Duration::from_secs(5);
const STATUS_RETRY_MAX: Duration = Duration::from_secs(300);

struct StatusWriter {
    client: Client,
    publish: Publish,
    leader: watch::Receiver<bool>,
    /// Per Ingress, its resourceVersion when we last patched it and what we wrote: until the
    /// store sees our write (a new resourceVersion), the same patch is not sent again.
    written: HashMap<ObjectRef, (Option<String>, Vec<IngressLoadBalancerIngress>)>,
}

impl StatusWriter {
    fn addresses(&self, objects: &Objects) -> Vec<IngressLoadBalancerIngress> {
        let entry = |a: &str| {
            if a.parse::<std::net::IpAddr>().is_ok() {
                IngressLoadBalancerIngress { ip: Some(a.to_string()), ..Default::default() }
            } else {
                IngressLoadBalancerIngress { hostname: Some(a.to_string()), ..Default::default() }
            }
        };
        match &self.publish {
            Publish::Nothing => Vec::new(),
            Publish::Addresses(list) => list.iter().map(|a| entry(a)).collect(),
            Publish::Service { namespace, name } => {
                let Some(svc) = objects.services.iter().find(|s| {
                    s.metadata.namespace.as_deref() == Some(namespace) && s.metadata.name.as_deref() == Some(name)
                }) else {
                    return Vec::new();
                };
                let lb: Vec<_> = svc
                    .status
                    .iter()
                    .flat_map(|s| s.load_balancer.iter().flat_map(|lb| lb.ingress.iter().flatten()))
                    .filter_map(|i| i.ip.as_deref().or(i.hostname.as_deref()))
                    .map(entry)
                    .collect();
                if !lb.is_empty() {
                    return lb;
                }
                svc.spec.iter().flat_map(|s| s.external_ips.iter().flatten()).map(|a| entry(a)).collect()
            }
        }
    }

    /// Resolves when leadership changes; never when the election has stopped.
    async fn leader_changed(&mut self) {
        if self.leader.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// As leader, writes the addresses on every served Ingress whose status differs; `false`
    /// when a write failed.
    async fn update(&mut self, served: &[ObjectRef], objects: &Objects) -> bool {
        // A stopped election (its sender gone) no longer renews the Lease: not the leader.
        let stopped = self.leader.has_changed().is_err();
        if self.publish == Publish::Nothing || stopped || !*self.leader.borrow_and_update() {
            return true;
        }
        let mut ok = true;
        let want = self.addresses(objects);
        let served_set: std::collections::HashSet<&ObjectRef> = served.iter().collect();
        self.written.retain(|r, _| served_set.contains(r));
        let by_name: HashMap<(Option<&str>, Option<&str>), &Ingress> = objects
            .ingresses
            .iter()
            .map(|i| ((i.metadata.namespace.as_deref(), i.metadata.name.as_deref()), i))
            .collect();
        for r in served {
            let Some(ingress) = by_name.get(&(r.namespace.as_deref(), Some(r.name.as_str()))) else {
                continue;
            };
            let current = ingress
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.clone())
                .unwrap_or_default();
            let version = &ingress.metadata.resource_version;
            if current == want || self.written.get(r).is_some_and(|(v, w)| v == version && *w == want) {
                continue;
            }
            let api: Api<Ingress> = Api::namespaced(self.client.clone(), r.namespace.as_deref().unwrap_or("default"));
            let patch = serde_json::json!({ "status": { "loadBalancer": { "ingress": want } } });
            match api.patch_status(&ingress.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    self.written.insert(r.clone(), (version.clone(), want.clone()));
                    tracing::debug!(ingress = %r, "status written")
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(ingress = %r, error = %e, "cannot write status; will retry")
                }
            }
        }
        ok
    }
}
