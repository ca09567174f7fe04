//! `gateway run --kubernetes`: connects to the cluster and starts the live mode.

use gateway_core::Gateway;
use gateway_k8s::live::{LiveSettings, Publish};

use crate::RunArgs;

/// Connects (in-cluster config, else KUBECONFIG), then serves the cluster's Ingresses from a
/// background task. Errors are the ones that stop the start: no usable cluster config, or
/// a bad flag.
pub(crate) async fn start(gateway: Gateway, args: &RunArgs) -> Result<(), String> {
    // kube-rs's TLS is rustls; one process-wide crypto provider (ring, as the gateway's).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let publish = match (&args.publish_service, &args.publish_address) {
        (Some(s), _) => match s.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
                Publish::Service { namespace: namespace.into(), name: name.into() }
            }
            _ => return Err(format!("--publish-service `{s}`: expected NAMESPACE/NAME")),
        },
        (None, list) if !list.is_empty() => Publish::Addresses(list.clone()),
        _ => Publish::Nothing,
    };
    let client = kube::Client::try_default().await.map_err(|e| format!("no cluster config: {e}"))?;
    // The pod's name (the downward API's POD_NAME, else the host name) identifies the replica
    // in the Lease; the Lease lives in the pod's namespace.
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("gateway-{}", std::process::id()));
    let lease_namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| client.default_namespace().to_string());
    let mut settings = LiveSettings::new(identity, lease_namespace);
    settings.namespaces.clone_from(&args.watch_namespace);
    settings.publish = publish;
    let applier = gateway_k8s::Applier::new(gateway.clone(), args.class.options());
    tokio::spawn(async move {
        if let Err(e) = gateway_k8s::live::run(client, gateway, applier, settings).await {
            // Exit so the pod restarts (with the kubelet's backoff) rather than sit unready.
            tracing::error!("kubernetes: {e}");
            eprintln!("kubernetes: {e}");
            std::process::exit(1);
        }
    });
    Ok(())
}
