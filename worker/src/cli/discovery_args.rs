//! Flags that say how a role finds the workers of the tier it calls: decode
//! workers find prefill workers, the frontend finds decode workers.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tokio::sync::watch;

/// Where the addresses of the other tier come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryKind {
    /// The fixed list given on the command line.
    Static,
    /// The endpoints file `tandem local` keeps current.
    File,
    /// The EndpointSlices of the tier's headless Service (in-cluster).
    Kubernetes,
}

/// How a decode worker finds prefill workers.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefillDiscoveryArgs {
    /// Where prefill workers are found: `static` (`--prefill-workers`), `file`
    /// (`--endpoints-file`), `kubernetes` (`--prefill-service`).
    #[arg(long, env = "TANDEM_DISCOVERY", value_enum, default_value = "static")]
    pub discovery: DiscoveryKind,

    /// The prefill tier's headless Service (with `--discovery kubernetes`).
    #[arg(long, env = "TANDEM_PREFILL_SERVICE")]
    pub prefill_service: Option<String>,

    /// `tandem local`'s endpoints file (with `--discovery file`).
    #[arg(long, env = "TANDEM_ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,
}

/// How the frontend finds decode workers.
#[derive(Debug, Clone, clap::Args)]
pub struct DecodeDiscoveryArgs {
    /// Where decode workers are found: `static` (`--decode-workers`), `file`
    /// (`--endpoints-file`), `kubernetes` (`--decode-service`).
    #[arg(long, env = "TANDEM_DISCOVERY", value_enum, default_value = "static")]
    pub discovery: DiscoveryKind,

    /// The decode tier's headless Service (with `--discovery kubernetes`).
    #[arg(long, env = "TANDEM_DECODE_SERVICE")]
    pub decode_service: Option<String>,

    /// `tandem local`'s endpoints file (with `--discovery file`).
    #[arg(long, env = "TANDEM_ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,
}

impl PrefillDiscoveryArgs {
    pub async fn membership(
        &self,
        static_list: &[String],
    ) -> anyhow::Result<watch::Receiver<BTreeSet<String>>> {
        membership(self.discovery, static_list)
    }
}

impl DecodeDiscoveryArgs {
    pub async fn membership(
        &self,
        static_list: &[String],
    ) -> anyhow::Result<watch::Receiver<BTreeSet<String>>> {
        membership(self.discovery, static_list)
    }
}

fn membership(
    kind: DiscoveryKind,
    static_list: &[String],
) -> anyhow::Result<watch::Receiver<BTreeSet<String>>> {
    match kind {
        DiscoveryKind::Static => Ok(super::worker::static_membership(static_list)),
        other => anyhow::bail!("--discovery {other:?} is being merged; use static for now"),
    }
}
