//! How a role finds the workers of the tier it calls: decode workers find prefill workers,
//! the frontend finds decode workers.

use std::fmt;
use std::path::PathBuf;

/// `--discovery`: where a tier's worker addresses come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryMode {
    /// A fixed list of addresses (`--decode-workers` / `--prefill-workers`).
    Static,
    /// The endpoints file `tandem local` writes (`--endpoints-file`).
    File,
    /// The EndpointSlices of the tier's headless Service
    /// (`--decode-service` / `--prefill-service`).
    Kubernetes,
}

impl DiscoveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DiscoveryMode::Static => "static",
            DiscoveryMode::File => "file",
            DiscoveryMode::Kubernetes => "kubernetes",
        }
    }
}

impl fmt::Display for DiscoveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a decode worker finds prefill workers.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefillDiscoveryArgs {
    /// Where prefill workers are found: `static` (`--prefill-workers`), `file`
    /// (`--endpoints-file`), `kubernetes` (`--prefill-service`).
    #[arg(long, env = "TANDEM_DISCOVERY", value_enum, default_value = "static")]
    pub discovery: DiscoveryMode,

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
    pub discovery: DiscoveryMode,

    /// The decode tier's headless Service (with `--discovery kubernetes`).
    #[arg(long, env = "TANDEM_DECODE_SERVICE")]
    pub decode_service: Option<String>,

    /// `tandem local`'s endpoints file (with `--discovery file`).
    #[arg(long, env = "TANDEM_ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,
}
