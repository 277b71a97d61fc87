//! Flags that say how a role finds the workers of the tier it calls: decode
//! workers find prefill workers, the frontend finds decode workers.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tokio::sync::watch;

use crate::discovery::{self, DiscoveryConfig, DiscoveryFlags, Role};

/// Where the addresses of the other tier come from.
pub use crate::discovery::DiscoveryMode as DiscoveryKind;

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
        membership(DiscoveryFlags {
            mode: Some(self.discovery),
            workers: static_list.to_vec(),
            service: self.prefill_service.clone(),
            endpoints_file: self.endpoints_file.clone(),
            ..DiscoveryFlags::new(Role::Prefill)
        })
        .await
    }
}

impl DecodeDiscoveryArgs {
    pub async fn membership(
        &self,
        static_list: &[String],
    ) -> anyhow::Result<watch::Receiver<BTreeSet<String>>> {
        membership(DiscoveryFlags {
            mode: Some(self.discovery),
            workers: static_list.to_vec(),
            service: self.decode_service.clone(),
            endpoints_file: self.endpoints_file.clone(),
            ..DiscoveryFlags::new(Role::Decode)
        })
        .await
    }
}

async fn membership(flags: DiscoveryFlags) -> anyhow::Result<watch::Receiver<BTreeSet<String>>> {
    let config = DiscoveryConfig::from_flags(flags)?;
    Ok(discovery::start(config).await?)
}
