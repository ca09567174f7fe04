//! A plugin written outside `gateway-plugins`, on `gateway-core`'s public API only: it refuses
//! requests whose `User-Agent` contains a configured word, and tags the upstream request with
//! the rule set that let it through.
//!
//! ```
//! use gateway_core::{Gateway, config::Config};
//!
//! let config = Config::from_yaml(r#"
//! _format_version: "3.0"
//! services:
//!   - name: api
//!     url: http://127.0.0.1:9000
//!     routes: [{ name: api, paths: ["/"] }]
//!     plugins:
//!       - name: user-agent-filter
//!         config: { deny: [curl, python-requests], status: 403 }
//! "#).unwrap();
//! let gateway = Gateway::builder().plugins(custom_plugin::registry()).build(&config).unwrap();
//! assert_eq!(gateway.routes()[0].plugins, vec!["user-agent-filter"]);
//! ```

use std::ops::ControlFlow;

use gateway_core::body::ProxyBody;
use gateway_core::plugin::{Answer, BuildContext, Plugin, PluginRegistry, RequestContext, TypedFactory, typed_factory};
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use serde::Deserialize;

/// The plugin's config, read from the `config` block of a plugin entry. Unknown fields are
/// refused, so a typo in YAML is a clear error rather than a silently ignored setting.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserAgentFilterConfig {
    /// Words that, found in the `User-Agent` (ignoring case), refuse the request.
    pub deny: Vec<String>,
    /// Status of the refusal (default 403).
    #[serde(default = "default_status")]
    pub status: u16,
    /// Refuse requests that send no `User-Agent` at all.
    #[serde(default)]
    pub require_user_agent: bool,
}

fn default_status() -> u16 {
    403
}

/// The plugin. Everything it needs per request is computed once, in [`UserAgentFilter::new`].
pub struct UserAgentFilter {
    deny: Vec<String>,
    status: StatusCode,
    require: bool,
    tag: HeaderValue,
}

static FILTERED_BY: HeaderName = HeaderName::from_static("x-user-agent-filter");

impl UserAgentFilter {
    /// Builds the plugin; errors become a 500 on the routes it applies to, with a log line.
    pub fn new(config: UserAgentFilterConfig) -> Result<Self, String> {
        if config.deny.is_empty() {
            return Err("`deny` must list at least one word".into());
        }
        let status = StatusCode::from_u16(config.status)
            .ok()
            .filter(|s| s.is_client_error())
            .ok_or_else(|| format!("`status` must be a 4xx status, got {}", config.status))?;
        let deny: Vec<String> = config.deny.iter().map(|w| w.to_ascii_lowercase()).collect();
        let tag = HeaderValue::from_str(&format!("passed {} rules", deny.len())).map_err(|e| e.to_string())?;
        Ok(UserAgentFilter { deny, status, require: config.require_user_agent, tag })
    }
}

impl Plugin for UserAgentFilter {
    fn access(&self, ctx: &mut RequestContext, req: &mut Request<ProxyBody>) -> ControlFlow<Answer> {
        let agent = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok());
        let refused = match agent {
            None => self.require,
            Some(a) => {
                let a = a.to_ascii_lowercase();
                self.deny.iter().any(|w| a.contains(w.as_str()))
            }
        };
        if refused {
            return ControlFlow::Break(ctx.error(self.status, "User-Agent not allowed"));
        }
        ControlFlow::Continue(())
    }

    fn before_upstream(&self, _ctx: &mut RequestContext, req: &mut Request<ProxyBody>) {
        req.headers_mut().insert(FILTERED_BY.clone(), self.tag.clone());
    }
}

/// The factory: name, default priority (between ip-restriction and acl), and how to build.
pub fn factory() -> TypedFactory<
    UserAgentFilterConfig,
    impl Fn(UserAgentFilterConfig, &BuildContext<'_>) -> Result<UserAgentFilter, String> + Send + Sync,
> {
    typed_factory("user-agent-filter", 980, |config: UserAgentFilterConfig, _: &BuildContext<'_>| {
        UserAgentFilter::new(config)
    })
}

/// Every first-party plugin plus this one.
pub fn registry() -> PluginRegistry {
    let mut registry = gateway_plugins::registry();
    registry.register(factory());
    registry
}
