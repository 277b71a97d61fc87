//! Kubernetes discovery against a mock API server (`tower-test`): the
//! EndpointSlices of a Service are listed, then watched; slices are added,
//! their endpoints flip ready and not ready, slices are deleted, and the watch
//! expires (410 Gone) while a slice disappears. After each step the published
//! set must be exactly the ready `address:grpc-port` pairs.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tandem_disagg::discovery::watch_endpoint_slices;
use tokio::sync::{mpsc, watch};

/// What the mock answers to the next watch request.
enum WatchReply {
    /// These events (`ADDED`/`MODIFIED`/`DELETED`, object), then the stream ends.
    Events(Vec<(&'static str, Value)>),
    /// `410 Gone` as a watch event: the client must list again.
    Expired,
}

struct MockApi {
    /// What a list returns; the test changes it before forcing a relist.
    listed: Arc<Mutex<Vec<Value>>>,
    watch_replies: mpsc::UnboundedSender<WatchReply>,
    /// `(path, query)` of every request, in order.
    requests: Arc<Mutex<Vec<(String, String)>>>,
}

fn start_mock() -> (Client, MockApi) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let listed = Arc::new(Mutex::new(Vec::new()));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut watch_replies) = mpsc::unbounded_channel::<WatchReply>();
    let api = MockApi {
        listed: listed.clone(),
        watch_replies: tx,
        requests: requests.clone(),
    };
    tokio::spawn(async move {
        let mut resource_version = 100;
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            requests.lock().unwrap().push((path, query.clone()));
            let body = if query.contains("watch=true") {
                // Paced by the test: wait for its next step.
                let Some(reply) = watch_replies.recv().await else {
                    return;
                };
                match reply {
                    WatchReply::Events(events) => {
                        let mut lines = Vec::new();
                        for (kind, mut object) in events {
                            resource_version += 1;
                            object["metadata"]["resourceVersion"] =
                                json!(resource_version.to_string());
                            lines.extend(
                                serde_json::to_vec(&json!({"type": kind, "object": object}))
                                    .unwrap(),
                            );
                            lines.push(b'\n');
                        }
                        lines
                    }
                    WatchReply::Expired => {
                        let status = json!({"type": "ERROR", "object": {"kind": "Status",
                            "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": "too old resource version", "reason": "Expired", "code": 410}});
                        let mut line = serde_json::to_vec(&status).unwrap();
                        line.push(b'\n');
                        line
                    }
                }
            } else {
                resource_version += 1;
                let items = listed.lock().unwrap().clone();
                serde_json::to_vec(&json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": resource_version.to_string()},
                    "items": items,
                }))
                .unwrap()
            };
            send.send_response(
                Response::builder()
                    .status(StatusCode::OK)
                    .body(Body::from(body))
                    .unwrap(),
            );
        }
    });
    (Client::new(service, "default"), api)
}

/// A slice of Service `llama-decode` with endpoints `(ip, ready)`.
fn slice(name: &str, endpoints: &[(&str, Option<bool>)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| match ready {
            Some(r) => json!({"addresses": [ip], "conditions": {"ready": r}}),
            None => json!({"addresses": [ip]}),
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "serving",
                     "labels": {"kubernetes.io/service-name": "llama-decode"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000}, {"name": "grpc", "port": 9000}],
        "endpoints": endpoints,
    })
}

fn set(ips: &[&str]) -> BTreeSet<String> {
    ips.iter().map(|ip| format!("{ip}:9000")).collect()
}

async fn next_set(rx: &mut watch::Receiver<BTreeSet<String>>) -> BTreeSet<String> {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("the set changes within 10 s")
        .expect("discovery still running");
    rx.borrow_and_update().clone()
}

#[tokio::test]
async fn slices_added_updated_and_deleted_update_the_ready_set() {
    let (client, api) = start_mock();
    *api.listed.lock().unwrap() = vec![slice(
        "llama-decode-a",
        &[("10.0.0.1", Some(true)), ("10.0.0.2", Some(false))],
    )];
    let mut rx = watch_endpoint_slices(client, "serving", "llama-decode", "grpc");

    // The initial list: only the ready endpoint.
    assert_eq!(next_set(&mut rx).await, set(&["10.0.0.1"]));
    {
        let requests = api.requests.lock().unwrap();
        let (path, query) = &requests[0];
        assert_eq!(
            path,
            "/apis/discovery.k8s.io/v1/namespaces/serving/endpointslices"
        );
        assert!(
            query.contains("labelSelector=kubernetes.io%2Fservice-name%3Dllama-decode"),
            "{query}"
        );
    }

    // 10.0.0.2 finished loading its model: ready flips to true.
    api.watch_replies
        .send(WatchReply::Events(vec![(
            "MODIFIED",
            slice(
                "llama-decode-a",
                &[("10.0.0.1", Some(true)), ("10.0.0.2", Some(true))],
            ),
        )]))
        .unwrap();
    assert_eq!(next_set(&mut rx).await, set(&["10.0.0.1", "10.0.0.2"]));

    // The Service scaled up: a second slice; an absent condition means ready.
    api.watch_replies
        .send(WatchReply::Events(vec![(
            "ADDED",
            slice("llama-decode-b", &[("10.0.0.3", None)]),
        )]))
        .unwrap();
    assert_eq!(
        next_set(&mut rx).await,
        set(&["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    );

    // 10.0.0.1 is terminating: no longer ready.
    api.watch_replies
        .send(WatchReply::Events(vec![(
            "MODIFIED",
            slice(
                "llama-decode-a",
                &[("10.0.0.1", Some(false)), ("10.0.0.2", Some(true))],
            ),
        )]))
        .unwrap();
    assert_eq!(next_set(&mut rx).await, set(&["10.0.0.2", "10.0.0.3"]));

    // The second slice is deleted.
    api.watch_replies
        .send(WatchReply::Events(vec![(
            "DELETED",
            slice("llama-decode-b", &[("10.0.0.3", None)]),
        )]))
        .unwrap();
    assert_eq!(next_set(&mut rx).await, set(&["10.0.0.2"]));

    // The watch expires; meanwhile slice a went away and slice c appeared.
    // The relist must replace the set, not merge into it.
    *api.listed.lock().unwrap() = vec![slice("llama-decode-c", &[("10.0.0.7", Some(true))])];
    api.watch_replies.send(WatchReply::Expired).unwrap();
    assert_eq!(next_set(&mut rx).await, set(&["10.0.0.7"]));

    let lists = api
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, q)| !q.contains("watch=true"))
        .count();
    assert_eq!(lists, 2, "one list at start, one after the watch expired");
}

#[tokio::test]
async fn dropping_every_receiver_stops_the_watch() {
    let (client, api) = start_mock();
    *api.listed.lock().unwrap() = vec![slice("llama-decode-a", &[("10.0.0.1", Some(true))])];
    let mut rx = watch_endpoint_slices(client, "serving", "llama-decode", "grpc");
    assert_eq!(next_set(&mut rx).await, set(&["10.0.0.1"]));
    drop(rx);
    // Answer the pending watch: a running task would watch again, and the mock
    // would wait for another step forever. A stopped one drops its client, the
    // mock sees no more requests, and its end closes this channel.
    api.watch_replies.send(WatchReply::Events(vec![])).unwrap();
    tokio::time::timeout(Duration::from_secs(5), api.watch_replies.closed())
        .await
        .unwrap_or_else(|_| panic!("the watch task still runs after its receivers are gone"));
}
