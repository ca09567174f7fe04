//! Kubernetes adapter for `gateway-core`: translates Ingress v1 objects (from a manifest
//! folder or a live cluster) into the core config model, so a cluster and a folder of
//! manifests give exactly the same routing.
//!
//! - [`objects`]: the kinds read (Ingress, IngressClass, Service, EndpointSlice, Secret and
//!   Kong's KongPlugin, KongClusterPlugin, KongConsumer) and manifest parsing;
//! - [`translate()`]: the pure translation to a [`gateway_core::config::Config`], with
//!   problems reported per object;
//! - [`manifests`]: reading a file or folder of manifests;
//! - [`live`]: kube-rs reflectors, debounced recompiles, Ingress status and leader election.
//!
//! ```
//! use gateway_k8s::{Objects, Options, translate};
//!
//! let mut objects = Objects::default();
//! let problems = objects.add_manifest("app.yaml", r#"
//! apiVersion: networking.k8s.io/v1
//! kind: Ingress
//! metadata: { name: web, namespace: shop }
//! spec:
//!   ingressClassName: gateway
//!   rules:
//!     - host: shop.example.com
//!       http:
//!         paths:
//!           - { path: /cart, pathType: Prefix, backend: { service: { name: cart, port: { number: 80 } } } }
//! ---
//! apiVersion: v1
//! kind: Service
//! metadata: { name: cart, namespace: shop }
//! spec: { ports: [ { port: 80, targetPort: 8080 } ] }
//! ---
//! apiVersion: discovery.k8s.io/v1
//! kind: EndpointSlice
//! metadata: { name: cart-1, namespace: shop, labels: { kubernetes.io/service-name: cart } }
//! addressType: IPv4
//! ports: [ { port: 8080 } ]
//! endpoints: [ { addresses: [10.0.0.7], conditions: { ready: true } } ]
//! "#);
//! assert!(problems.is_empty());
//!
//! let translation = translate(&objects, &Options::default());
//! assert!(translation.problems.is_empty());
//! let route = &translation.config.services[0].routes[0];
//! assert_eq!(route.hosts, ["shop.example.com"]);
//! assert_eq!(translation.config.upstreams[0].targets[0].target, "10.0.0.7:8080");
//! ```

mod apply;
pub mod live;
pub mod manifests;
pub mod objects;
pub mod translate;

pub use apply::{Applied, Applier};
pub use objects::{KongClusterPlugin, KongConsumer, KongPlugin, ManifestProblem, Objects, PluginFields};
pub use translate::{ObjectProblem, ObjectRef, Options, Translation, translate, translate_checked};
