//! `ip-restriction`: allows or denies clients by address or CIDR (403 by default).
//!
//! The address checked is the connection's peer address.

use std::net::IpAddr;
use std::ops::ControlFlow;

use gateway_core::body::ProxyBody;
use gateway_core::plugin::{Answer, BuildContext, Plugin, RequestContext, TypedFactory, typed_factory};
use http::{Request, StatusCode};
use ipnet::IpNet;
use serde::Deserialize;

/// Kong's priority for ip-restriction.
pub const PRIORITY: i32 = 990;

/// ip-restriction's config (Kong's fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRestrictionConfig {
    /// Addresses or CIDRs allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Addresses or CIDRs denied (checked first).
    #[serde(default)]
    pub deny: Vec<String>,
    /// Status of the refusal (default 403).
    #[serde(default)]
    pub status: Option<u16>,
    /// Message of the refusal.
    #[serde(default)]
    pub message: Option<String>,
}

/// The ip-restriction plugin.
pub struct IpRestriction {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    status: StatusCode,
    message: String,
}

/// The factory to register.
pub fn factory() -> TypedFactory<
    IpRestrictionConfig,
    impl Fn(IpRestrictionConfig, &BuildContext<'_>) -> Result<IpRestriction, String> + Send + Sync,
> {
    typed_factory("ip-restriction", PRIORITY, |c: IpRestrictionConfig, _: &BuildContext<'_>| IpRestriction::new(c))
}

fn parse_nets(field: &str, list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("`{field}`: `{s}` is not an IP address or CIDR"))
        })
        .collect()
}

impl IpRestriction {
    /// Builds the plugin from its config.
    pub fn new(c: IpRestrictionConfig) -> Result<Self, String> {
        if c.allow.is_empty() && c.deny.is_empty() {
            return Err("set at least one of `allow` and `deny`".into());
        }
        let status = match c.status {
            None => StatusCode::FORBIDDEN,
            Some(s) => StatusCode::from_u16(s)
                .ok()
                .filter(|s| s.as_u16() >= 400)
                .ok_or(format!("`status` {s} is not an error status"))?,
        };
        Ok(IpRestriction {
            allow: parse_nets("allow", &c.allow)?,
            deny: parse_nets("deny", &c.deny)?,
            status,
            message: c.message.unwrap_or_else(|| "Your IP address is not allowed".into()),
        })
    }
}

impl Plugin for IpRestriction {
    fn access(&self, ctx: &mut RequestContext, _req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        let ip = ctx.client_addr().ip().to_canonical();
        let denied = self.deny.iter().any(|n| n.contains(&ip))
            || (!self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)));
        if denied { ControlFlow::Break(ctx.error(self.status, &self.message)) } else { ControlFlow::Continue(()) }
    }
}
