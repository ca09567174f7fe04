//! Kubernetes adapter for `gateway-core`: translates Ingress v1 objects (from a manifest
//! folder or a live cluster) into the core config model, so a cluster and a folder of
//! manifests give exactly the same routing.
//!
//! The translation lands with its own issue; the route model it targets already exists in
//! the core: `path_type: exact` and `path_type: element_prefix` routes follow the Ingress
//! path rules, and `wildcard_single_label` makes `*.example.com` cover exactly one label.
//!
//! ```
//! use gateway_core::config::{Config, PathType};
//!
//! let config = Config::from_yaml(r#"
//! _format_version: "3.0"
//! routes:
//!   - name: ingress-rule
//!     hosts: ["*.example.com"]
//!     wildcard_single_label: true
//!     paths: ["/app"]
//!     path_type: element_prefix
//! "#).unwrap();
//! assert_eq!(config.routes[0].path_type, PathType::ElementPrefix);
//! ```
