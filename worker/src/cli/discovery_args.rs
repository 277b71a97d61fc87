//! How a role finds the workers of the tier it calls: decode workers find prefill workers,
//! the frontend finds decode workers. The flags are `tandem_api::args`'.

use std::collections::BTreeSet;

use tokio::sync::watch;

pub use tandem_api::args::{DecodeDiscoveryArgs, DiscoveryMode, PrefillDiscoveryArgs};

use tandem_disagg::discovery::{self, DiscoveryConfig, DiscoveryFlags, Role};

/// The prefill workers a decode worker may call, kept current.
pub async fn prefill_membership(
    args: &PrefillDiscoveryArgs,
    static_list: &[String],
) -> anyhow::Result<watch::Receiver<BTreeSet<String>>> {
    membership(DiscoveryFlags {
        mode: Some(args.discovery),
        workers: static_list.to_vec(),
        service: args.prefill_service.clone(),
        endpoints_file: args.endpoints_file.clone(),
        ..DiscoveryFlags::new(Role::Prefill)
    })
    .await
}

/// The decode workers the frontend may route to, kept current.
pub async fn decode_membership(
    args: &DecodeDiscoveryArgs,
    static_list: &[String],
) -> anyhow::Result<watch::Receiver<BTreeSet<String>>> {
    membership(DiscoveryFlags {
        mode: Some(args.discovery),
        workers: static_list.to_vec(),
        service: args.decode_service.clone(),
        endpoints_file: args.endpoints_file.clone(),
        ..DiscoveryFlags::new(Role::Decode)
    })
    .await
}

async fn membership(flags: DiscoveryFlags) -> anyhow::Result<watch::Receiver<BTreeSet<String>>> {
    let config = DiscoveryConfig::from_flags(flags)?;
    Ok(discovery::start(config).await?)
}
