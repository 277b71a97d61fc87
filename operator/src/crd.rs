//! The `DisaggDeployment` custom resource (`tandem.dev/v1alpha1`).
//!
//! Every doc comment here becomes the field's description in the generated CRD, which is what
//! `kubectl explain` shows, so they are written for the person writing the YAML. Cross-field and
//! immutability rules are CEL `x-kubernetes-validations`, so `kubectl apply` rejects a bad object
//! with the message written next to the rule.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Tandem resource.
pub const GROUP: &str = "tandem.dev";

/// Port of the OpenAI-compatible HTTP API (and `/health`, `/metrics`) on every pod.
pub const HTTP_PORT: i32 = 8000;
/// Port of the worker gRPC API (frontend → decode → prefill, KV transfer).
pub const GRPC_PORT: i32 = 9000;

/// A model served by a frontend, a prefill tier and a decode tier, each scaled on its own.
///
/// Without a prefill tier the deployment is aggregated: decode pods run `tandem serve` (no
/// frontend) or, when a frontend is set, `tandem decode` behind a routing frontend.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "DisaggDeployment",
    namespaced,
    shortname = "dd",
    status = "DisaggDeploymentStatus",
    derive = "PartialEq",
    // `conditions::types::READY`, spelled out as the attribute needs a literal (a test in
    // conditions.rs holds the two together).
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Prefill",
        type_ = "string",
        description = "ready/desired prefill replicas",
        json_path = ".status.prefill.summary"
    ),
    printcolumn(
        name = "Decode",
        type_ = "string",
        description = "ready/desired decode replicas",
        json_path = ".status.decode.summary"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(self.spec.autoscaling) || !self.spec.autoscaling.enabled || !has(self.spec.autoscaling.prefill) || has(self.spec.prefill)")
        .message("spec.autoscaling.prefill needs a spec.prefill tier to scale")
)]
#[serde(rename_all = "camelCase")]
pub struct DisaggDeploymentSpec {
    /// The model every tier serves.
    pub model: ModelSpec,
    /// Container image holding the `tandem` binary (e.g. `ghcr.io/tandem/worker:0.1.0`).
    // maxLength bounds the API server's CEL cost estimate for the rules on this string.
    #[x_kube(validation = Rule::new("self.size() > 0").message("image must not be empty"))]
    #[schemars(length(max = 512))]
    pub image: String,
    /// Image pull policy of every Tandem container: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// The OpenAI-facing frontend (tokenizer, chat template, router). Absent with no prefill
    /// tier: decode pods run `tandem serve` and take the traffic themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<FrontendSpec>,
    /// The prefill tier. Absent, or `replicas: 0` with autoscaling off, means aggregated
    /// serving: decode workers prefill their own prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<WorkerTierSpec>,
    /// The decode tier: owns sequences and generates tokens.
    pub decode: WorkerTierSpec,
    /// How decode workers hand prompts to prefill workers.
    #[serde(default)]
    pub disaggregation: DisaggregationSpec,
    /// SLO-driven autoscaling of the prefill and decode tiers by the operator's planner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// Where the model comes from and how it is named in the API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.hfTokenSecretRef) || self.source.startsWith('hf://')")
        .message("hfTokenSecretRef only applies to hf:// sources")
)]
pub struct ModelSpec {
    /// Model name clients pass as `model` in OpenAI requests. Immutable.
    #[x_kube(
        validation = Rule::new("self.size() > 0").message("model.name must not be empty"),
        validation = Rule::new("!self.contains(',')").message("model.name must not contain ',' (the worker reads a comma-separated list of names)"),
        validation = Rule::new("self == oldSelf").message("model.name is immutable: create a new DisaggDeployment to serve another model")
    )]
    #[schemars(length(max = 253))]
    pub name: String,
    /// `hf://<org>/<repo>[@<revision>]` (downloaded by an init container; the revision is a
    /// commit, tag or branch, the Hub's `main` when absent: pin a commit so that every pod
    /// fetches the same weights), `pvc://<claim>/<path>` (mounted read-only) or `file:///<path>`
    /// (a path inside the image). Immutable: prefill and decode pods of one deployment must hold
    /// the same weights for their KV caches to be compatible.
    #[x_kube(
        validation = Rule::new(r"self.matches('^(hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(@[A-Za-z0-9._/-]+)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^/]+)*/?|file:///.+)$')")
            .message("model.source must be hf://<org>/<repo>[@<revision>], pvc://<claim>/<path> or file:///<path>"),
        validation = Rule::new("self == oldSelf").message("model.source is immutable: create a new DisaggDeployment to serve another model")
    )]
    #[schemars(length(max = 1024))]
    pub source: String,
    /// Secret holding a Hugging Face token for gated `hf://` repositories (env `HF_TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_token_secret_ref: Option<SecretKeyRef>,
    /// Longest sequence (prompt + generated tokens) a worker admits; defaults to the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("maxModelLen must be positive"))]
    pub max_model_len: Option<i32>,
}

/// A key of a Secret in the deployment's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key inside the Secret; `token` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

// The generated schema describes `spec.imagePullPolicy` with this enum's doc, not the field's.
/// Image pull policy of every Tandem container, as in a Pod spec.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the node lacks the image.
    IfNotPresent,
    /// Never pull.
    Never,
}

/// How the frontend picks a decode worker for a request.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    /// Prefix-cache aware: the worker already holding most of the prompt's KV blocks, weighed
    /// against its load.
    #[default]
    Kv,
    /// Workers in turn.
    RoundRobin,
    /// A uniformly random worker.
    Random,
}

/// The frontend Deployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FrontendSpec {
    /// Frontend pods; 1 when omitted. The frontend is stateless, so any number is safe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("frontend.replicas must be at least 1"))]
    pub replicas: Option<i32>,
    /// Routing policy: kv, round-robin or random.
    #[serde(default)]
    pub router_mode: RouterMode,
    /// CPU and memory requests and limits of the frontend container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Scheduling overrides for frontend pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodOverrides>,
}

/// A prefill or decode tier (a StatefulSet behind a headless Service).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTierSpec {
    /// Worker pods. Omitted with autoscaling off: the operator leaves the StatefulSet's replicas
    /// alone so an HPA or KEDA can own them. Ignored while the planner scales this tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    pub replicas: Option<i32>,
    /// GPUs (`nvidia.com/gpu`) per worker pod; 0 runs the CPU backend. Above 1 the pod's worker
    /// shards the model across its GPUs (`--tensor-parallel-size`).
    #[serde(default = "default_gpus_per_replica")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 16").message("gpusPerReplica must be between 0 and 16"))]
    pub gpus_per_replica: i32,
    /// CPU and memory requests and limits; the GPU count comes from gpusPerReplica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Seconds a stopping worker gets to finish its in-flight sequences before it is killed
    /// (the pod's termination grace period; the worker itself stops 5 s earlier).
    #[serde(default = "default_drain_seconds")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("drainSeconds must be between 0 and 3600"))]
    pub drain_seconds: i64,
    /// Scheduling overrides for this tier's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodOverrides>,
}

fn default_gpus_per_replica() -> i32 {
    1
}

fn default_drain_seconds() -> i64 {
    120
}

/// The parts of a pod template a user may set; the operator owns everything else.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Extra pod labels (the operator's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations (the operator's scrape annotations win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Node labels the pods must match, e.g. a GPU product.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate, e.g. `nvidia.com/gpu:NoSchedule`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// How KV caches move from prefill to decode workers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum KvTransfer {
    /// gRPC streams; works across nodes.
    #[default]
    Grpc,
    /// CUDA IPC device-to-device copies; prefill and decode must share a node.
    CudaIpc,
    /// CUDA IPC when both workers share a node and GPU backend, gRPC otherwise.
    Auto,
}

/// Conditional disaggregation settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DisaggregationSpec {
    /// Uncached prompt tokens from which a decode worker sends the prompt to a prefill worker
    /// instead of prefilling it locally; the worker's default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("remotePrefillMinTokens must not be negative"))]
    pub remote_prefill_min_tokens: Option<i32>,
    /// KV transport: grpc, cuda-ipc or auto.
    #[serde(default)]
    pub kv_transfer: KvTransfer,
}

/// The planner: scales prefill and decode from latency SLOs read out of Prometheus.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.enabled || (has(self.prometheusUrl) && has(self.slo))")
        .message("autoscaling.enabled needs prometheusUrl and slo")
)]
pub struct AutoscalingSpec {
    /// Turns the planner on for this deployment.
    #[serde(default)]
    pub enabled: bool,
    /// Prometheus base URL the planner queries, e.g. `http://prometheus.monitoring:9090`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("prometheusUrl must be an http:// or https:// URL"))]
    #[schemars(length(max = 2048))]
    pub prometheus_url: Option<String>,
    /// Seconds between planner decisions.
    #[serde(default = "default_interval_seconds")]
    #[x_kube(validation = Rule::new("self >= 5").message("intervalSeconds must be at least 5"))]
    pub interval_seconds: i32,
    /// Latency targets the planner scales to meet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSpec>,
    /// Replica bounds of the prefill tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<ReplicaBounds>,
    /// Replica bounds of the decode tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<ReplicaBounds>,
    /// Seconds a higher recommendation must hold before scaling up.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("scaleUpStabilizationSeconds must not be negative"))]
    pub scale_up_stabilization_seconds: i32,
    /// Seconds a lower recommendation must hold before scaling down.
    #[serde(default = "default_scale_down_stabilization_seconds")]
    #[x_kube(validation = Rule::new("self >= 0").message("scaleDownStabilizationSeconds must not be negative"))]
    pub scale_down_stabilization_seconds: i32,
}

fn default_interval_seconds() -> i32 {
    30
}

fn default_scale_down_stabilization_seconds() -> i32 {
    300
}

/// Latency service-level objectives (90th percentiles).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SloSpec {
    /// Target p90 time to first token, in milliseconds.
    #[x_kube(validation = Rule::new("self > 0").message("slo.ttftP90Ms must be positive"))]
    pub ttft_p90_ms: i32,
    /// Target p90 inter-token latency, in milliseconds.
    #[x_kube(validation = Rule::new("self > 0").message("slo.itlP90Ms must be positive"))]
    pub itl_p90_ms: i32,
}

/// Inclusive replica range the planner may choose from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct ReplicaBounds {
    /// Fewest replicas.
    #[x_kube(validation = Rule::new("self >= 0").message("minReplicas must not be negative"))]
    pub min_replicas: i32,
    /// Most replicas.
    #[x_kube(validation = Rule::new("self >= 1").message("maxReplicas must be at least 1"))]
    pub max_replicas: i32,
}

/// What the operator observed and decided.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DisaggDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded and (with autoscaling) ScalingActive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The frontend Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<TierStatus>,
    /// The prefill StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<TierStatus>,
    /// The decode StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<TierStatus>,
    /// In-cluster base URL of the OpenAI API, e.g. `http://llama.default.svc:8000/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// Replica counts of one tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TierStatus {
    /// Pods that exist.
    pub replicas: i32,
    /// Pods passing their readiness probe.
    pub ready_replicas: i32,
    /// Pods wanted (spec, planner decision, or the external autoscaler's choice).
    pub desired_replicas: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// When the planner last changed this tier's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Why the planner last changed this tier's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
}

/// The tiers of a deployment, as named in labels, object names and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// OpenAI API + router.
    Frontend,
    /// Prompt processing.
    Prefill,
    /// Token generation.
    Decode,
}

impl Tier {
    /// Lower-case name used in labels (`tandem.dev/tier`) and object names.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Frontend => "frontend",
            Tier::Prefill => "prefill",
            Tier::Decode => "decode",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DisaggDeploymentSpec {
    /// True when a prefill tier runs (possibly scaled to zero by an external autoscaler).
    pub fn is_disaggregated(&self) -> bool {
        let planner_scales_prefill = self
            .autoscaling
            .as_ref()
            .is_some_and(|a| a.enabled && a.prefill.is_some());
        match &self.prefill {
            None => false,
            Some(p) => planner_scales_prefill || p.replicas != Some(0),
        }
    }

    /// True when a frontend Deployment runs: always when disaggregated, else when asked for.
    pub fn has_frontend(&self) -> bool {
        self.is_disaggregated() || self.frontend.is_some()
    }

    /// The planner's bounds for a tier, when the planner scales it.
    pub fn planner_bounds(&self, tier: Tier) -> Option<ReplicaBounds> {
        let autoscaling = self.autoscaling.as_ref().filter(|a| a.enabled)?;
        match tier {
            Tier::Frontend => None,
            Tier::Prefill => autoscaling.prefill,
            Tier::Decode => autoscaling.decode,
        }
    }
}
