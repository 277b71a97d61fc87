//! The planner inside the reconcile: a `tower-test` mock API server records every request, and a
//! small HTTP server on loopback answers the planner's PromQL like Prometheus would. The tests
//! assert what a user sees: the StatefulSet scaled, status (desiredReplicas, lastScaleTime,
//! lastScaleReason, the ScalingActive condition), Events and the `tandem_planner_*` metrics.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::Query;
use axum::routing::get;
use http::{Method, StatusCode};
use kube::core::DeserializeGuard;
use kube::runtime::events::Reporter;
use kube::Client;
use serde_json::{json, Value};
use tandem_operator::controller::{reconcile, Context};
use tandem_operator::crd::{DisaggDeploymentStatus, TierStatus};
use tandem_operator::metrics::Metrics;
use tandem_operator::planner::unix_now_s;
use tandem_operator::FIELD_MANAGER;

use common::mock_api::{mock, Seen};

/// The mock API server: both StatefulSets exist with 2 ready replicas; patches echo back.
fn api_server() -> (Client, Arc<Mutex<Vec<Seen>>>) {
    mock(Arc::new(answer))
}

fn statefulset(name: &str, replicas: i64) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": "default", "generation": 1},
        "spec": {"replicas": replicas, "selector": {}, "serviceName": name, "template": {}},
        "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas,
            "updatedReplicas": replicas, "currentRevision": "r1", "updateRevision": "r1"}})
}

fn answer(seen: &Seen) -> (StatusCode, Value) {
    let name = seen
        .path
        .split('/')
        .skip_while(|s| *s != "statefulsets")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    match seen.method {
        Method::GET if seen.path.contains("/statefulsets/") => {
            (StatusCode::OK, statefulset(&name, 2))
        }
        Method::PATCH if seen.path.ends_with("/scale") => {
            let replicas = seen.body["spec"]["replicas"].clone();
            (
                StatusCode::OK,
                json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"replicas": replicas}, "status": {"replicas": 2}}),
            )
        }
        Method::PATCH if seen.path.ends_with("/status") => {
            let mut dd = serde_json::to_value(planned_deployment("http://unused")).unwrap();
            dd["status"] = seen.body["status"].clone();
            (StatusCode::OK, dd)
        }
        Method::PATCH if seen.path.contains("/statefulsets/") => {
            let replicas = seen.body["spec"]["replicas"].as_i64().unwrap_or(1);
            let mut obj = statefulset(&name, replicas);
            obj["spec"] = seen.body["spec"].clone();
            (StatusCode::OK, obj)
        }
        Method::PATCH => {
            let mut obj = seen.body.clone();
            obj["metadata"]["generation"] = json!(1);
            (StatusCode::OK, obj)
        }
        Method::POST => (StatusCode::CREATED, seen.body.clone()),
        _ => (
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "not found", "reason": "NotFound", "code": 404}),
        ),
    }
}

/// The planner example (prefill 1–4, decode 1–8, TTFT ≤ 500 ms, ITL ≤ 50 ms) as a reconciled
/// object: both tiers at 2 replicas, reading Prometheus at `url`.
fn planned_deployment(url: &str) -> tandem_operator::crd::DisaggDeployment {
    let (_, mut dd) = common::example_deployments()
        .into_iter()
        .find(|(stem, _)| stem == "disagg_planner")
        .expect("manifests/disagg_planner.yaml");
    dd.spec.autoscaling.as_mut().unwrap().prometheus_url = Some(url.to_string());
    let tier = TierStatus {
        replicas: 2,
        ready_replicas: 2,
        desired_replicas: 2,
        ..Default::default()
    };
    dd.status = Some(DisaggDeploymentStatus {
        observed_generation: dd.metadata.generation,
        prefill: Some(tier.clone()),
        decode: Some(tier),
        ..Default::default()
    });
    dd
}

/// Answers `/api/v1/query` from a table of (substring of the PromQL, value); a query matching
/// no row returns no series.
async fn fake_prometheus(rows: Vec<(&'static str, f64)>) -> String {
    let rows = Arc::new(rows);
    let app = axum::Router::new().route(
        "/api/v1/query",
        get(move |Query(params): Query<HashMap<String, String>>| {
            let rows = rows.clone();
            async move {
                let query = params.get("query").cloned().unwrap_or_default();
                let result: Vec<Value> = rows
                    .iter()
                    .find(|(needle, _)| query.contains(needle))
                    .map(|(_, value)| {
                        vec![json!({"metric": {}, "value": [unix_now_s(), value.to_string()]})]
                    })
                    .unwrap_or_default();
                axum::Json(json!({"status": "success",
                    "data": {"resultType": "vector", "result": result}}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn context(client: Client) -> Arc<Context> {
    Arc::new(Context::new(
        client,
        Reporter {
            controller: "tandem-operator".into(),
            instance: Some("test".into()),
        },
        Metrics::new(),
    ))
}

/// Prompts pile up in front of prefill: TTFT p90 2 s against 500 ms, 50 prompts queued; decode
/// is comfortable (ITL p90 20 ms against 50 ms).
fn overloaded_prefill(now: f64) -> Vec<(&'static str, f64)> {
    vec![
        ("time_to_first_token", 2.0),
        ("inter_token_latency", 0.020),
        // The mean-length queries name both `_sum` and `_count`: the first match wins, so the
        // arrival rate (`input_tokens_count` alone) comes after the sums.
        ("input_tokens_sum", 1000.0),
        ("output_tokens_sum", 100.0),
        ("input_tokens_count", 20.0),
        ("queue_depth", 50.0),
        ("kv_blocks_used", 0.4),
        ("prefill_tokens_total", 16000.0),
        ("decode_tokens_total", 2000.0),
        ("timestamp(up", now),
    ]
}

fn status_patch(log: &[Seen]) -> Value {
    log.iter()
        .rev()
        .find(|s| s.method == Method::PATCH && s.path.ends_with("/status"))
        .expect("a status patch")
        .body["status"]
        .clone()
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

#[tokio::test]
async fn a_ttft_breach_scales_prefill_and_status_events_and_metrics_say_why() {
    let url = fake_prometheus(overloaded_prefill(unix_now_s())).await;
    let dd = planned_deployment(&url);
    let (client, log) = api_server();
    let ctx = context(client);
    reconcile(Arc::new(DeserializeGuard(Ok(dd))), ctx.clone())
        .await
        .expect("reconcile");

    let log = log.lock().unwrap();
    let scale = log
        .iter()
        .find(|s| s.path.ends_with("statefulsets/llama-planner-prefill/scale"))
        .expect("the prefill StatefulSet is scaled through its scale subresource");
    assert_eq!(scale.method, Method::PATCH);
    assert!(scale
        .query
        .contains(&format!("fieldManager={FIELD_MANAGER}")));
    // 2 s is over twice the SLO and the planner has no capacity model yet: the largest step
    // (+4), clamped to maxReplicas 4.
    assert_eq!(scale.body["spec"]["replicas"], 4);
    assert!(
        !log.iter()
            .any(|s| s.path.ends_with("llama-planner-decode/scale")),
        "decode meets its SLO and is not scaled up"
    );
    let applied = log
        .iter()
        .find(|s| {
            s.method == Method::PATCH && s.path.ends_with("statefulsets/llama-planner-prefill")
        })
        .expect("the prefill StatefulSet is applied");
    assert_eq!(
        applied.body["spec"]["replicas"], 4,
        "the apply carries the decision, not the old count"
    );

    let status = status_patch(&log);
    assert_eq!(status["prefill"]["desiredReplicas"], 4);
    assert!(status["prefill"]["lastScaleTime"].is_string(), "{status}");
    let reason = status["prefill"]["lastScaleReason"].as_str().unwrap();
    assert!(
        reason.starts_with("prefill 2->4") && reason.contains("TTFT p90 2000ms vs SLO 500ms"),
        "{reason}"
    );
    let active = condition(&status, "ScalingActive");
    assert_eq!(
        (active["status"].as_str(), active["reason"].as_str()),
        (Some("True"), Some("Planning"))
    );

    let scaled_event = log
        .iter()
        .find(|s| s.method == Method::POST && s.body["reason"] == "Scaled")
        .expect("a Scaled Event");
    assert!(
        scaled_event.body["note"]
            .as_str()
            .unwrap()
            .starts_with("prefill 2->4"),
        "{}",
        scaled_event.body
    );

    let metrics = ctx.metrics.render();
    for line in [
        "tandem_planner_desired_replicas{deployment=\"llama-planner\",namespace=\"default\",tier=\"prefill\"} 4",
        "tandem_planner_decisions_total{deployment=\"llama-planner\",namespace=\"default\",reason=\"scale_up\"} 1",
        "tandem_planner_observed_p90_seconds{deployment=\"llama-planner\",metric=\"ttft\",namespace=\"default\"} 2",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test]
async fn no_metrics_means_no_scaling_and_a_condition_and_warning_saying_why() {
    // Prometheus answers, but holds no series of this deployment.
    let url = fake_prometheus(Vec::new()).await;
    let dd = planned_deployment(&url);
    let (client, log) = api_server();
    let ctx = context(client);
    reconcile(Arc::new(DeserializeGuard(Ok(dd))), ctx.clone())
        .await
        .expect("reconcile");
    let log = log.lock().unwrap();
    assert!(
        !log.iter().any(|s| s.path.ends_with("/scale")),
        "nothing is scaled without metrics"
    );
    let status = status_patch(&log);
    assert_eq!(status["prefill"]["desiredReplicas"], 2);
    let active = condition(&status, "ScalingActive");
    assert_eq!(active["status"], "False");
    assert_eq!(active["reason"], "MetricsMissing");
    assert!(
        active["message"]
            .as_str()
            .unwrap()
            .contains("no successful scrape"),
        "{active}"
    );
    assert!(
        log.iter().any(|s| s.method == Method::POST
            && s.body["reason"] == "MetricsMissing"
            && s.body["type"] == "Warning"),
        "a Warning Event says why the planner stopped"
    );
    assert!(ctx.metrics.render().contains(
        "tandem_planner_decisions_total{deployment=\"llama-planner\",namespace=\"default\",reason=\"metrics_missing\"} 1"
    ));
}

#[tokio::test]
async fn an_unreachable_prometheus_is_a_condition_not_a_failed_reconcile() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (client, log) = api_server();
    reconcile(
        Arc::new(DeserializeGuard(Ok(planned_deployment(&url)))),
        context(client),
    )
    .await
    .expect("the rest of the reconcile still runs");
    let log = log.lock().unwrap();
    let status = status_patch(&log);
    let active = condition(&status, "ScalingActive");
    assert_eq!(active["status"], "False");
    assert_eq!(active["reason"], "PrometheusUnavailable");
    assert!(!log.iter().any(|s| s.path.ends_with("/scale")));
}
