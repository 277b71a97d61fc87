//! Kubernetes discovery: the EndpointSlices of a tier's headless Service.
//!
//! The EndpointSlice controller keeps one or more slices per Service, labelled
//! `kubernetes.io/service-name=<service>`, listing each pod behind it with its
//! readiness. A kube-runtime reflector keeps a local copy of those slices
//! (list, then watch; relisting and backing off on errors), and after every
//! change the set of ready `address:grpc-port` pairs is recomputed. Pods fail
//! their readiness probe until the model is loaded, so a worker is routed to
//! only once it can serve. The operator's discovery Role grants exactly the
//! `get`/`list`/`watch` on `endpointslices` this needs.

use std::collections::BTreeSet;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{reflector, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;

/// The label the EndpointSlice controller puts on a Service's slices.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The `host:port` of every ready endpoint in `slices` at the port named
/// `port_name`. An endpoint counts as ready unless its `ready` condition is
/// explicitly false (the API's own reading of an absent condition). Slices
/// without that port contribute nothing; an endpoint listed in two slices
/// (it happens while slices are rebalanced) counts once.
pub fn ready_grpc_addresses<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: &str,
) -> BTreeSet<String> {
    let mut addresses = BTreeSet::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name))
            .and_then(|p| p.port)
        else {
            continue;
        };
        let ipv6 = slice.address_type == "IPv6";
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            // One endpoint is one pod: the controller gives it exactly one address.
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            if ready {
                addresses.insert(if ipv6 {
                    format!("[{address}]:{port}")
                } else {
                    format!("{address}:{port}")
                });
            }
        }
    }
    addresses
}

/// Watches the EndpointSlices of `service` in `namespace` and publishes the
/// ready addresses at `port_name`. The set starts empty and fills once the
/// first list arrives. The task ends when every receiver is dropped.
pub fn watch_endpoint_slices(
    client: Client,
    namespace: &str,
    service: &str,
    port_name: &str,
) -> watch::Receiver<BTreeSet<String>> {
    let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
    let (reader, writer) = reflector::store();
    let events = reflector(writer, watcher::watcher(api, config).default_backoff());
    let (tx, rx) = watch::channel(BTreeSet::new());
    let (namespace, service, port_name) = (
        namespace.to_string(),
        service.to_string(),
        port_name.to_string(),
    );
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                () = tx.closed() => return,
                event = events.next() => event,
            };
            match event {
                // With a backoff the stream retries forever; an end is unexpected.
                None => {
                    tracing::error!(%namespace, %service, "EndpointSlice watch ended");
                    return;
                }
                Some(Err(e)) => {
                    tracing::warn!(%namespace, %service, "watching EndpointSlices: {e}; retrying, keeping the last known workers");
                }
                // The store swaps in a relist only at `InitDone`.
                Some(Ok(Event::Init | Event::InitApply(_))) => {}
                Some(Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_))) => {
                    let slices = reader.state();
                    let addresses = ready_grpc_addresses(slices.iter().map(|s| &**s), &port_name);
                    tx.send_if_modified(|current| {
                        if *current == addresses {
                            return false;
                        }
                        tracing::info!(%service, workers = ?addresses, "discovered workers changed");
                        *current = addresses;
                        true
                    });
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn only_ready_endpoints_at_the_named_port() {
        let a = slice(serde_json::json!({
            "metadata": {"name": "decode-abc"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000}, {"name": "grpc", "port": 9000}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["10.0.0.4"], "conditions": {}},
            ]
        }));
        let b = slice(serde_json::json!({
            "metadata": {"name": "decode-v6"},
            "addressType": "IPv6",
            "ports": [{"name": "grpc", "port": 9000}],
            "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": true}},
                          {"addresses": ["fd00::6"], "conditions": {"ready": false}}]
        }));
        let no_grpc = slice(serde_json::json!({
            "metadata": {"name": "decode-http-only"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000}],
            "endpoints": [{"addresses": ["10.0.0.9"]}]
        }));
        let got = ready_grpc_addresses([&a, &b, &no_grpc], "grpc");
        let want: BTreeSet<String> = [
            "10.0.0.1:9000",
            "10.0.0.3:9000",
            "10.0.0.4:9000",
            "[fd00::5]:9000",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(got, want);
    }
}
