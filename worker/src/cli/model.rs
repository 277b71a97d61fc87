//! `tandem model`: fetch, list, show. (Owned by the model-loading work.)

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Download the default model into the cache.
    Fetch,
}

pub fn run(_cmd: ModelCommand) -> anyhow::Result<()> {
    anyhow::bail!("tandem model is being built")
}
