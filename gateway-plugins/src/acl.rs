//! `acl`: allows or denies consumers by group, from the consumers' `acls` credentials.
//!
//! Runs after authentication (priority 950). An unauthenticated request gets 401
//! `Unauthorized`; a consumer outside `allow` or inside `deny` gets 403
//! `You cannot consume this service`. The upstream receives `X-Consumer-Groups` unless
//! `hide_groups_header` is set.

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;

use gateway_core::body::ProxyBody;
use gateway_core::plugin::{Answer, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use http::{HeaderValue, Request, StatusCode};
use serde::Deserialize;

use crate::identity::CONSUMER_GROUPS;

/// Kong's priority for acl.
pub const PRIORITY: i32 = 950;

/// acl's config (Kong's fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Groups allowed (a consumer must be in one of them).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Groups denied.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Do not send `X-Consumer-Groups` upstream.
    #[serde(default)]
    pub hide_groups_header: bool,
    /// Kong's field; only `false` is supported.
    #[serde(default)]
    pub include_consumer_groups: bool,
    /// Kong's field; accepted (groups always come from the authenticated consumer).
    #[serde(default)]
    pub always_use_authenticated_groups: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AclEntry {
    group: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    tags: Option<serde_json::Value>,
    #[serde(default)]
    created_at: Option<serde_json::Value>,
}

/// The acl plugin.
pub struct Acl {
    allow: BTreeSet<String>,
    deny: BTreeSet<String>,
    hide: bool,
    /// Consumer index to (groups, the `X-Consumer-Groups` value).
    groups: HashMap<usize, (BTreeSet<String>, Option<HeaderValue>)>,
}

/// The factory to register.
pub fn factory() -> TypedFactory<AclConfig, impl Fn(AclConfig, &BuildContext<'_>) -> Result<Acl, String> + Send + Sync>
{
    typed_factory("acl", PRIORITY, Acl::new).no_consumer().with_credentials(&["acls"])
}

impl Acl {
    /// Builds the plugin from its config and the consumers' `acls`.
    pub fn new(config: AclConfig, build: &BuildContext<'_>) -> Result<Self, String> {
        if config.allow.is_empty() == config.deny.is_empty() {
            return Err("set exactly one of `allow` and `deny`".into());
        }
        if config.include_consumer_groups {
            return Err("`include_consumer_groups` is not supported yet".into());
        }
        let _ = config.always_use_authenticated_groups;
        let mut groups: HashMap<usize, (BTreeSet<String>, Option<HeaderValue>)> = HashMap::new();
        for (consumer, raw) in build.credentials("acls") {
            let entry: AclEntry =
                serde_json::from_value(raw.clone()).map_err(|e| format!("acls of consumer `{}`: {e}", consumer.id))?;
            let _ = (&entry.id, &entry.tags, &entry.created_at);
            groups.entry(consumer.index).or_default().0.insert(entry.group);
        }
        for (set, header) in groups.values_mut() {
            *header = HeaderValue::from_str(&set.iter().cloned().collect::<Vec<_>>().join(", ")).ok();
        }
        Ok(Acl {
            allow: config.allow.into_iter().collect(),
            deny: config.deny.into_iter().collect(),
            hide: config.hide_groups_header,
            groups,
        })
    }
}

impl Plugin for Acl {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        req.headers_mut().remove(&CONSUMER_GROUPS);
        let Some(consumer) = &ctx.consumer else {
            return ControlFlow::Break(ctx.error(StatusCode::UNAUTHORIZED, "Unauthorized"));
        };
        let (groups, header) = match self.groups.get(&consumer.index) {
            Some((g, h)) => (Some(g), h.as_ref()),
            None => (None, None),
        };
        let in_any = |set: &BTreeSet<String>| groups.is_some_and(|g| g.iter().any(|x| set.contains(x)));
        let allowed = if self.allow.is_empty() { !in_any(&self.deny) } else { in_any(&self.allow) };
        if !allowed {
            return ControlFlow::Break(ctx.error(StatusCode::FORBIDDEN, "You cannot consume this service"));
        }
        if let (false, Some(h)) = (self.hide, header) {
            req.headers_mut().insert(CONSUMER_GROUPS.clone(), h.clone());
        }
        ControlFlow::Continue(())
    }
}
