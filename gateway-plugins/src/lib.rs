//! First-party plugins for `gateway-core`, each in its own module and each built only on
//! `gateway-core`'s public plugin API, so a third-party plugin can do everything these do.
//!
//! ```
//! use gateway_core::{Gateway, config::Config};
//!
//! let config = Config::from_yaml(r#"
//! _format_version: "3.0"
//! consumers:
//!   - username: alice
//!     keyauth_credentials: [{ key: alice-key }]
//! services:
//!   - name: api
//!     url: http://127.0.0.1:9000
//!     routes: [{ name: api, paths: ["/api"] }]
//!     plugins: [{ name: key-auth }]
//! "#).unwrap();
//! let gateway = Gateway::builder().plugins(gateway_plugins::registry()).build(&config).unwrap();
//! assert_eq!(gateway.routes()[0].plugins, vec!["key-auth"]);
//! ```

pub mod acl;
pub mod circuit_breaker;
pub mod correlation_id;
pub mod cors;
pub mod identity;
pub mod ip_restriction;
pub mod jwt;
pub mod key_auth;
pub mod rate_limiting;
pub mod request_size_limiting;
pub mod request_transformer;
pub mod response_transformer;
pub mod retries;
pub mod transform;

use gateway_core::plugin::PluginRegistry;

/// A registry holding every first-party plugin.
pub fn registry() -> PluginRegistry {
    let mut r = PluginRegistry::default();
    r.register(key_auth::factory());
    r.register(jwt::factory());
    r.register(acl::factory());
    r.register(rate_limiting::factory());
    r.register(ip_restriction::factory());
    r.register(request_size_limiting::factory());
    r.register(correlation_id::factory());
    r.register(request_transformer::factory());
    r.register(retries::factory());
    r.register(circuit_breaker::factory());
    r.register(response_transformer::factory());
    r.register(cors::factory());
    r
}
