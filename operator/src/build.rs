//! Second pipeline step, pure: a validated `DisaggDeployment` → the Kubernetes objects that run
//! it. No client, no clock, no randomness, so the output is pinned by golden YAML tests.
//!
//! Topologies:
//! - **serve**: no prefill tier, no frontend. Decode pods run `tandem serve` and the API Service
//!   selects them directly.
//! - **routed**: no prefill tier, a frontend. The frontend routes to `tandem decode` workers that
//!   prefill every prompt themselves.
//! - **disaggregated**: a prefill tier. Frontend → `tandem decode` → `tandem prefill`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet,
    StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;

use crate::crd::{
    DisaggDeployment, PodOverrides, PullPolicy, RouterMode, Tier, WorkerTierSpec, GRPC_PORT,
    HTTP_PORT,
};
use crate::validate::{ModelSource, Validated};

/// Label naming the `DisaggDeployment` a child belongs to.
pub const DEPLOYMENT_LABEL: &str = "tandem.dev/deployment";
/// Label naming the tier (`frontend`, `prefill`, `decode`) of a pod or its controller.
pub const TIER_LABEL: &str = "tandem.dev/tier";
/// Extended resource the NVIDIA device plugin advertises.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Seconds the frontend gets to finish streaming responses on shutdown.
pub const FRONTEND_DRAIN_SECONDS: i64 = 60;
/// UID/GID the containers run as (the images' non-root user).
pub const RUN_AS_USER: i64 = 65532;
/// Where model weights are mounted or downloaded in every pod.
const MODEL_DIR: &str = "/models";

/// Every object one `DisaggDeployment` owns, in apply order (RBAC before pods that use it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Children {
    pub service_account: ServiceAccount,
    /// EndpointSlice discovery for frontends and decode workers; absent in serve topology.
    pub discovery_role: Option<Role>,
    pub discovery_role_binding: Option<RoleBinding>,
    /// `<name>`: the OpenAI API.
    pub api_service: Service,
    pub frontend: Option<Deployment>,
    /// Headless `<name>-prefill`, giving prefill pods stable DNS names and EndpointSlices.
    pub prefill_service: Option<Service>,
    pub prefill: Option<StatefulSet>,
    pub decode_service: Service,
    pub decode: StatefulSet,
    pub disruption_budgets: Vec<PodDisruptionBudget>,
}

impl Children {
    /// Every child as JSON, in apply order; what golden files and the flag test read.
    pub fn to_values(&self) -> Vec<serde_json::Value> {
        fn push<T: Serialize>(out: &mut Vec<serde_json::Value>, obj: &T) {
            out.push(serde_json::to_value(obj).expect("k8s objects serialize"));
        }
        let mut out = Vec::new();
        push(&mut out, &self.service_account);
        self.discovery_role.iter().for_each(|o| push(&mut out, o));
        self.discovery_role_binding
            .iter()
            .for_each(|o| push(&mut out, o));
        push(&mut out, &self.api_service);
        self.frontend.iter().for_each(|o| push(&mut out, o));
        self.prefill_service.iter().for_each(|o| push(&mut out, o));
        self.prefill.iter().for_each(|o| push(&mut out, o));
        push(&mut out, &self.decode_service);
        push(&mut out, &self.decode);
        self.disruption_budgets
            .iter()
            .for_each(|o| push(&mut out, o));
        out
    }

    /// Multi-document YAML of [`Children::to_values`].
    pub fn to_yaml(&self) -> String {
        self.to_values()
            .iter()
            .map(|v| {
                format!(
                    "---\n{}",
                    serde_yaml::to_string(v).expect("JSON values serialize to YAML")
                )
            })
            .collect()
    }
}

/// Names of the children of a `DisaggDeployment` called `name`, in one place.
pub mod names {
    /// The API Service keeps the deployment's own name, so clients reach `http://<name>:8000`.
    pub fn api_service(name: &str) -> String {
        name.to_string()
    }
    pub fn tier(name: &str, tier: super::Tier) -> String {
        format!("{name}-{tier}")
    }
    pub fn service_account(name: &str) -> String {
        format!("{name}-tandem")
    }
    pub fn discovery_role(name: &str) -> String {
        format!("{name}-discovery")
    }
}

/// Builds every child of `v`. Pure.
pub fn build(v: &Validated<'_>) -> Children {
    let spec = &v.dd.spec;
    let disaggregated = spec.is_disaggregated();
    let with_frontend = spec.has_frontend();
    let api_target = if with_frontend {
        Tier::Frontend
    } else {
        Tier::Decode
    };

    let mut children = Children {
        service_account: ServiceAccount {
            metadata: meta(v, names::service_account(&v.name), None),
            automount_service_account_token: Some(false),
            ..Default::default()
        },
        api_service: Service {
            metadata: meta(v, names::api_service(&v.name), Some(api_target)),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                selector: Some(selector_labels(v, api_target)),
                ports: Some(vec![http_service_port()]),
                ..Default::default()
            }),
            ..Default::default()
        },
        decode_service: headless_service(v, Tier::Decode),
        decode: statefulset(v, Tier::Decode, &spec.decode, worker_args(v, Tier::Decode)),
        ..Default::default()
    };
    if with_frontend {
        children.discovery_role = Some(discovery_role(v));
        children.discovery_role_binding = Some(discovery_role_binding(v));
        children.frontend = Some(frontend_deployment(v));
    }
    if disaggregated {
        let prefill = spec
            .prefill
            .as_ref()
            .expect("disaggregated implies a prefill tier");
        children.prefill_service = Some(headless_service(v, Tier::Prefill));
        children.prefill = Some(statefulset(
            v,
            Tier::Prefill,
            prefill,
            worker_args(v, Tier::Prefill),
        ));
    }
    let tiers = [
        with_frontend.then_some(Tier::Frontend),
        disaggregated.then_some(Tier::Prefill),
        Some(Tier::Decode),
    ];
    children.disruption_budgets = tiers
        .into_iter()
        .flatten()
        .map(|t| disruption_budget(v, t))
        .collect();
    children
}

/// Replicas the operator writes for a worker tier: the planner's choice (its last decision in
/// status, clamped to the bounds) when it scales the tier, the spec's number otherwise, and
/// `None` (field left out of the apply patch, so another owner keeps it) when neither says.
pub fn worker_replicas(dd: &DisaggDeployment, tier: Tier) -> Option<i32> {
    let tier_spec = match tier {
        Tier::Frontend => {
            return Some(
                dd.spec
                    .frontend
                    .as_ref()
                    .and_then(|f| f.replicas)
                    .unwrap_or(1),
            )
        }
        Tier::Prefill => dd.spec.prefill.as_ref()?,
        Tier::Decode => &dd.spec.decode,
    };
    match dd.spec.planner_bounds(tier) {
        Some(bounds) => {
            let status = dd.status.as_ref().and_then(|s| match tier {
                Tier::Prefill => s.prefill.as_ref(),
                _ => s.decode.as_ref(),
            });
            let decided = status
                .map(|s| s.desired_replicas)
                .unwrap_or(bounds.min_replicas);
            Some(decided.clamp(bounds.min_replicas, bounds.max_replicas))
        }
        None => tier_spec.replicas,
    }
}

fn meta(v: &Validated<'_>, name: String, tier: Option<Tier>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(v.namespace.clone()),
        labels: Some(labels(v, tier)),
        owner_references: v.dd.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

fn labels(v: &Validated<'_>, tier: Option<Tier>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "tandem".to_string()),
        ("app.kubernetes.io/instance".to_string(), v.name.clone()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "tandem".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            crate::FIELD_MANAGER.to_string(),
        ),
        (DEPLOYMENT_LABEL.to_string(), v.name.clone()),
    ]);
    if let Some(tier) = tier {
        l.insert("app.kubernetes.io/component".into(), tier.as_str().into());
        l.insert(TIER_LABEL.into(), tier.as_str().into());
    }
    l
}

/// The labels selectors match on: stable for the life of the deployment (selectors are immutable).
fn selector_labels(v: &Validated<'_>, tier: Tier) -> BTreeMap<String, String> {
    BTreeMap::from([
        (DEPLOYMENT_LABEL.to_string(), v.name.clone()),
        (TIER_LABEL.to_string(), tier.as_str().to_string()),
    ])
}

fn http_service_port() -> ServicePort {
    ServicePort {
        name: Some("http".into()),
        port: HTTP_PORT,
        target_port: Some(IntOrString::String("http".into())),
        app_protocol: Some("http".into()),
        ..Default::default()
    }
}

fn headless_service(v: &Validated<'_>, tier: Tier) -> Service {
    // In serve topology decode pods speak only HTTP; otherwise routers reach workers over gRPC.
    let mut ports = vec![http_service_port()];
    if v.dd.spec.has_frontend() {
        ports.push(ServicePort {
            name: Some("grpc".into()),
            port: GRPC_PORT,
            target_port: Some(IntOrString::String("grpc".into())),
            app_protocol: Some("kubernetes.io/h2c".into()),
            ..Default::default()
        });
    }
    Service {
        metadata: meta(v, names::tier(&v.name, tier), Some(tier)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(v, tier)),
            ports: Some(ports),
            // Routers must only see workers that loaded their model.
            publish_not_ready_addresses: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn discovery_role(v: &Validated<'_>) -> Role {
    Role {
        metadata: meta(v, names::discovery_role(&v.name), None),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".into()]),
            resources: Some(vec!["endpointslices".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..Default::default()
        }]),
    }
}

fn discovery_role_binding(v: &Validated<'_>) -> RoleBinding {
    RoleBinding {
        metadata: meta(v, names::discovery_role(&v.name), None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: names::discovery_role(&v.name),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: names::service_account(&v.name),
            namespace: Some(v.namespace.clone()),
            ..Default::default()
        }]),
    }
}

fn disruption_budget(v: &Validated<'_>, tier: Tier) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(v, names::tier(&v.name, tier), Some(tier)),
        spec: Some(PodDisruptionBudgetSpec {
            // One pod of a tier at a time: a drain never takes a whole tier down.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(v, tier)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn frontend_deployment(v: &Validated<'_>) -> Deployment {
    let frontend = v.dd.spec.frontend.clone().unwrap_or_default();
    let pod = pod_template(
        v,
        Tier::Frontend,
        frontend_args(v, frontend.router_mode),
        frontend.resources.clone(),
        0,
        FRONTEND_DRAIN_SECONDS,
        frontend.pod_template.as_ref(),
    );
    Deployment {
        metadata: meta(
            v,
            names::tier(&v.name, Tier::Frontend),
            Some(Tier::Frontend),
        ),
        spec: Some(DeploymentSpec {
            replicas: worker_replicas(v.dd, Tier::Frontend),
            selector: LabelSelector {
                match_labels: Some(selector_labels(v, Tier::Frontend)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                // Never drop below the declared frontend capacity during a rollout.
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: pod,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn statefulset(
    v: &Validated<'_>,
    tier: Tier,
    t: &WorkerTierSpec,
    args: Vec<String>,
) -> StatefulSet {
    let pod = pod_template(
        v,
        tier,
        args,
        t.resources.clone(),
        t.gpus_per_replica,
        t.drain_seconds,
        t.pod_template.as_ref(),
    );
    StatefulSet {
        metadata: meta(v, names::tier(&v.name, tier), Some(tier)),
        spec: Some(StatefulSetSpec {
            replicas: worker_replicas(v.dd, tier),
            service_name: Some(names::tier(&v.name, tier)),
            // Workers are interchangeable: start and stop them together, not one by one.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(v, tier)),
                ..Default::default()
            },
            template: pod,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where the worker finds the model inside its container.
fn model_path(v: &Validated<'_>) -> String {
    match &v.source {
        ModelSource::HuggingFace { repo } => format!("{MODEL_DIR}/hf/{repo}"),
        ModelSource::Pvc { path, .. } if path.is_empty() => MODEL_DIR.to_string(),
        ModelSource::Pvc { path, .. } => format!("{MODEL_DIR}/{path}"),
        ModelSource::File { path } => path.clone(),
    }
}

/// Seconds before the kubelet's SIGKILL that the worker must have exited by: its own drain
/// deadline is the pod's grace period minus this margin.
const EXIT_MARGIN_SECONDS: i64 = 5;

fn common_model_args(v: &Validated<'_>, drain_seconds: i64) -> Vec<String> {
    let mut args = vec![
        "--model".to_string(),
        model_path(v),
        "--served-model-name".into(),
        v.dd.spec.model.name.clone(),
        "--host".into(),
        "0.0.0.0".into(),
        "--port".into(),
        HTTP_PORT.to_string(),
    ];
    if let Some(len) = v.dd.spec.model.max_model_len {
        args.extend(["--max-model-len".to_string(), len.to_string()]);
    }
    let grace = (drain_seconds - EXIT_MARGIN_SECONDS).max(0);
    args.extend(["--shutdown-grace-secs".to_string(), grace.to_string()]);
    args
}

fn frontend_args(v: &Validated<'_>, router_mode: RouterMode) -> Vec<String> {
    let mut args = vec!["frontend".to_string()];
    args.extend(common_model_args(v, FRONTEND_DRAIN_SECONDS));
    let mode = match router_mode {
        RouterMode::Kv => "kv",
        RouterMode::RoundRobin => "round-robin",
        RouterMode::Random => "random",
    };
    args.extend([
        "--router-mode".into(),
        mode.into(),
        "--discovery".into(),
        "kubernetes".into(),
        "--decode-service".into(),
        names::tier(&v.name, Tier::Decode),
    ]);
    args
}

/// The `tandem` subcommand and flags of a prefill or decode pod.
fn worker_args(v: &Validated<'_>, tier: Tier) -> Vec<String> {
    let spec = &v.dd.spec;
    let tier_spec = match tier {
        Tier::Prefill => spec
            .prefill
            .as_ref()
            .expect("prefill args only for a prefill tier"),
        _ => &spec.decode,
    };
    let role = match tier {
        Tier::Decode if !spec.has_frontend() => "serve",
        other => other.as_str(),
    };
    let mut args = vec![role.to_string()];
    args.extend(common_model_args(v, tier_spec.drain_seconds));
    args.extend([
        "--device".into(),
        if tier_spec.gpus_per_replica > 0 {
            "cuda"
        } else {
            "cpu"
        }
        .into(),
    ]);
    if tier_spec.gpus_per_replica > 1 {
        // One worker per pod drives all of the pod's GPUs as one tensor-parallel group.
        args.extend([
            "--tensor-parallel-size".into(),
            tier_spec.gpus_per_replica.to_string(),
        ]);
    }
    if role == "serve" {
        return args;
    }
    args.extend(["--grpc-port".into(), GRPC_PORT.to_string()]);
    if spec.is_disaggregated() {
        let kv_transfer = match spec.disaggregation.kv_transfer {
            crate::crd::KvTransfer::Grpc => "grpc",
            crate::crd::KvTransfer::CudaIpc => "cuda-ipc",
            crate::crd::KvTransfer::Auto => "auto",
        };
        args.extend(["--kv-transfer".into(), kv_transfer.into()]);
        if tier == Tier::Decode {
            args.extend([
                "--discovery".into(),
                "kubernetes".into(),
                "--prefill-service".into(),
                names::tier(&v.name, Tier::Prefill),
            ]);
            if let Some(min) = spec.disaggregation.remote_prefill_min_tokens {
                args.extend(["--remote-prefill-min-tokens".into(), min.to_string()]);
            }
        }
    }
    args
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        ..Default::default()
    }
}

fn health_probe(period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/health".into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn pod_template(
    v: &Validated<'_>,
    tier: Tier,
    args: Vec<String>,
    resources: Option<ResourceRequirements>,
    gpus: i32,
    drain_seconds: i64,
    overrides: Option<&PodOverrides>,
) -> PodTemplateSpec {
    let overrides = overrides.cloned().unwrap_or_default();
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    let mut init_containers = Vec::new();
    let pull_policy = v.dd.spec.image_pull_policy.map(|p| {
        match p {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
        .to_string()
    });
    let base_env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        // The node identity a worker reports so that `--kv-transfer auto` picks cuda-ipc only
        // with a prefill worker on the same machine (docs/disaggregation.md, "Choosing").
        field_env("TANDEM_NODE_NAME", "spec.nodeName"),
        EnvVar {
            name: "HOME".into(),
            value: Some("/tmp".into()),
            ..Default::default()
        },
    ];
    match &v.source {
        ModelSource::HuggingFace { .. } => {
            volumes.push(Volume {
                name: "model".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name: "model".into(),
                mount_path: MODEL_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
            let mut env = base_env.clone();
            if let Some(secret) = &v.dd.spec.model.hf_token_secret_ref {
                env.push(EnvVar {
                    name: "HF_TOKEN".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret.name.clone(),
                            key: secret.key.clone().unwrap_or_else(|| "token".into()),
                            optional: Some(false),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            init_containers.push(Container {
                name: "fetch-model".into(),
                image: Some(v.dd.spec.image.clone()),
                image_pull_policy: pull_policy.clone(),
                command: Some(vec!["tandem".into()]),
                args: Some(vec![
                    "model".into(),
                    "fetch".into(),
                    // hf://ORG/REPO[@REV], as validated.
                    v.dd.spec.model.source.clone(),
                    "--output".into(),
                    model_path(v),
                ]),
                env: Some(env),
                volume_mounts: Some(vec![
                    VolumeMount {
                        name: "tmp".into(),
                        mount_path: "/tmp".into(),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "model".into(),
                        mount_path: MODEL_DIR.into(),
                        ..Default::default()
                    },
                ]),
                security_context: Some(restricted_container_security()),
                ..Default::default()
            });
        }
        ModelSource::Pvc { claim, .. } => {
            volumes.push(Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(true),
                }),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name: "model".into(),
                mount_path: MODEL_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        ModelSource::File { .. } => {}
    }

    let mut resources = resources.unwrap_or_default();
    if gpus > 0 {
        let gpu = Quantity(gpus.to_string());
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), gpu.clone());
        if let Some(requests) = resources
            .requests
            .as_mut()
            .filter(|r| r.contains_key(GPU_RESOURCE))
        {
            requests.insert(GPU_RESOURCE.into(), gpu);
        }
    }
    let mut ports = vec![ContainerPort {
        name: Some("http".into()),
        container_port: HTTP_PORT,
        protocol: Some("TCP".into()),
        ..Default::default()
    }];
    if args.iter().any(|a| a == "--grpc-port") {
        ports.push(ContainerPort {
            name: Some("grpc".into()),
            container_port: GRPC_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        });
    }
    let loads_weights = tier != Tier::Frontend;
    let container = Container {
        name: "tandem".into(),
        image: Some(v.dd.spec.image.clone()),
        image_pull_policy: pull_policy,
        command: Some(vec!["tandem".into()]),
        args: Some(args),
        env: Some(base_env),
        ports: Some(ports),
        resources: Some(resources),
        readiness_probe: Some(health_probe(5, 3)),
        liveness_probe: Some(health_probe(10, 6)),
        // Loading weights can take minutes; liveness only starts once /health first answers.
        startup_probe: Some(health_probe(5, if loads_weights { 360 } else { 60 })),
        volume_mounts: Some(mounts),
        security_context: Some(restricted_container_security()),
        ..Default::default()
    };

    let mut pod_labels = overrides.labels.clone();
    pod_labels.extend(labels(v, Some(tier)));
    let mut annotations = overrides.annotations.clone();
    annotations.extend([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), HTTP_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    // Frontends discover decode workers and decode workers discover prefill workers through
    // EndpointSlices; prefill and serve pods never call the API, so they get no token.
    let calls_api = v.dd.spec.has_frontend() && tier != Tier::Prefill;
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(names::service_account(&v.name)),
            automount_service_account_token: Some(calls_api),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(drain_seconds),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                fs_group: Some(RUN_AS_USER),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            containers: vec![container],
            volumes: Some(volumes),
            node_selector: (!overrides.node_selector.is_empty()).then_some(overrides.node_selector),
            tolerations: (!overrides.tolerations.is_empty()).then_some(overrides.tolerations),
            priority_class_name: overrides.priority_class_name,
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DisaggDeploymentStatus, TierStatus};
    use crate::validate::validate;

    fn load(yaml: &str) -> DisaggDeployment {
        let mut dd: DisaggDeployment = serde_yaml::from_str(yaml).unwrap();
        dd.metadata.namespace = Some("ns".into());
        dd.metadata.uid = Some("uid-1".into());
        dd
    }

    const PLANNER: &str = "
metadata: {name: p}
spec:
  model: {name: m, source: 'pvc://models/m'}
  image: img
  prefill: {gpusPerReplica: 2}
  decode: {replicas: 9, gpusPerReplica: 2}
  autoscaling:
    enabled: true
    prometheusUrl: http://prom:9090
    slo: {ttftP90Ms: 500, itlP90Ms: 50}
    prefill: {minReplicas: 1, maxReplicas: 4}
    decode: {minReplicas: 2, maxReplicas: 8}
";

    #[test]
    fn planner_tiers_start_at_min_and_follow_its_clamped_decision() {
        let mut dd = load(PLANNER);
        assert_eq!(worker_replicas(&dd, Tier::Prefill), Some(1));
        assert_eq!(
            worker_replicas(&dd, Tier::Decode),
            Some(2),
            "spec replicas are ignored under the planner"
        );
        dd.status = Some(DisaggDeploymentStatus {
            prefill: Some(TierStatus {
                desired_replicas: 3,
                ..Default::default()
            }),
            decode: Some(TierStatus {
                desired_replicas: 50,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(worker_replicas(&dd, Tier::Prefill), Some(3));
        assert_eq!(
            worker_replicas(&dd, Tier::Decode),
            Some(8),
            "clamped to maxReplicas"
        );
    }

    #[test]
    fn gpus_become_device_plugin_limits_and_cuda_device() {
        let dd = load(PLANNER);
        let children = build(&validate(&dd).unwrap());
        let pod = children.decode.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits[GPU_RESOURCE], Quantity("2".into()));
        let args = c.args.as_ref().unwrap();
        assert_eq!(args[0], "decode");
        assert!(args.windows(2).any(|w| w == ["--device", "cuda"]));
        assert!(
            args.windows(2)
                .any(|w| w == ["--tensor-parallel-size", "2"]),
            "two GPUs per pod are one tensor-parallel group: {args:?}"
        );
        assert!(args
            .windows(2)
            .any(|w| w == ["--prefill-service", "p-prefill"]));
    }

    #[test]
    fn one_gpu_or_none_runs_without_tensor_parallelism() {
        for (gpus, device) in [(0, "cpu"), (1, "cuda")] {
            let mut dd = load(PLANNER);
            dd.spec.prefill.as_mut().unwrap().gpus_per_replica = gpus;
            dd.spec.decode.gpus_per_replica = gpus;
            let children = build(&validate(&dd).unwrap());
            for sts in [children.prefill.unwrap(), children.decode] {
                let pod = sts.spec.unwrap().template.spec.unwrap();
                let args = pod.containers[0].args.clone().unwrap();
                assert!(args.windows(2).any(|w| w == ["--device", device]));
                assert!(
                    !args.iter().any(|a| a == "--tensor-parallel-size"),
                    "{gpus} GPUs: {args:?}"
                );
            }
        }
    }

    #[test]
    fn a_serve_pod_with_four_gpus_is_one_tensor_parallel_group() {
        let dd = load(
            "
metadata: {name: s}
spec:
  model: {name: m, source: 'file:///opt/m.gguf'}
  image: img
  decode: {replicas: 1, gpusPerReplica: 4}
",
        );
        let children = build(&validate(&dd).unwrap());
        let pod = children.decode.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits[GPU_RESOURCE], Quantity("4".into()));
        let args = c.args.as_ref().unwrap();
        assert_eq!(args[0], "serve");
        assert!(args
            .windows(2)
            .any(|w| w == ["--tensor-parallel-size", "4"]));
    }

    #[test]
    fn serve_topology_sends_api_traffic_to_decode_pods_without_gpus_or_api_access() {
        let dd = load(
            "
metadata: {name: s}
spec:
  model: {name: m, source: 'file:///opt/m.gguf'}
  image: img
  decode: {replicas: 1, gpusPerReplica: 0}
",
        );
        let children = build(&validate(&dd).unwrap());
        assert!(
            children.frontend.is_none()
                && children.prefill.is_none()
                && children.discovery_role.is_none()
        );
        let selector = children.api_service.spec.unwrap().selector.unwrap();
        assert_eq!(selector[TIER_LABEL], "decode");
        let pod = children.decode.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap()[..3],
            ["serve", "--model", "/opt/m.gguf"]
        );
        assert!(
            c.resources.as_ref().unwrap().limits.is_none(),
            "no GPU asked for on CPU"
        );
    }

    #[test]
    fn hf_init_container_fetches_the_pinned_revision() {
        let fetch_args = |source: &str| {
            let mut dd = load(PLANNER);
            dd.spec.model.source = source.into();
            let children = build(&validate(&dd).unwrap());
            let spec = children.decode.spec.unwrap().template.spec.unwrap();
            let init = &spec.init_containers.unwrap()[0];
            let worker_args = spec.containers[0].args.clone().unwrap();
            (init.args.clone().unwrap(), worker_args)
        };
        let (args, worker) = fetch_args("hf://org/repo@0e9e39f2");
        assert_eq!(
            args,
            [
                "model",
                "fetch",
                "hf://org/repo@0e9e39f2",
                "--output",
                "/models/hf/org/repo"
            ]
        );
        assert!(
            worker
                .windows(2)
                .any(|w| w == ["--model", "/models/hf/org/repo"]),
            "{worker:?}"
        );
        let (args, _) = fetch_args("hf://org/repo");
        assert_eq!(args[2], "hf://org/repo");
    }

    #[test]
    fn every_container_meets_restricted_pod_security() {
        for source in ["hf://org/repo", "pvc://claim/x", "file:///m"] {
            let mut dd = load(PLANNER);
            dd.spec.model.source = source.into();
            let children = build(&validate(&dd).unwrap());
            let pods = [
                children.frontend.unwrap().spec.unwrap().template,
                children.prefill.unwrap().spec.unwrap().template,
                children.decode.spec.unwrap().template,
            ];
            for pod in pods {
                let spec = pod.spec.unwrap();
                let psc = spec.security_context.as_ref().unwrap();
                assert_eq!(psc.run_as_non_root, Some(true));
                assert_eq!(
                    psc.seccomp_profile.as_ref().unwrap().type_,
                    "RuntimeDefault"
                );
                for c in spec
                    .containers
                    .iter()
                    .chain(spec.init_containers.iter().flatten())
                {
                    let sc = c.security_context.as_ref().unwrap();
                    assert_eq!(
                        sc.allow_privilege_escalation,
                        Some(false),
                        "{source} {}",
                        c.name
                    );
                    assert_eq!(
                        sc.read_only_root_filesystem,
                        Some(true),
                        "{source} {}",
                        c.name
                    );
                    assert_eq!(
                        sc.capabilities.as_ref().unwrap().drop.as_deref(),
                        Some(&["ALL".to_string()][..])
                    );
                    let mounts = c.volume_mounts.as_ref().unwrap();
                    assert!(
                        mounts.iter().any(|m| m.mount_path == "/tmp"),
                        "writable /tmp for {}",
                        c.name
                    );
                }
                let has_init = spec.init_containers.is_some();
                assert_eq!(
                    has_init,
                    source.starts_with("hf://"),
                    "init container only fetches hf:// models"
                );
            }
        }
    }
}
