//! Finding the workers of a tier: the gRPC addresses (`host:port`) of the
//! READY prefill or decode workers, kept current as workers come and go, so a
//! frontend (decode tier) or a decode worker (prefill tier) picks up joins and
//! leaves without a restart.
//!
//! Three sources, one shape: [`start`] returns a [`watch::Receiver`] holding the
//! current set; consumers diff it against their own (e.g. the router's
//! `add_worker`/`remove_worker`) whenever it changes.
//!
//! - [`DiscoveryConfig::Static`]: a fixed list (`--decode-workers`,
//!   `--prefill-workers`). Never changes.
//! - [`DiscoveryConfig::File`]: the endpoints file `tandem local` writes
//!   ([`EndpointsFile`]), polled every [`FILE_POLL_INTERVAL`]; entries of the
//!   role whose process is up.
//! - [`DiscoveryConfig::Kubernetes`]: the `discovery.k8s.io/v1` EndpointSlices
//!   of the tier's headless Service (label `kubernetes.io/service-name`),
//!   watched through kube-runtime's reflector; ready endpoints only, at the
//!   port named `grpc`.
//!
//! A source that fails after starting (an unreadable file, an API server that
//! went away) keeps the last known set and logs; it never empties the set on an
//! error, since the workers are most likely still there.

mod file;
mod kubernetes;

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use tokio::sync::watch;

pub use file::{EndpointsFile, ProcessEntry, FILE_POLL_INTERVAL};
pub use kubernetes::{ready_grpc_addresses, watch_endpoint_slices};
pub use tandem_api::args::DiscoveryMode;

/// The environment variable the operator fills with the pod's namespace
/// (downward API); the default namespace of Kubernetes discovery.
pub const NAMESPACE_ENV: &str = "POD_NAMESPACE";

/// The name of the Service port (and so the EndpointSlice port) workers serve gRPC on.
pub const GRPC_PORT_NAME: &str = "grpc";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("`{address}` in {flag} is not a worker address: {reason} (expected HOST:PORT, e.g. 127.0.0.1:9000)")]
    InvalidAddress {
        flag: String,
        address: String,
        reason: &'static str,
    },
    #[error("--discovery {mode} needs {flag}")]
    MissingFlag { mode: DiscoveryMode, flag: String },
    #[error("{flag} only applies with --discovery {applies_to}, not --discovery {mode}")]
    FlagNotApplicable {
        flag: String,
        applies_to: DiscoveryMode,
        mode: DiscoveryMode,
    },
    #[error(
        "--discovery kubernetes needs the pod's namespace: set {NAMESPACE_ENV} (the operator does)"
    )]
    MissingNamespace,
    #[error("cannot reach the Kubernetes API: {0}")]
    KubeClient(#[source] kube::Error),
    #[error("cannot read the endpoints file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the endpoints file {path}: {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the endpoints file {path} is not valid: {source}")]
    ParseFile {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The processes of a deployment, as the endpoints file names them.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Frontend,
    Prefill,
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Frontend => "frontend",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where to find the workers of one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryConfig {
    /// These addresses, validated `host:port`, forever.
    Static(Vec<String>),
    /// The gRPC addresses of the up processes of `role` in `tandem local`'s
    /// endpoints file at `path`.
    File { path: PathBuf, role: Role },
    /// The ready endpoints of the EndpointSlices of Service `service` in
    /// `namespace`, at the port named `port_name`.
    Kubernetes {
        namespace: String,
        service: String,
        port_name: String,
    },
}

/// The discovery flags of a role, as parsed, before validation. The flag names
/// depend on the tier being discovered: the frontend finds the decode tier
/// (`--decode-workers`, `--decode-service`), a decode worker the prefill tier
/// (`--prefill-workers`, `--prefill-service`).
#[derive(Debug, Clone)]
pub struct DiscoveryFlags {
    /// The tier to find: [`Role::Decode`] or [`Role::Prefill`].
    pub tier: Role,
    /// `--discovery`; `None` means static.
    pub mode: Option<DiscoveryMode>,
    /// `--decode-workers` / `--prefill-workers`.
    pub workers: Vec<String>,
    /// `--decode-service` / `--prefill-service`.
    pub service: Option<String>,
    /// `--endpoints-file`.
    pub endpoints_file: Option<PathBuf>,
    /// The namespace of the Service; `None` reads [`NAMESPACE_ENV`].
    pub namespace: Option<String>,
}

impl DiscoveryFlags {
    pub fn new(tier: Role) -> Self {
        Self {
            tier,
            mode: None,
            workers: Vec::new(),
            service: None,
            endpoints_file: None,
            namespace: None,
        }
    }

    fn workers_flag(&self) -> String {
        format!("--{}-workers", self.tier)
    }

    fn service_flag(&self) -> String {
        format!("--{}-service", self.tier)
    }
}

impl DiscoveryConfig {
    /// Validates a role's discovery flags: the mode's own flag must be given,
    /// and another mode's flag is refused rather than silently ignored. A
    /// static list may be empty (a decode worker without prefill workers
    /// prefills everything locally); whether that is acceptable is the
    /// caller's call.
    pub fn from_flags(flags: DiscoveryFlags) -> Result<Self, DiscoveryError> {
        let mode = flags.mode.unwrap_or(DiscoveryMode::Static);
        let not_applicable = |flag: String, applies_to| DiscoveryError::FlagNotApplicable {
            flag,
            applies_to,
            mode,
        };
        if mode != DiscoveryMode::Static && !flags.workers.is_empty() {
            return Err(not_applicable(flags.workers_flag(), DiscoveryMode::Static));
        }
        if mode != DiscoveryMode::File && flags.endpoints_file.is_some() {
            return Err(not_applicable(
                "--endpoints-file".into(),
                DiscoveryMode::File,
            ));
        }
        if mode != DiscoveryMode::Kubernetes && flags.service.is_some() {
            return Err(not_applicable(
                flags.service_flag(),
                DiscoveryMode::Kubernetes,
            ));
        }
        match mode {
            DiscoveryMode::Static => {
                let flag = flags.workers_flag();
                let addresses = flags
                    .workers
                    .iter()
                    .map(|a| a.trim())
                    .filter(|a| !a.is_empty())
                    .map(|a| validate_address(&flag, a))
                    .collect::<Result<_, _>>()?;
                Ok(DiscoveryConfig::Static(addresses))
            }
            DiscoveryMode::File => {
                let path = flags.endpoints_file.ok_or(DiscoveryError::MissingFlag {
                    mode,
                    flag: "--endpoints-file".into(),
                })?;
                Ok(DiscoveryConfig::File {
                    path,
                    role: flags.tier,
                })
            }
            DiscoveryMode::Kubernetes => {
                let service = flags
                    .service
                    .clone()
                    .filter(|s| !s.trim().is_empty())
                    .ok_or_else(|| DiscoveryError::MissingFlag {
                        mode,
                        flag: flags.service_flag(),
                    })?;
                let namespace = flags
                    .namespace
                    .or_else(|| std::env::var(NAMESPACE_ENV).ok())
                    .filter(|n| !n.trim().is_empty())
                    .ok_or(DiscoveryError::MissingNamespace)?;
                Ok(DiscoveryConfig::Kubernetes {
                    namespace,
                    service,
                    port_name: GRPC_PORT_NAME.into(),
                })
            }
        }
    }
}

/// Checks `host:port` (IPv6 hosts in brackets) and returns it trimmed.
fn validate_address(flag: &str, address: &str) -> Result<String, DiscoveryError> {
    let invalid = |reason| DiscoveryError::InvalidAddress {
        flag: flag.to_string(),
        address: address.to_string(),
        reason,
    };
    let (host, port) = address.rsplit_once(':').ok_or(invalid("no port"))?;
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(invalid("an IPv6 host must be in brackets"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid("the port must be a number from 1 to 65535")),
        Ok(_) => Ok(address.to_string()),
    }
}

/// Starts discovery and returns the live set of worker gRPC addresses. The
/// background task (for files and Kubernetes) ends when every receiver is
/// dropped. Must be called inside a Tokio runtime.
///
/// Kubernetes discovery connects with the in-cluster service account (or the
/// local kubeconfig) and fails here only if no configuration is found; API
/// errors after that are retried with backoff while the last set stays.
pub async fn start(
    config: DiscoveryConfig,
) -> Result<watch::Receiver<BTreeSet<String>>, DiscoveryError> {
    match config {
        DiscoveryConfig::Static(addresses) => {
            let (tx, rx) = watch::channel(addresses.into_iter().collect());
            // Keep the sender alive so `changed()` waits instead of erroring
            // at once: a static set simply never changes.
            tokio::spawn(async move { tx.closed().await });
            Ok(rx)
        }
        DiscoveryConfig::File { path, role } => Ok(file::watch_file(path, role)),
        DiscoveryConfig::Kubernetes {
            namespace,
            service,
            port_name,
        } => {
            let client = kube::Client::try_default()
                .await
                .map_err(DiscoveryError::KubeClient)?;
            Ok(watch_endpoint_slices(
                client, &namespace, &service, &port_name,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(tier: Role) -> DiscoveryFlags {
        DiscoveryFlags::new(tier)
    }

    #[test]
    fn static_is_the_default_and_validates_addresses() {
        let mut f = flags(Role::Decode);
        f.workers = vec!["127.0.0.1:9000".into(), " [::1]:9001 ".into(), "".into()];
        assert_eq!(
            DiscoveryConfig::from_flags(f).unwrap(),
            DiscoveryConfig::Static(vec!["127.0.0.1:9000".into(), "[::1]:9001".into()])
        );

        for (bad, why) in [
            ("localhost", "no port"),
            (":9000", "no host"),
            ("::1:9000", "brackets"),
            ("host:http", "from 1 to 65535"),
            ("host:0", "from 1 to 65535"),
        ] {
            let mut f = flags(Role::Prefill);
            f.workers = vec![bad.into()];
            let err = DiscoveryConfig::from_flags(f).unwrap_err().to_string();
            assert!(err.contains("--prefill-workers"), "{err}");
            assert!(err.contains(bad) && err.contains(why), "{bad}: {err}");
        }
        // No workers at all is a valid (empty) static set.
        assert_eq!(
            DiscoveryConfig::from_flags(flags(Role::Prefill)).unwrap(),
            DiscoveryConfig::Static(vec![])
        );
    }

    #[test]
    fn each_mode_needs_its_flag_and_refuses_the_others() {
        let mut f = flags(Role::Decode);
        f.mode = Some(DiscoveryMode::Kubernetes);
        f.namespace = Some("prod".into());
        let err = DiscoveryConfig::from_flags(f.clone())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--discovery kubernetes needs --decode-service");

        f.service = Some("llama-decode".into());
        assert_eq!(
            DiscoveryConfig::from_flags(f.clone()).unwrap(),
            DiscoveryConfig::Kubernetes {
                namespace: "prod".into(),
                service: "llama-decode".into(),
                port_name: "grpc".into(),
            }
        );

        f.workers = vec!["10.0.0.1:9000".into()];
        let err = DiscoveryConfig::from_flags(f).unwrap_err().to_string();
        assert_eq!(
            err,
            "--decode-workers only applies with --discovery static, not --discovery kubernetes"
        );

        let mut f = flags(Role::Prefill);
        f.mode = Some(DiscoveryMode::File);
        let err = DiscoveryConfig::from_flags(f.clone())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--discovery file needs --endpoints-file");
        f.endpoints_file = Some("/tmp/e.json".into());
        assert_eq!(
            DiscoveryConfig::from_flags(f.clone()).unwrap(),
            DiscoveryConfig::File {
                path: "/tmp/e.json".into(),
                role: Role::Prefill
            }
        );
        f.service = Some("x".into());
        let err = DiscoveryConfig::from_flags(f).unwrap_err().to_string();
        assert_eq!(
            err,
            "--prefill-service only applies with --discovery kubernetes, not --discovery file"
        );

        let mut f = flags(Role::Decode);
        f.endpoints_file = Some("/tmp/e.json".into());
        let err = DiscoveryConfig::from_flags(f).unwrap_err().to_string();
        assert_eq!(
            err,
            "--endpoints-file only applies with --discovery file, not --discovery static"
        );
    }

    #[test]
    fn kubernetes_namespace_comes_from_the_flag_or_the_pod() {
        let mut f = flags(Role::Prefill);
        f.mode = Some(DiscoveryMode::Kubernetes);
        f.service = Some("llama-prefill".into());
        // The flag wins over the environment, which this test leaves alone
        // (other tests run in parallel in this process).
        f.namespace = Some("team-a".into());
        let DiscoveryConfig::Kubernetes { namespace, .. } =
            DiscoveryConfig::from_flags(f.clone()).unwrap()
        else {
            panic!("kubernetes")
        };
        assert_eq!(namespace, "team-a");
        if std::env::var_os(NAMESPACE_ENV).is_none() {
            f.namespace = None;
            let err = DiscoveryConfig::from_flags(f).unwrap_err().to_string();
            assert!(err.contains("POD_NAMESPACE"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_static_set_is_there_at_once_and_never_changes() {
        let mut rx = start(DiscoveryConfig::Static(vec![
            "127.0.0.1:2".into(),
            "127.0.0.1:1".into(),
        ]))
        .await
        .unwrap();
        let expected: BTreeSet<String> = ["127.0.0.1:1", "127.0.0.1:2"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(*rx.borrow_and_update(), expected);
        // `changed()` must wait (not fail at once as with a dropped sender).
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(100), rx.changed()).await;
        assert!(waited.is_err(), "a static set must not report changes");
    }
}
