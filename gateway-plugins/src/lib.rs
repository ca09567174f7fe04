//! First-party plugins for `gateway-core`, each in its own module and each built only on
//! `gateway-core`'s public plugin API (so a third-party plugin can do everything these do).
//!
//! The plugins themselves arrive with the plugin API; until then this crate offers the
//! registry a binary passes to the gateway.
//!
//! ```
//! let registry = gateway_plugins::registry();
//! let gateway = gateway_core::Gateway::builder()
//!     .plugins(registry)
//!     .build(&gateway_core::config::Config::from_yaml("_format_version: \"3.0\"\n").unwrap())
//!     .unwrap();
//! assert!(gateway.routes().is_empty());
//! ```

use gateway_core::plugin::PluginRegistry;

/// A registry holding every first-party plugin.
pub fn registry() -> PluginRegistry {
    PluginRegistry::default()
}
