//! `tandem serve`: the aggregated server. (Owned by the server work.)

#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("tandem serve is being built")
}
