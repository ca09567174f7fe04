//! Upstream host names, resolved with their DNS TTL and re-resolved in the background.
//!
//! Every host name a compiled config connects to (upstream targets and services without an
//! upstream) gets a [`DnsEntry`]. The first connection to the name resolves it; from then on
//! a background task re-resolves it when the answer's TTL runs out, so new connections never
//! wait for DNS and follow changes within a TTL. A failed re-resolution keeps the last good
//! answer (as Kong's `dns_stale_ttl` does) and retries with backoff.
//!
//! When an answer drops an address, pooled keep-alive connections to that address are
//! retired: for one pool idle timeout after the change, a connection to a dropped address
//! finishes its request and is not reused. HTTP/1.1 pools check each connection's address
//! when they take it out and when they get it back; HTTP/2 connections (hyper-util's client)
//! are checked on each response and poisoned. Traffic so moves to the new addresses at once,
//! and the check costs nothing while no answer changes.
//!
//! Resolution is [hickory-resolver](https://docs.rs/hickory-resolver): `/etc/resolv.conf` and
//! `/etc/hosts` by default, or the nameservers given in [`UpstreamSettings::dns_resolver`]
//! (Kong's `dns_resolver`). Connections spread over the addresses of a name by rotating the
//! order each connection tries them in.
//!
//! [`UpstreamSettings::dns_resolver`]: crate::UpstreamSettings::dns_resolver

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hyper_util::client::legacy::connect::dns::Name;

use crate::body::BoxError;

/// Re-resolution never happens more often than this, whatever the TTL.
const MIN_TTL: Duration = Duration::from_secs(1);
/// ... nor less often than this (hosts-file answers carry a day).
const MAX_TTL: Duration = Duration::from_secs(3600);
/// Retry backoff after a failed re-resolution: from `MIN_TTL`, doubling up to this.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The resolver and the names of the current config. Lives as long as the gateway.
pub(crate) struct Dns {
    nameservers: Vec<SocketAddr>,
    resolver: OnceLock<Result<TokioResolver, String>>,
    names: ArcSwap<HashMap<Box<str>, Arc<DnsEntry>>>,
    /// How long after a change connections to dropped addresses may still sit in a pool: the
    /// longest pool idle timeout of the current config, in milliseconds.
    retire_window: AtomicU64,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").field("nameservers", &self.nameservers).finish_non_exhaustive()
    }
}

/// One host name: its current addresses.
pub(crate) struct DnsEntry {
    name: Box<str>,
    /// `None` until the first answer.
    addrs: ArcSwapOption<Vec<IpAddr>>,
    /// Where the next connection starts in `addrs`.
    next: AtomicUsize,
    refreshing: AtomicBool,
    /// Until when (milliseconds since [`epoch`]) pooled connections to dropped addresses may
    /// still be in use; 0 when no answer has dropped one.
    retire_until: AtomicU64,
}

impl std::fmt::Debug for DnsEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsEntry").field("name", &self.name).field("addrs", &self.addrs.load()).finish()
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl DnsEntry {
    /// Whether connections to addresses an answer dropped may still be pooled.
    pub(crate) fn retiring(&self) -> bool {
        let until = self.retire_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// The current answer, if the name was resolved.
    pub(crate) fn addresses(&self) -> Option<Arc<Vec<IpAddr>>> {
        self.addrs.load_full()
    }

    /// Whether `ip` is in the current answer.
    pub(crate) fn current(&self, ip: IpAddr) -> bool {
        self.addrs.load().as_ref().is_none_or(|ips| ips.contains(&ip))
    }
}

impl Dns {
    /// A resolver using `nameservers`, or the system's configuration when empty.
    pub(crate) fn new(nameservers: Vec<SocketAddr>) -> Arc<Dns> {
        Arc::new(Dns {
            nameservers,
            resolver: OnceLock::new(),
            names: ArcSwap::default(),
            retire_window: AtomicU64::new(60_000),
        })
    }

    fn resolver(&self) -> Result<&TokioResolver, BoxError> {
        self.resolver.get_or_init(|| build_resolver(&self.nameservers)).as_ref().map_err(|e| e.clone().into())
    }

    /// The entry for `name` in the config being compiled (`fresh`): the current config's
    /// entry, with its answer, when the name stays.
    pub(crate) fn entry(&self, fresh: &mut HashMap<Box<str>, Arc<DnsEntry>>, name: &str) -> Arc<DnsEntry> {
        if let Some(e) = fresh.get(name) {
            return e.clone();
        }
        let entry = self.names.load().get(name).cloned().unwrap_or_else(|| {
            Arc::new(DnsEntry {
                name: name.into(),
                addrs: ArcSwapOption::empty(),
                next: AtomicUsize::new(0),
                refreshing: AtomicBool::new(false),
                retire_until: AtomicU64::new(0),
            })
        });
        fresh.insert(name.into(), entry.clone());
        entry
    }

    /// Makes a compiled config's names current; names that left stop being re-resolved.
    pub(crate) fn install(&self, fresh: HashMap<Box<str>, Arc<DnsEntry>>, retire_window: Duration) {
        self.retire_window.store(u64::try_from(retire_window.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.names.store(Arc::new(fresh));
    }

    /// Addresses for a new connection to `name`, rotated. Resolves now when there is no
    /// answer yet, and makes sure the background re-resolution runs.
    async fn addresses(self: Arc<Self>, name: &str) -> Result<Vec<SocketAddr>, BoxError> {
        let entry = self.names.load().get(name).cloned();
        let Some(entry) = entry else {
            // A name only an older snapshot uses: resolve without keeping it.
            let (ips, _) = lookup(self.resolver()?, name).await?;
            return Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect());
        };
        let current = entry.addrs.load_full();
        let ips = match current {
            Some(ips) => ips,
            None => {
                let (ips, ttl) = lookup(self.resolver()?, name).await?;
                let ips = Arc::new(ips);
                entry.addrs.store(Some(ips.clone()));
                if !entry.refreshing.swap(true, Ordering::AcqRel) {
                    tokio::spawn(refresh(Arc::downgrade(&self), Arc::downgrade(&entry), ttl));
                }
                ips
            }
        };
        let start = entry.next.fetch_add(1, Ordering::Relaxed) % ips.len();
        Ok(ips[start..].iter().chain(&ips[..start]).map(|ip| SocketAddr::new(*ip, 0)).collect())
    }
}

fn build_resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let system = hickory_resolver::system_conf::read_system_conf();
    let (config, opts) = if nameservers.is_empty() {
        system.map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
    } else {
        // Configured nameservers replace the system's; its search domains and options stay.
        let servers = nameservers
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                ns
            })
            .collect();
        match system {
            Ok((config, opts)) => {
                let (domain, search, _) = config.into_parts();
                (ResolverConfig::from_parts(domain, search, servers), opts)
            }
            Err(_) => (ResolverConfig::from_name_servers(servers), Default::default()),
        }
    };
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    *builder.options_mut() = opts;
    builder.options_mut().timeout = Duration::from_secs(2);
    builder.build().map_err(|e| format!("cannot start the DNS resolver: {e}"))
}

/// One lookup: the addresses and how long they are valid (clamped).
async fn lookup(resolver: &TokioResolver, name: &str) -> Result<(Vec<IpAddr>, Duration), BoxError> {
    let answer = resolver.lookup_ip(name).await.map_err(|e| format!("DNS resolution of `{name}` failed: {e}"))?;
    let ips: Vec<IpAddr> = answer.iter().collect();
    if ips.is_empty() {
        return Err(format!("DNS resolution of `{name}` returned no addresses").into());
    }
    let ttl = answer.valid_until().saturating_duration_since(Instant::now());
    Ok((ips, ttl.clamp(MIN_TTL, MAX_TTL)))
}

/// Re-resolves `entry` whenever its answer expires, until the entry is dropped (its name left
/// the config) or the gateway is.
async fn refresh(dns: Weak<Dns>, entry: Weak<DnsEntry>, ttl: Duration) {
    let mut wait = ttl;
    let mut retry = MIN_TTL;
    loop {
        tokio::time::sleep(wait).await;
        let (Some(dns), Some(e)) = (dns.upgrade(), entry.upgrade()) else { return };
        let Ok(resolver) = dns.resolver() else { return };
        match lookup(resolver, &e.name).await {
            Ok((ips, ttl)) => {
                retry = MIN_TTL;
                wait = ttl;
                let old = e.addrs.load_full();
                if old.as_deref() != Some(&ips) {
                    tracing::info!(name = &*e.name, addresses = ?ips, "upstream host name now resolves differently");
                    if old.is_some_and(|old| old.iter().any(|ip| !ips.contains(ip))) {
                        let until = now_ms().saturating_add(dns.retire_window.load(Ordering::Relaxed)).max(1);
                        e.retire_until.store(until, Ordering::Relaxed);
                    }
                    e.addrs.store(Some(Arc::new(ips)));
                }
            }
            Err(err) => {
                tracing::warn!(name = &*e.name, error = %err, retry_in = ?retry, "keeping the last DNS answer");
                wait = retry;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// hyper-util's resolver interface over [`Dns`].
#[derive(Clone, Debug)]
pub(crate) struct DnsResolve(pub(crate) Arc<Dns>);

impl tower_service::Service<Name> for DnsResolve {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let dns = self.0.clone();
        Box::pin(async move { dns.addresses(name.as_str()).await.map(Vec::into_iter) })
    }
}
