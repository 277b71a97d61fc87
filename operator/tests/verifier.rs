//! ApiServerVerifier: the controller talks to a `tower-test` mock API server, which records every
//! request (method, path, query, body) and answers like the API server would. Tests then assert
//! the exact requests apply and status made: server-side apply under the one field manager, the
//! right paths, bodies with owner references and without unmanaged replicas.

mod common;

use std::sync::Arc;

use http::{Method, StatusCode};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::Client;
use serde_json::{json, Value};
use tandem_operator::build::build;
use tandem_operator::controller::{self, error_policy, reconcile, Context};
use tandem_operator::crd::DisaggDeployment;
use tandem_operator::metrics::Metrics;
use tandem_operator::planner::runner::StatefulSetTarget;
use tandem_operator::planner::{ScaleTarget, Tier};
use tandem_operator::validate::validate;
use tandem_operator::FIELD_MANAGER;

use common::mock_api::{api_calls, mock, Seen};

fn not_found(seen: &Seen) -> (StatusCode, Value) {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{} not found", seen.path), "reason": "NotFound", "code": 404});
    (StatusCode::NOT_FOUND, body)
}

/// The API server's answer to a server-side apply: the applied object, with a fully ready
/// status for workloads, so status computation has something real to read.
fn applied_echo(seen: &Seen) -> (StatusCode, Value) {
    let mut obj = seen.body.clone();
    obj["metadata"]["generation"] = json!(1);
    let replicas = obj
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(3);
    match obj["kind"].as_str() {
        Some("StatefulSet") => {
            obj["status"] = json!({"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas,
                "updatedReplicas": replicas, "currentRevision": "r1", "updateRevision": "r1"})
        }
        Some("Deployment") => {
            obj["status"] = json!({"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas,
                "updatedReplicas": replicas})
        }
        _ => {}
    }
    (StatusCode::OK, obj)
}

/// Answers like a namespace holding only the example `DisaggDeployment`s: applies succeed, reads
/// of children find nothing, events are accepted, and a status patch returns the whole object.
fn empty_namespace(seen: &Seen) -> (StatusCode, Value) {
    match seen.method {
        Method::PATCH if seen.path.ends_with("/status") => {
            let name = seen.path.rsplit('/').nth(1).unwrap();
            let (_, dd) = common::example_deployments()
                .into_iter()
                .find(|(_, dd)| dd.metadata.name.as_deref() == Some(name))
                .expect("status of an example");
            let mut obj = serde_json::to_value(dd).unwrap();
            obj["status"] = seen.body["status"].clone();
            (StatusCode::OK, obj)
        }
        Method::PATCH => applied_echo(seen),
        Method::POST => (StatusCode::CREATED, seen.body.clone()),
        _ => not_found(seen),
    }
}

fn example(stem: &str) -> DisaggDeployment {
    common::example_deployments()
        .into_iter()
        .find(|(s, _)| s == stem)
        .expect("example exists")
        .1
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

#[tokio::test]
async fn apply_uses_server_side_apply_with_one_field_manager() {
    let dd = example("disagg_router");
    let valid = validate(&dd).unwrap();
    let children = build(&valid);
    let (client, log) = mock(Arc::new(empty_namespace));
    let applied = controller::apply(
        &context(client),
        "default",
        "llama-disagg-router",
        &dd,
        &children,
    )
    .await
    .unwrap();
    assert!(applied.frontend.is_some() && applied.prefill.is_some());

    let log = log.lock().unwrap();
    let patches: Vec<&Seen> = log.iter().filter(|s| s.method == Method::PATCH).collect();
    let paths: Vec<&str> = patches.iter().map(|s| s.path.as_str()).collect();
    let ns = "/namespaces/default";
    // Two concurrent rounds: the workloads (whose pods need the ServiceAccount to be admitted)
    // come after every other child.
    let workloads = |p: &&str| p.starts_with("/apis/apps/");
    let first_workload = paths.iter().position(workloads).unwrap();
    assert!(
        paths[first_workload..].iter().all(workloads),
        "workloads are applied last: {paths:#?}"
    );
    let at = |suffix: &str| paths.iter().position(|p| p.ends_with(suffix)).unwrap();
    assert!(
        at("/roles/llama-disagg-router-discovery")
            < at("/rolebindings/llama-disagg-router-discovery"),
        "the API server refuses a RoleBinding whose Role does not exist yet: {paths:#?}"
    );
    let mut sorted = paths.clone();
    sorted.sort_unstable();
    let mut expected = [
        format!("/api/v1{ns}/serviceaccounts/llama-disagg-router-tandem"),
        format!("/apis/rbac.authorization.k8s.io/v1{ns}/roles/llama-disagg-router-discovery"),
        format!(
            "/apis/rbac.authorization.k8s.io/v1{ns}/rolebindings/llama-disagg-router-discovery"
        ),
        format!("/api/v1{ns}/services/llama-disagg-router"),
        format!("/apis/apps/v1{ns}/deployments/llama-disagg-router-frontend"),
        format!("/api/v1{ns}/services/llama-disagg-router-prefill"),
        format!("/apis/apps/v1{ns}/statefulsets/llama-disagg-router-prefill"),
        format!("/api/v1{ns}/services/llama-disagg-router-decode"),
        format!("/apis/apps/v1{ns}/statefulsets/llama-disagg-router-decode"),
        format!("/apis/policy/v1{ns}/poddisruptionbudgets/llama-disagg-router-frontend"),
        format!("/apis/policy/v1{ns}/poddisruptionbudgets/llama-disagg-router-prefill"),
        format!("/apis/policy/v1{ns}/poddisruptionbudgets/llama-disagg-router-decode"),
    ];
    expected.sort_unstable();
    assert_eq!(
        sorted,
        expected.iter().map(String::as_str).collect::<Vec<_>>(),
        "every child applied once"
    );
    for p in &patches {
        assert_eq!(p.field_manager(), Some(FIELD_MANAGER), "{}", p.path);
        assert!(
            p.query.contains("force=true"),
            "{}: apply must take ownership from other managers",
            p.path
        );
        let owner = &p.body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "DisaggDeployment", "{}", p.path);
        assert_eq!(owner["controller"], true, "{}", p.path);
        assert_eq!(owner["uid"], dd.metadata.uid.clone().unwrap(), "{}", p.path);
    }
    let decode = patches
        .iter()
        .find(|p| p.path.ends_with("statefulsets/llama-disagg-router-decode"))
        .unwrap();
    assert_eq!(decode.body["apiVersion"], "apps/v1");
    assert_eq!(decode.body["kind"], "StatefulSet");
    assert_eq!(decode.body["spec"]["replicas"], 2);
    assert!(
        log.iter().all(|s| s.method != Method::DELETE),
        "nothing to prune in a full deployment"
    );
}

/// Fills `ctx`'s child cache with what the API server answered to `log`'s applies, as the
/// controller's watches would.
fn cache_applied(ctx: &Context, log: &[Seen]) {
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    use k8s_openapi::api::core::v1::{Service, ServiceAccount};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;
    fn fill<K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned>(
        writer: &mut Writer<K>,
        kind: &str,
        log: &[Seen],
    ) {
        writer.apply_watcher_event(&Event::Init);
        for seen in log.iter().filter(|s| s.method == Method::PATCH) {
            let (_, body) = applied_echo(seen);
            if body["kind"] == kind {
                writer
                    .apply_watcher_event(&Event::InitApply(serde_json::from_value(body).unwrap()));
            }
        }
        writer.apply_watcher_event(&Event::InitDone);
    }
    let mut w = ctx.take_writers().expect("writers not taken yet");
    fill::<ServiceAccount>(&mut w.service_accounts, "ServiceAccount", log);
    fill::<Role>(&mut w.roles, "Role", log);
    fill::<RoleBinding>(&mut w.role_bindings, "RoleBinding", log);
    fill::<Service>(&mut w.services, "Service", log);
    fill::<Deployment>(&mut w.deployments, "Deployment", log);
    fill::<StatefulSet>(&mut w.statefulsets, "StatefulSet", log);
    fill::<PodDisruptionBudget>(&mut w.disruption_budgets, "PodDisruptionBudget", log);
}

/// A converged deployment costs the API server nothing: with the watch cache showing every
/// child as last applied, a reconcile applies nothing and, its status unchanged, writes nothing;
/// a child changed behind the operator's back is applied again, alone.
#[tokio::test]
async fn converged_reconcile_makes_no_api_call_and_drift_is_applied_over() {
    let dd = example("disagg_router");
    let (client, first) = mock(Arc::new(empty_namespace));
    let first_ctx = context(client);
    reconcile(Arc::new(DeserializeGuard(Ok(dd.clone()))), first_ctx)
        .await
        .unwrap();
    let first = first.lock().unwrap().clone();
    let written = first
        .iter()
        .find(|s| s.path.ends_with("/status"))
        .expect("status written on the first reconcile");
    let mut converged = dd.clone();
    converged.status = serde_json::from_value(written.body["status"].clone()).unwrap();

    let (client, log) = mock(Arc::new(empty_namespace));
    let ctx = context(client);
    cache_applied(&ctx, &first);
    reconcile(
        Arc::new(DeserializeGuard(Ok(converged.clone()))),
        ctx.clone(),
    )
    .await
    .unwrap();
    let calls = api_calls(&log);
    assert!(calls.is_empty(), "a converged reconcile called {calls:#?}");

    // Someone scales the decode StatefulSet by hand: the watch shows it, the reconcile puts
    // the declared replicas back and leaves the rest alone.
    let mut drifted: Vec<Seen> = first.clone();
    for seen in drifted.iter_mut() {
        if seen
            .path
            .ends_with("statefulsets/llama-disagg-router-decode")
        {
            seen.body["spec"]["replicas"] = json!(5);
        }
    }
    let (client, log) = mock(Arc::new(empty_namespace));
    let ctx = context(client);
    cache_applied(&ctx, &drifted);
    controller::apply(
        &ctx,
        "default",
        "llama-disagg-router",
        &converged,
        &build(&validate(&converged).unwrap()),
    )
    .await
    .unwrap();
    let calls = api_calls(&log);
    assert_eq!(
        calls,
        ["PATCH /apis/apps/v1/namespaces/default/statefulsets/llama-disagg-router-decode"]
    );
}

#[tokio::test]
async fn unset_replicas_without_autoscaling_are_left_out_of_the_patch() {
    let mut dd = example("disagg");
    dd.spec.decode.replicas = None;
    let children = build(&validate(&dd).unwrap());
    let (client, log) = mock(Arc::new(empty_namespace));
    controller::apply(&context(client), "default", "llama-disagg", &dd, &children)
        .await
        .unwrap();
    let log = log.lock().unwrap();
    let decode = log
        .iter()
        .find(|s| s.path.ends_with("statefulsets/llama-disagg-decode"))
        .unwrap();
    assert!(
        decode.body["spec"].get("replicas").is_none(),
        "an HPA may own decode replicas: {}",
        decode.body["spec"]
    );
    let prefill = log
        .iter()
        .find(|s| s.path.ends_with("statefulsets/llama-disagg-prefill"))
        .unwrap();
    assert_eq!(prefill.body["spec"]["replicas"], 1);
}

#[tokio::test]
async fn removed_tier_is_pruned_only_when_this_deployment_controls_it() {
    let dd = example("agg_router"); // no prefill tier
    let uid = dd.metadata.uid.clone().unwrap();
    let children = build(&validate(&dd).unwrap());
    let owned = move |seen: &Seen| -> (StatusCode, Value) {
        let owner = |uid: &str| {
            json!([{"apiVersion": "tandem.dev/v1alpha1", "kind": "DisaggDeployment",
            "name": "llama-agg-router", "uid": uid, "controller": true}])
        };
        match (&seen.method, seen.path.as_str()) {
            (&Method::GET, p) if p.ends_with("statefulsets/llama-agg-router-prefill") => (
                StatusCode::OK,
                json!({
                "apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": "llama-agg-router-prefill", "namespace": "default", "ownerReferences": owner(&uid)}}),
            ),
            // A same-named Service someone else created must survive.
            (&Method::GET, p) if p.ends_with("services/llama-agg-router-prefill") => (
                StatusCode::OK,
                json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "llama-agg-router-prefill", "namespace": "default", "ownerReferences": owner("someone-else")}}),
            ),
            (&Method::DELETE, _) => (
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ),
            _ => empty_namespace(seen),
        }
    };
    let (client, log) = mock(Arc::new(owned));
    controller::apply(
        &context(client),
        "default",
        "llama-agg-router",
        &dd,
        &children,
    )
    .await
    .unwrap();
    let deletes: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == Method::DELETE)
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        deletes,
        ["/apis/apps/v1/namespaces/default/statefulsets/llama-agg-router-prefill"]
    );
}

#[tokio::test]
async fn reconcile_writes_status_by_apply_and_records_a_created_event() {
    let dd = example("agg_router");
    let (client, log) = mock(Arc::new(empty_namespace));
    let ctx = context(client);
    let action = reconcile(Arc::new(DeserializeGuard(Ok(dd.clone()))), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(300)));

    let log = log.lock().unwrap();
    let status = log
        .iter()
        .find(|s| {
            s.path
                .ends_with("/disaggdeployments/llama-agg-router/status")
        })
        .expect("status patched");
    assert_eq!(status.method, Method::PATCH);
    assert_eq!(
        status.path,
        "/apis/tandem.dev/v1alpha1/namespaces/default/disaggdeployments/llama-agg-router/status"
    );
    assert_eq!(status.field_manager(), Some(FIELD_MANAGER));
    assert_eq!(status.body["apiVersion"], "tandem.dev/v1alpha1");
    assert_eq!(status.body["kind"], "DisaggDeployment");
    let s = &status.body["status"];
    assert_eq!(s["observedGeneration"], 1);
    assert_eq!(s["endpoint"], "http://llama-agg-router.default.svc:8000/v1");
    assert_eq!(s["decode"]["readyReplicas"], 2);
    assert_eq!(s["decode"]["desiredReplicas"], 2);
    assert_eq!(s["decode"]["summary"], "2/2");
    assert_eq!(s["frontend"]["desiredReplicas"], 1);
    assert!(s.get("prefill").is_none(), "no prefill tier in agg_router");
    let cond = |t: &str| {
        s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .cloned()
            .unwrap()
    };
    assert_eq!(cond("Ready")["status"], "True");
    assert_eq!(cond("Ready")["reason"], "AllTiersReady");
    assert_eq!(cond("Progressing")["status"], "False");
    assert_eq!(cond("Degraded")["status"], "False");

    let event = log
        .iter()
        .find(|s| s.path.contains("/events"))
        .expect("an Event was recorded");
    assert_eq!(event.method, Method::POST);
    assert_eq!(
        event.path,
        "/apis/events.k8s.io/v1/namespaces/default/events"
    );
    assert_eq!(event.body["reason"], "Created");
    assert_eq!(event.body["regarding"]["name"], "llama-agg-router");
    assert_eq!(ctx.metrics.reconciles.with_label_values(&["ok"]).get(), 1);
}

/// A `DisaggDeployment` deleted while its reconcile runs: the status patch finds nothing (404)
/// and the reconcile still succeeds, so deleting a deployment counts no reconcile error.
#[tokio::test]
async fn status_of_a_deployment_deleted_meanwhile_is_not_an_error() {
    let dd = example("agg_router");
    let (client, log) = mock(Arc::new(|seen: &Seen| {
        if seen.method == Method::PATCH && seen.path.ends_with("/status") {
            not_found(seen)
        } else {
            empty_namespace(seen)
        }
    }));
    let ctx = context(client);
    let result = reconcile(Arc::new(DeserializeGuard(Ok(dd))), ctx.clone()).await;
    assert!(result.is_ok(), "{:?}", result.err());
    assert!(log.lock().unwrap().iter().any(|s| s
        .path
        .ends_with("/disaggdeployments/llama-agg-router/status")));
    assert_eq!(ctx.metrics.reconciles.with_label_values(&["ok"]).get(), 1);
}

#[tokio::test]
async fn invalid_spec_reports_degraded_and_waits_for_a_change() {
    let mut dd = example("agg");
    dd.spec.model.source = "s3://bucket/model".into(); // what a pre-CEL stored object could hold
    let (client, log) = mock(Arc::new(empty_namespace));
    let ctx = context(client);
    let guard = Arc::new(DeserializeGuard(Ok(dd)));
    let err = reconcile(guard.clone(), ctx.clone()).await.unwrap_err();
    assert_eq!(err.category(), "invalid_spec");
    assert_eq!(
        error_policy(guard, &err, ctx.clone()),
        Action::await_change()
    );

    let log = log.lock().unwrap();
    assert!(
        log.iter().all(|s| !s.path.contains("/apis/apps/")),
        "nothing is applied for an invalid spec"
    );
    let status = log
        .iter()
        .find(|s| s.path.ends_with("/status"))
        .expect("status patched");
    let degraded = status.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .cloned()
        .unwrap();
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(degraded["message"]
        .as_str()
        .unwrap()
        .contains("s3://bucket/model"));
    let event = log
        .iter()
        .find(|s| s.path.contains("/events"))
        .expect("a Warning Event");
    assert_eq!(event.body["type"], "Warning");
    assert_eq!(event.body["reason"], "InvalidSpec");
    assert_eq!(
        ctx.metrics
            .errors
            .with_label_values(&["invalid_spec"])
            .get(),
        1
    );
}

#[tokio::test]
async fn api_errors_back_off_exponentially() {
    let dd = example("agg");
    let forbidden = |seen: &Seen| -> (StatusCode, Value) {
        if seen.method == Method::PATCH && !seen.path.ends_with("/status") {
            return (
                StatusCode::FORBIDDEN,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "forbidden", "reason": "Forbidden", "code": 403}),
            );
        }
        empty_namespace(seen)
    };
    let (client, _log) = mock(Arc::new(forbidden));
    let ctx = context(client);
    let guard = Arc::new(DeserializeGuard(Ok(dd)));
    let mut delays = Vec::new();
    for _ in 0..3 {
        let err = reconcile(guard.clone(), ctx.clone()).await.unwrap_err();
        assert_eq!(err.category(), "api");
        delays.push(error_policy(guard.clone(), &err, ctx.clone()));
    }
    let secs = |n| Action::requeue(std::time::Duration::from_secs(n));
    assert_eq!(delays, [secs(5), secs(10), secs(20)]);
}

/// The chart's operator rules (the `rules:` block of the first document of
/// `templates/rbac.yaml`) as (apiGroup, resource, verb) triples.
fn chart_rbac() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(
        common::repo_root().join("charts/tandem-operator/templates/rbac.yaml"),
    )
    .unwrap();
    let first = text.split("\n---").next().unwrap();
    let plain = &first[first.find("\nrules:").expect("a rules: block")..];
    assert!(
        !plain.contains("{{"),
        "the rules block must stay free of template logic"
    );
    let doc: Value = serde_yaml::from_str(plain).expect("the rules block is plain YAML");
    let mut out = Vec::new();
    for rule in doc["rules"].as_array().expect("rules") {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    out.push((
                        g.as_str().unwrap().into(),
                        r.as_str().unwrap().into(),
                        v.as_str().unwrap().into(),
                    ));
                }
            }
        }
    }
    out
}

/// (apiGroup, resource[/subresource], verb) of one request.
fn rbac_of(seen: &Seen) -> (String, String, String) {
    let parts: Vec<&str> = seen.path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts[0] {
        "api" => (String::new(), &parts[2..]),
        _ => (parts[1].to_string(), &parts[3..]),
    };
    let rest = if rest.first() == Some(&"namespaces") {
        &rest[2..]
    } else {
        rest
    };
    let resource = match rest {
        [r] | [r, _] => r.to_string(),
        [r, _, sub] => format!("{r}/{sub}"),
        other => panic!("unexpected path {other:?}"),
    };
    let verb = match (&seen.method, rest.len()) {
        (&Method::GET, 1) if seen.query.contains("watch=true") => "watch",
        (&Method::GET, 1) => "list",
        (&Method::GET, _) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        (m, _) => panic!("unexpected method {m}"),
    };
    (group, resource, verb.to_string())
}

#[tokio::test]
async fn chart_rbac_allows_every_request_the_controller_makes() {
    let mut seen = Vec::new();
    // A full disaggregated reconcile (applies, status, Event) …
    let (client, log) = mock(Arc::new(empty_namespace));
    reconcile(
        Arc::new(DeserializeGuard(Ok(example("disagg_router")))),
        context(client),
    )
    .await
    .unwrap();
    seen.extend(log.lock().unwrap().clone());
    // … and a serve-topology one, which reads and prunes everything a frontend/prefill needs.
    let owned_everything = |s: &Seen| -> (StatusCode, Value) {
        if s.method == Method::GET {
            let dd = example("agg");
            let parts: Vec<&str> = s.path.trim_start_matches('/').split('/').collect();
            let api_version = if parts[0] == "api" {
                "v1".to_string()
            } else {
                format!("{}/{}", parts[1], parts[2])
            };
            let kind = match parts[parts.len() - 2] {
                "roles" => "Role",
                "rolebindings" => "RoleBinding",
                "deployments" => "Deployment",
                "statefulsets" => "StatefulSet",
                "services" => "Service",
                "poddisruptionbudgets" => "PodDisruptionBudget",
                other => panic!("unexpected read of {other}"),
            };
            return (
                StatusCode::OK,
                json!({"apiVersion": api_version, "kind": kind, "metadata": {
                "name": s.path.rsplit('/').next().unwrap(), "namespace": "default",
                "ownerReferences": [{"apiVersion": "tandem.dev/v1alpha1", "kind": "DisaggDeployment",
                    "name": "smollm2-agg", "uid": dd.metadata.uid.unwrap(), "controller": true}]}}),
            );
        }
        if s.method == Method::DELETE {
            return (
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            );
        }
        empty_namespace(s)
    };
    let (client, log) = mock(Arc::new(owned_everything));
    reconcile(
        Arc::new(DeserializeGuard(Ok(example("agg")))),
        context(client),
    )
    .await
    .unwrap();
    seen.extend(log.lock().unwrap().clone());
    // … and the planner's reads and writes of the tiers' StatefulSets (through the scale
    // subresource: a chart without `statefulsets/scale` patch made every scale a 403).
    let (client, log) = mock(Arc::new(empty_namespace));
    let mut target = StatefulSetTarget::new(client, "default", "smollm2-disagg");
    target.replicas(Tier::Prefill).await.unwrap();
    target.set_desired(Tier::Prefill, 2).await.unwrap();
    seen.extend(log.lock().unwrap().clone());
    assert!(
        seen.iter().any(|s| s.path.ends_with("/scale")),
        "the planner's scale write was exercised"
    );

    let allowed = chart_rbac();
    let needed: std::collections::BTreeSet<_> = seen.iter().map(rbac_of).collect();
    assert!(
        needed.iter().any(|(_, _, v)| v == "delete"),
        "the prune path was exercised: {needed:?}"
    );
    let missing: Vec<_> = needed.iter().filter(|n| !allowed.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "charts/tandem-operator RBAC lacks {missing:?}"
    );
}

#[tokio::test]
async fn malformed_object_is_reported_by_event_and_waits_for_a_change() {
    use kube::core::error_boundary::InvalidObject;
    let (client, log) = mock(Arc::new(empty_namespace));
    let ctx = context(client);
    let metadata = kube::api::ObjectMeta {
        name: Some("broken".into()),
        namespace: Some("default".into()),
        uid: Some("uid-broken".into()),
        ..Default::default()
    };
    let guard = Arc::new(DeserializeGuard::<DisaggDeployment>(Err(InvalidObject {
        error: "spec.decode: missing field `decode`".into(),
        metadata,
    })));
    let err = reconcile(guard.clone(), ctx.clone()).await.unwrap_err();
    assert_eq!(err.category(), "malformed_object");
    assert_eq!(error_policy(guard, &err, ctx), Action::await_change());
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 1, "only an Event, nothing applied: {log:?}");
    assert_eq!(log[0].body["reason"], "MalformedObject");
    assert_eq!(log[0].body["regarding"]["name"], "broken");
    assert!(log[0].body["note"]
        .as_str()
        .unwrap()
        .contains("missing field `decode`"));
}
