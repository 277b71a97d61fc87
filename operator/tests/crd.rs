//! The generated CRD: `crds/` is fresh, the schema carries what `kubectl` relies on, and the CEL
//! rules accept the examples and reject bad objects with their messages (evaluated client-side by
//! kube's CEL validator over the very schema the API server gets).

mod common;

use kube::core::cel::Validator;
use kube::CustomResourceExt;
use serde_json::{json, Value};
use tandem_operator::crd::DisaggDeployment;

#[test]
fn checked_in_crd_is_fresh() {
    let path = common::repo_root().join("crds/disaggdeployments.tandem.dev.yaml");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == tandem_operator::crd_yaml(),
        "{} is stale: run `make crds` and commit it",
        path.display()
    );
}

#[test]
fn chart_ships_the_same_crd() {
    let chart =
        common::repo_root().join("charts/tandem-operator/crds/disaggdeployments.tandem.dev.yaml");
    let in_chart = std::fs::read_to_string(&chart).unwrap_or_default();
    assert!(
        in_chart == tandem_operator::crd_yaml(),
        "{} is stale: run `make crds`",
        chart.display()
    );
}

fn schema() -> Value {
    let crd = DisaggDeployment::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn crd_has_names_columns_status_and_keyed_conditions() {
    let crd = DisaggDeployment::crd();
    assert_eq!(crd.spec.group, "tandem.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["dd".to_string()][..])
    );
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version
        .subresources
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some());
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Ready", "Prefill", "Decode", "Age"]);
    let conditions = &schema()["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn every_schema_field_has_a_description() {
    fn walk(path: &str, s: &Value, missing: &mut Vec<String>) {
        if let Some(props) = s["properties"].as_object() {
            for (name, sub) in props {
                let p = format!("{path}.{name}");
                // Embedded Kubernetes types (resources, tolerations, conditions) bring their own docs.
                if sub["description"].as_str().is_none_or(str::is_empty)
                    && !["apiVersion", "kind", "metadata"].contains(&name.as_str())
                {
                    missing.push(p.clone());
                }
                if !p.contains(".resources")
                    && !p.contains(".tolerations")
                    && !p.contains(".conditions")
                {
                    walk(&p, sub, missing);
                }
            }
        }
        if let Some(items) = s.get("items") {
            walk(path, items, missing);
        }
    }
    let mut missing = Vec::new();
    walk("", &schema(), &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a doc comment: {missing:?}"
    );
}

fn base() -> Value {
    serde_json::to_value(
        &common::example_deployments()
            .into_iter()
            .find(|(s, _)| s == "disagg_planner")
            .unwrap()
            .1,
    )
    .unwrap()
}

fn errors(object: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema(), object, old) {
        Ok(()) => Vec::new(),
        Err(errs) => errs.into_iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn examples_pass_every_rule() {
    for (stem, dd) in common::example_deployments() {
        let v = serde_json::to_value(&dd).unwrap();
        assert_eq!(
            errors(&v, None),
            Vec::<String>::new(),
            "manifests/{stem}.yaml"
        );
        assert_eq!(
            errors(&v, Some(&v)),
            Vec::<String>::new(),
            "manifests/{stem}.yaml as an update"
        );
    }
}

/// Applies `edit` to a valid object and asserts exactly the rule with `message` rejects it.
fn assert_rejected(edit: impl FnOnce(&mut Value), message: &str) {
    let mut v = base();
    edit(&mut v);
    let errs = errors(&v, None);
    assert!(
        errs.iter().any(|e| e.contains(message)),
        "expected {message:?}, got {errs:?}"
    );
}

#[test]
fn hf_sources_may_pin_a_revision() {
    for source in [
        "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
        "hf://meta-llama/Llama-3.1-8B@0e9e39f249a16976918f6564b8830bc894c89659",
        "hf://org/repo@v1.0",
        "hf://org/repo@refs/pr/1",
    ] {
        let mut v = base();
        v["spec"]["model"]["source"] = json!(source);
        assert_eq!(errors(&v, None), Vec::<String>::new(), "{source}");
    }
}

#[test]
fn cel_rules_reject_bad_objects_with_their_message() {
    assert_rejected(
        |v| v["spec"]["autoscaling"]["decode"] = json!({"minReplicas": 5, "maxReplicas": 2}),
        "minReplicas must not exceed maxReplicas",
    );
    assert_rejected(
        |v| v["spec"]["autoscaling"]["slo"]["ttftP90Ms"] = json!(0),
        "slo.ttftP90Ms must be positive",
    );
    assert_rejected(
        |v| v["spec"]["autoscaling"]["slo"]["itlP90Ms"] = json!(-5),
        "slo.itlP90Ms must be positive",
    );
    for source in [
        "s3://bucket/model",
        "hf://no-repo",
        "hf://org/repo@",
        "hf://org/repo@rev with space",
        "hf://org/repo/extra",
        "pvc://Bad_Claim/x",
        "file://relative",
        "http://x/y",
    ] {
        assert_rejected(
            |v| v["spec"]["model"]["source"] = json!(source),
            "model.source must be hf://",
        );
    }
    assert_rejected(
        |v| v["spec"]["model"]["hfTokenSecretRef"] = json!({"name": "hf-token"}),
        "hfTokenSecretRef only applies to hf:// sources",
    );
    assert_rejected(
        |v| {
            v["spec"]["autoscaling"]
                .as_object_mut()
                .unwrap()
                .remove("slo")
                .map(drop)
                .unwrap_or(())
        },
        "autoscaling.enabled needs prometheusUrl and slo",
    );
    assert_rejected(
        |v| {
            v["spec"]
                .as_object_mut()
                .unwrap()
                .remove("prefill")
                .map(drop)
                .unwrap_or(())
        },
        "spec.autoscaling.prefill needs a spec.prefill tier",
    );
    assert_rejected(
        |v| v["spec"]["decode"]["gpusPerReplica"] = json!(-1),
        "gpusPerReplica must be between 0 and 16",
    );
    assert_rejected(
        |v| v["spec"]["decode"]["replicas"] = json!(-1),
        "replicas must not be negative",
    );
    assert_rejected(
        |v| v["spec"]["image"] = json!(""),
        "image must not be empty",
    );
    assert_rejected(
        |v| v["spec"]["model"]["name"] = json!("a,b"),
        "model.name must not contain ','",
    );
    assert_rejected(
        |v| v["spec"]["autoscaling"]["prometheusUrl"] = json!("prometheus:9090"),
        "prometheusUrl must be an http",
    );
}

#[test]
fn schema_enums_reject_unknown_modes() {
    let mut v = base();
    v["spec"]["disaggregation"]["kvTransfer"] = json!("rdma");
    assert!(!schema_allows(&v), "kvTransfer rdma must not deserialize");
    let kv = &schema()["properties"]["spec"]["properties"]["disaggregation"]["properties"]
        ["kvTransfer"]["enum"];
    assert_eq!(kv, &json!(["grpc", "cuda-ipc", "auto"]));
    let router = &schema()["properties"]["spec"]["properties"]["frontend"]["properties"]
        ["routerMode"]["enum"];
    assert_eq!(router, &json!(["kv", "round-robin", "random"]));
}

/// Whether the value deserializes into the typed spec (the enum check the API server's
/// structural schema performs).
fn schema_allows(v: &Value) -> bool {
    serde_json::from_value::<DisaggDeployment>(v.clone()).is_ok()
}

#[test]
fn model_identity_is_immutable() {
    let old = base();
    let mut new = old.clone();
    new["spec"]["model"]["source"] = json!("pvc://models/other-model");
    let errs = errors(&new, Some(&old));
    assert!(
        errs.iter().any(|e| e.contains("model.source is immutable")),
        "{errs:?}"
    );

    let mut renamed = old.clone();
    renamed["spec"]["model"]["name"] = json!("another-name");
    let errs = errors(&renamed, Some(&old));
    assert!(
        errs.iter().any(|e| e.contains("model.name is immutable")),
        "{errs:?}"
    );

    let mut scaled = old.clone();
    scaled["spec"]["autoscaling"]["decode"]["maxReplicas"] = json!(16);
    assert_eq!(
        errors(&scaled, Some(&old)),
        Vec::<String>::new(),
        "scaling bounds stay editable"
    );
}

#[test]
fn crd_reference_is_fresh() {
    let path = common::repo_root().join("docs/crd.md");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == tandem_operator::docs::crd_markdown(),
        "{} is stale: run `make crds`",
        path.display()
    );
}

/// The API server refuses a CRD whose CEL rules it cannot bound in cost; string rules are
/// bounded by the string's maxLength.
#[test]
fn strings_with_cel_rules_have_a_max_length() {
    fn walk(path: &str, s: &Value, unbounded: &mut Vec<String>) {
        if s["type"] == "string"
            && s.get("x-kubernetes-validations").is_some()
            && s.get("maxLength").is_none()
        {
            unbounded.push(path.to_string());
        }
        for (name, sub) in s["properties"].as_object().into_iter().flatten() {
            walk(&format!("{path}.{name}"), sub, unbounded);
        }
        if let Some(items) = s.get("items") {
            walk(&format!("{path}[]"), items, unbounded);
        }
    }
    let mut unbounded = Vec::new();
    walk("", &schema(), &mut unbounded);
    assert!(
        unbounded.is_empty(),
        "strings with CEL rules but no maxLength: {unbounded:?}"
    );
}
