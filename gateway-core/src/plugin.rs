//! Plugins: named, configured and ordered units of request handling.
//!
//! This module holds the registry that config validation consults; the plugin trait and its
//! phases build on it.
//!
//! ```
//! use gateway_core::plugin::PluginRegistry;
//!
//! let mut registry = PluginRegistry::default();
//! registry.register_name("my-plugin");
//! assert!(registry.contains("my-plugin"));
//! ```

use std::collections::BTreeSet;

/// The names a config may use in `plugins`.
#[derive(Debug, Clone, Default)]
pub struct PluginRegistry {
    names: BTreeSet<String>,
}

impl PluginRegistry {
    /// Makes `name` known to config validation.
    pub fn register_name(&mut self, name: impl Into<String>) -> &mut Self {
        self.names.insert(name.into());
        self
    }

    /// True when `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}
