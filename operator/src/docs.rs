//! `docs/crd.md`, generated from the CRD schema so the reference cannot drift from the code.

use std::fmt::Write;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::crd::DisaggDeployment;

const INTRO: &str = "# DisaggDeployment reference

`DisaggDeployment` (`tandem.dev/v1alpha1`, short name `dd`, namespaced) declares a model served by
a frontend, a prefill tier and a decode tier. Examples live in `manifests/`.

Generated from the Rust types by `make crds`: do not edit by hand.

## Topologies

| spec | pods |
| --- | --- |
| no `prefill`, no `frontend` | decode StatefulSet running `tandem serve`; the API Service selects it |
| no `prefill`, a `frontend` | frontend Deployment (`tandem frontend`) routing to `tandem decode` workers that prefill locally |
| a `prefill` tier | frontend → `tandem decode` → `tandem prefill` |

Children of a deployment named `NAME`: Service `NAME` (OpenAI API, port 8000), Deployment
`NAME-frontend`, StatefulSets + headless Services `NAME-prefill` / `NAME-decode` (HTTP 8000, gRPC
9000), ServiceAccount `NAME-tandem`, Role/RoleBinding `NAME-discovery` (EndpointSlice read for
routers), PodDisruptionBudgets per tier (maxUnavailable 1).

Model sources: `hf://org/repo[@revision]` is downloaded by an init container (`tandem model
fetch`; a commit, tag or branch after `@`, `main` without) into an emptyDir at
`/models/hf/org/repo`, with `HF_TOKEN` from `hfTokenSecretRef`; `pvc://claim/path`
mounts the claim read-only at `/models`; `file:///path` is a path inside the image (Pod Security
`restricted` forbids hostPath).

## Fields

Rules marked *CEL* are enforced by the API server at `kubectl apply`.
";

/// The markdown reference of every spec and status field.
pub fn crd_markdown() -> String {
    let crd = DisaggDeployment::crd();
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("derived schema"),
    )
    .expect("schema serializes");
    let mut out = String::from(INTRO);
    // Rules on the object or on `spec` as a whole relate several fields; no one row carries them.
    let across: Vec<&str> = [&schema, &schema["properties"]["spec"]]
        .into_iter()
        .flat_map(|s| {
            s["x-kubernetes-validations"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .filter_map(|rule| rule["message"].as_str())
        .collect();
    if !across.is_empty() {
        out.push_str("\nRules across fields (*CEL*):\n\n");
        for message in across {
            let _ = writeln!(out, "- {message}.");
        }
    }
    for root in ["spec", "status"] {
        let _ = writeln!(
            out,
            "\n### `{root}`\n\n| field | type | description |\n| --- | --- | --- |"
        );
        walk(&mut out, root, &schema["properties"][root]);
    }
    out
}

fn type_name(s: &Value) -> String {
    if let Some(values) = s["enum"].as_array() {
        let names: Vec<_> = values.iter().filter_map(Value::as_str).collect();
        return format!("enum: {}", names.join(", "));
    }
    match s["type"].as_str() {
        Some("array") => format!("[]{}", type_name(&s["items"])),
        Some(t) => t.to_string(),
        None if s.get("x-kubernetes-int-or-string").is_some() => "int-or-string".into(),
        None => "object".into(),
    }
}

fn walk(out: &mut String, path: &str, s: &Value) {
    let Some(props) = s["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = s["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for (name, sub) in props {
        let field = format!("{path}.{name}");
        let mut desc = sub["description"]
            .as_str()
            .unwrap_or_default()
            .replace('\n', " ")
            .replace('|', "\\|");
        if required.contains(&name.as_str()) {
            desc.push_str(" **Required.**");
        }
        if let Some(default) = sub.get("default") {
            let _ = write!(desc, " Default: `{default}`.");
        }
        for rule in sub["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let _ = write!(
                desc,
                " *CEL:* {}.",
                rule["message"].as_str().unwrap_or_default()
            );
        }
        let _ = writeln!(out, "| `{field}` | {} | {desc} |", type_name(sub));
        // Embedded Kubernetes types are documented upstream.
        let upstream =
            ["resources", "tolerations", "conditions", "lastScaleTime"].contains(&name.as_str());
        if !upstream {
            walk(out, &field, sub);
            if sub["type"] == "array" {
                walk(out, &format!("{field}[]"), &sub["items"]);
            }
        }
    }
}
