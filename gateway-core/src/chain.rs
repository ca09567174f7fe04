//! Compiling plugin instances into per-route chains: scope resolution, ordering and layers,
//! all decided once per config so a request only walks a slice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use crate::config::{Config, EntityRef, Plugin as PluginEntry, Route};
use crate::plugin::{BuildContext, ConsumerInfo, Plugin, PluginRegistry, UpstreamLayer};

/// Per-consumer replacements of a slot's default instance.
pub(crate) type ConsumerOverrides = Box<[(usize, Option<Arc<dyn Plugin>>)]>;

/// Where an instance applies: indexes of a route, a service and a consumer, each optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Scope {
    route: Option<usize>,
    service: Option<usize>,
    consumer: Option<usize>,
}

/// One plugin name on a route: the instance that applies by default, and the instances that
/// replace it for particular consumers.
pub(crate) struct Slot {
    pub(crate) name: Arc<str>,
    pub(crate) default: Option<Arc<dyn Plugin>>,
    /// (consumer index, instance or none), sorted by consumer index.
    pub(crate) by_consumer: ConsumerOverrides,
}

impl Slot {
    /// The instance for a request whose consumer (if known yet) is `consumer`.
    #[inline]
    pub(crate) fn pick(&self, consumer: Option<usize>) -> Option<&Arc<dyn Plugin>> {
        if let (Some(c), false) = (consumer, self.by_consumer.is_empty())
            && let Ok(i) = self.by_consumer.binary_search_by_key(&c, |(k, _)| *k)
        {
            return self.by_consumer[i].1.as_ref();
        }
        self.default.as_ref()
    }
}

/// The compiled plugins of one route.
#[derive(Default)]
pub(crate) struct Chain {
    pub(crate) slots: Box<[Slot]>,
    pub(crate) layers: Vec<UpstreamLayer>,
    /// Set when a plugin that applies here could not be built: the route answers 500.
    pub(crate) failure: Option<Box<str>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("slots", &self.slots.iter().map(|s| &*s.name).collect::<Vec<_>>())
            .field("layers", &self.layers.len())
            .field("failure", &self.failure)
            .finish()
    }
}

impl Chain {
    /// The plugin names in execution order.
    pub(crate) fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.to_string()).collect()
    }

    /// Every plugin instance of the chain, consumer-scoped ones included.
    pub(crate) fn instances(&self) -> impl Iterator<Item = &Arc<dyn Plugin>> {
        self.slots.iter().flat_map(|s| s.default.iter().chain(s.by_consumer.iter().filter_map(|(_, p)| p.as_ref())))
    }
}

/// Consumers and credentials compiled from the config.
pub(crate) struct Consumers {
    pub(crate) infos: Vec<Arc<ConsumerInfo>>,
    pub(crate) credentials: Vec<BTreeMap<String, Vec<Value>>>,
}

struct Instance<'a> {
    at: String,
    entry: &'a PluginEntry,
    route: Option<usize>,
    service: Option<usize>,
    consumer: Option<usize>,
    order: usize,
    built: Result<Arc<dyn Plugin>, String>,
    priority: i32,
    before: Vec<String>,
    after: Vec<String>,
}

impl Instance<'_> {
    fn rank(&self) -> u8 {
        match (self.consumer.is_some(), self.route.is_some(), self.service.is_some()) {
            (true, true, true) => 8,
            (true, true, false) => 7,
            (true, false, true) => 6,
            (false, true, true) => 5,
            (true, false, false) => 4,
            (false, true, false) => 3,
            (false, false, true) => 2,
            (false, false, false) => 1,
        }
    }

    fn applies(&self, route: usize, service: Option<usize>) -> bool {
        self.route.is_none_or(|r| r == route) && self.service.is_none_or(|s| Some(s) == service)
    }
}

/// Parses `ordering`: `{before: [..], after: [..]}` or Kong's `{before: {access: [..]}}`.
fn parse_ordering(v: Option<&Value>) -> Result<(Vec<String>, Vec<String>), String> {
    let Some(v) = v else { return Ok((Vec::new(), Vec::new())) };
    let obj = v.as_object().ok_or("`ordering` must be an object with `before` and/or `after`")?;
    let list = |key: &str| -> Result<Vec<String>, String> {
        let Some(x) = obj.get(key) else { return Ok(Vec::new()) };
        let arr = match x {
            Value::Array(a) => a,
            Value::Object(o) => match o.get("access") {
                Some(Value::Array(a)) if o.len() == 1 => a,
                _ => return Err(format!("`ordering.{key}` must be a list of plugin names or `{{access: [...]}}`")),
            },
            _ => return Err(format!("`ordering.{key}` must be a list of plugin names")),
        };
        arr.iter()
            .map(|n| n.as_str().map(str::to_string).ok_or_else(|| format!("`ordering.{key}` must list names")))
            .collect()
    };
    if let Some(k) = obj.keys().find(|k| *k != "before" && *k != "after") {
        return Err(format!("`ordering` has an unknown key `{k}`"));
    }
    Ok((list("before")?, list("after")?))
}

/// Everything the chain compiler reports back: one chain per route given, and the plugin
/// instances whose config their plugin refused (their routes answer 500).
pub(crate) struct PluginPlan {
    pub(crate) chains: Vec<Chain>,
    pub(crate) failures: Vec<crate::config::Problem>,
}

/// A problem sink: (where, what).
pub(crate) type Problems = Vec<(String, String)>;

fn find_key<'a, T>(items: &'a [T], key: &str, keys: impl Fn(&'a T) -> [Option<&'a str>; 3]) -> Option<usize> {
    items.iter().position(|it| keys(it).into_iter().flatten().any(|k| k == key))
}

/// Compiles consumers and plugin chains for `routes` (nested routes first, then top-level, as
/// the caller lists them; each with its service index).
pub(crate) fn compile(
    config: &Config,
    registry: &PluginRegistry,
    routes: &[(String, &Route, Option<usize>)],
    problems: &mut Problems,
) -> PluginPlan {
    let consumers = compile_consumers(config, registry, problems);

    // Every instance with its scope.
    let mut raw: Vec<(String, &PluginEntry, Scope)> = Vec::new();
    let resolve = |at: &str, p: &PluginEntry, problems: &mut Problems| -> Option<Scope> {
        let mut ok = true;
        let mut get = |what: &str, r: &Option<EntityRef>, found: &dyn Fn(&str) -> Option<usize>| -> Option<usize> {
            let key = r.as_ref()?.key().unwrap_or("");
            let idx = found(key);
            if idx.is_none() {
                problems.push((at.to_string(), format!("{what} `{key}` does not exist")));
                ok = false;
            }
            idx
        };
        let service = get("service", &p.service, &|k| {
            find_key(&config.services, k, |s| [s.name.as_deref(), s.id.as_deref(), None])
        });
        let route =
            get("route", &p.route, &|k| find_key(routes, k, |r| [r.1.name.as_deref(), r.1.id.as_deref(), None]));
        let consumer = get("consumer", &p.consumer, &|k| {
            find_key(&config.consumers, k, |c| [c.username.as_deref(), c.custom_id.as_deref(), c.id.as_deref()])
        });
        ok.then_some(Scope { route, service, consumer })
    };
    for (i, p) in config.plugins.iter().enumerate() {
        let at = format!("plugins[{i}]");
        if let Some(scope) = resolve(&at, p, problems) {
            raw.push((at, p, scope));
        }
    }
    let nested_scope = |at: &str, p: &PluginEntry, problems: &mut Problems| {
        if p.service.is_some() || p.route.is_some() || p.consumer.is_some() {
            problems.push((at.to_string(), "a nested plugin takes its scope from where it is nested".to_string()));
        }
    };
    for (si, s) in config.services.iter().enumerate() {
        for (i, p) in s.plugins.iter().enumerate() {
            let at = format!("services[{si}].plugins[{i}]");
            nested_scope(&at, p, problems);
            raw.push((at, p, Scope { route: None, service: Some(si), consumer: None }));
        }
    }
    for (ri, (rat, r, _)) in routes.iter().enumerate() {
        for (i, p) in r.plugins.iter().enumerate() {
            let at = format!("{rat}.plugins[{i}]");
            nested_scope(&at, p, problems);
            raw.push((at, p, Scope { route: Some(ri), service: None, consumer: None }));
        }
    }
    for (ci, c) in config.consumers.iter().enumerate() {
        for (i, p) in c.plugins.iter().enumerate() {
            let at = format!("consumers[{ci}].plugins[{i}]");
            nested_scope(&at, p, problems);
            raw.push((at, p, Scope { route: None, service: None, consumer: Some(ci) }));
        }
    }

    // Build each enabled instance once.
    let mut instances: Vec<Instance<'_>> = Vec::new();
    let mut failures = Vec::new();
    let mut seen: HashMap<(&str, Scope), String> = HashMap::new();
    for (order, (at, entry, scope)) in raw.into_iter().enumerate() {
        if entry.enabled == Some(false) {
            continue;
        }
        let Some(factory) = registry.get(&entry.name) else { continue }; // reported by name checks
        if scope.consumer.is_some() && !factory.consumer_scope_allowed() {
            problems.push((at, format!("plugin `{}` cannot be scoped to a consumer", entry.name)));
            continue;
        }
        if let Some(first) = seen.insert((entry.name.as_str(), scope), at.clone()) {
            problems.push((
                at,
                format!("plugin `{}` is configured twice for the same scope (first at {first})", entry.name),
            ));
            continue;
        }
        let (before, after) = match parse_ordering(entry.ordering.as_ref()) {
            Ok(o) => o,
            Err(e) => {
                problems.push((at, e));
                continue;
            }
        };
        let empty = Value::Object(Default::default());
        let ctx = BuildContext {
            consumers: &consumers.infos,
            credentials: &consumers.credentials,
            instance: entry.id.clone().unwrap_or_else(|| at.clone()),
        };
        let built = factory.build(entry.config.as_ref().unwrap_or(&empty), &ctx);
        if let Err(e) = &built {
            tracing::error!(plugin = %entry.name, at = %at, error = %e, "plugin config rejected; the routes it applies to answer 500");
            failures.push(crate::config::Problem {
                at: at.clone(),
                message: format!("plugin `{}`: {e}", entry.name),
                line: None,
                column: None,
            });
        }
        let Scope { route, service, consumer } = scope;
        instances.push(Instance {
            at,
            entry,
            route,
            service,
            consumer,
            order,
            built,
            priority: factory.priority(),
            before,
            after,
        });
    }

    let chains = routes.iter().enumerate().map(|(ri, (_, _, service))| chain_for(ri, *service, &instances)).collect();
    PluginPlan { chains, failures }
}

fn chain_for(route: usize, service: Option<usize>, instances: &[Instance<'_>]) -> Chain {
    // Per plugin name: the best default instance and the best per consumer.
    struct Pick<'a> {
        default: Option<&'a Instance<'a>>,
        by_consumer: BTreeMap<usize, &'a Instance<'a>>,
    }
    let mut picks: BTreeMap<&str, Pick<'_>> = BTreeMap::new();
    for inst in instances.iter().filter(|i| i.applies(route, service)) {
        let pick =
            picks.entry(inst.entry.name.as_str()).or_insert(Pick { default: None, by_consumer: BTreeMap::new() });
        match inst.consumer {
            None => {
                if pick.default.is_none_or(|d| inst.rank() > d.rank()) {
                    pick.default = Some(inst);
                }
            }
            Some(c) => {
                let e = pick.by_consumer.entry(c).or_insert(inst);
                if inst.rank() > e.rank() {
                    *e = inst;
                }
            }
        }
    }
    let mut failure = None;
    let mut nodes = Vec::new();
    for (name, pick) in &picks {
        let anchor =
            pick.default.or_else(|| pick.by_consumer.values().next().copied()).expect("a pick has an instance");
        let get = |i: &Instance<'_>, failure: &mut Option<Box<str>>| match &i.built {
            Ok(p) => Some(p.clone()),
            Err(e) => {
                failure.get_or_insert_with(|| {
                    format!("plugin `{}` ({}) has an invalid config: {e}", i.entry.name, i.at).into()
                });
                None
            }
        };
        let default = pick.default.and_then(|d| get(d, &mut failure));
        let by_consumer: Box<[_]> = pick
            .by_consumer
            .iter()
            .filter(|(_, inst)| pick.default.is_none_or(|d| inst.rank() > d.rank()))
            .map(|(c, inst)| (*c, get(inst, &mut failure)))
            .collect();
        let layer = default.as_ref().and_then(|p| p.layer());
        nodes.push((
            Slot { name: Arc::from(*name), default, by_consumer },
            anchor.priority,
            anchor.order,
            anchor.before.clone(),
            anchor.after.clone(),
            layer,
        ));
    }
    // Order: priority (higher first), then declaration order, then before/after constraints
    // (a topological sort that always takes the best ready node).
    let n = nodes.len();
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, node)| (&*node.0.name, i)).collect();
    let mut edges = vec![Vec::new(); n];
    let mut indegree = vec![0usize; n];
    for (i, node) in nodes.iter().enumerate() {
        for b in &node.3 {
            if let Some(&j) = index.get(b.as_str()) {
                edges[i].push(j);
                indegree[j] += 1;
            }
        }
        for a in &node.4 {
            if let Some(&j) = index.get(a.as_str()) {
                edges[j].push(i);
                indegree[i] += 1;
            }
        }
    }
    let mut order = Vec::with_capacity(n);
    let mut done = vec![false; n];
    while order.len() < n {
        let next = (0..n)
            .filter(|&i| !done[i] && indegree[i] == 0)
            .max_by_key(|&i| (nodes[i].1, std::cmp::Reverse(nodes[i].2)));
        let Some(i) = next else {
            let stuck: Vec<&str> = (0..n).filter(|&i| !done[i]).map(|i| &*nodes[i].0.name).collect();
            failure.get_or_insert_with(|| format!("plugin ordering has a cycle among {}", stuck.join(", ")).into());
            order.extend((0..n).filter(|&i| !done[i]));
            break;
        };
        done[i] = true;
        order.push(i);
        for &j in &edges[i] {
            indegree[j] -= 1;
        }
    }
    let mut slots_by_index: Vec<Option<_>> = nodes.into_iter().map(Some).collect();
    let mut slots = Vec::with_capacity(n);
    let mut layers = Vec::new();
    for i in order {
        if let Some(node) = slots_by_index[i].take() {
            if let Some(l) = node.5 {
                layers.push(l);
            }
            slots.push(node.0);
        }
    }
    Chain { slots: slots.into(), layers, failure }
}

fn compile_consumers(config: &Config, registry: &PluginRegistry, problems: &mut Problems) -> Consumers {
    let mut infos = Vec::new();
    let mut credentials: Vec<BTreeMap<String, Vec<Value>>> = Vec::new();
    for (i, c) in config.consumers.iter().enumerate() {
        let id =
            c.id.clone()
                .or_else(|| c.username.clone())
                .or_else(|| c.custom_id.clone())
                .unwrap_or_else(|| format!("consumers[{i}]"));
        infos.push(Arc::new(ConsumerInfo {
            index: i,
            id: id.into(),
            username: c.username.as_deref().map(Arc::from),
            custom_id: c.custom_id.as_deref().map(Arc::from),
        }));
        let mut sections = BTreeMap::new();
        for (section, value) in c.credential_sections() {
            let at = format!("consumers[{i}].{section}");
            match (registry.owner_of_section(section), value) {
                (_, None | Some(Value::Null)) => {}
                (None, Some(_)) => problems.push((at, format!("`{section}` needs a plugin that is not supported yet"))),
                (Some(_), Some(Value::Array(items))) => {
                    sections.insert(section.to_string(), items.clone());
                }
                (Some(_), Some(_)) => problems.push((at, format!("`{section}` must be a list"))),
            }
        }
        credentials.push(sections);
    }
    // Top-level credentials name their consumer.
    for (section, value) in config.top_level_credentials() {
        let Some(items) = value else { continue };
        let Some(items) = items.as_array() else {
            problems.push((section.to_string(), format!("`{section}` must be a list")));
            continue;
        };
        if registry.owner_of_section(section).is_none() {
            if !items.is_empty() {
                problems.push((section.to_string(), format!("`{section}` needs a plugin that is not supported yet")));
            }
            continue;
        }
        for (j, item) in items.iter().enumerate() {
            let at = format!("{section}[{j}]");
            let key = item.get("consumer").and_then(|c| {
                c.as_str()
                    .or_else(|| c.get("username").and_then(Value::as_str))
                    .or_else(|| c.get("id").and_then(Value::as_str))
            });
            let Some(key) = key else {
                problems.push((at, "a top-level credential needs `consumer`".to_string()));
                continue;
            };
            let Some(ci) =
                find_key(&config.consumers, key, |c| [c.username.as_deref(), c.custom_id.as_deref(), c.id.as_deref()])
            else {
                problems.push((at, format!("consumer `{key}` does not exist")));
                continue;
            };
            let mut item = item.clone();
            if let Some(obj) = item.as_object_mut() {
                obj.remove("consumer");
            }
            credentials[ci].entry(section.to_string()).or_default().push(item);
        }
    }
    Consumers { infos, credentials }
}
