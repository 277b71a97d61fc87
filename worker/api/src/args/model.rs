//! Which model a process serves, where its HTTP side listens, and `tandem model`.

use std::path::PathBuf;

/// Which model a process serves and where its HTTP side listens.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelHttpArgs {
    /// Model to serve: a cached name (see `tandem model list`), a `.gguf` file,
    /// a Hugging Face directory, or a Hub repository `ORG/REPO[@REVISION]`
    /// (also `hf://ORG/REPO[@REVISION]`). A repository is taken from the
    /// Hugging Face cache (HF_HUB_CACHE, else $HF_HOME/hub, else
    /// ~/.cache/huggingface/hub; shared with Python tools) without asking the
    /// Hub when that revision is there, and downloaded into it first otherwise
    /// (HF_ENDPOINT, HF_TOKEN; HF_HUB_OFFLINE=1 forbids downloading). Omitted:
    /// the default model (SmolLM2-135M-Instruct), fetched into the cache if
    /// missing.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,

    /// Address to listen on.
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// HTTP port (0 picks a free one; the log says which).
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Names clients may pass as `model`, comma-separated; the first is the one
    /// `/v1/models` lists and responses carry. Default: the model's own name;
    /// `default` is always accepted too.
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME", value_delimiter = ',')]
    pub served_model_name: Vec<String>,

    /// Longest sequence (prompt + generated tokens) a request may use.
    /// Default: the model's context length; larger is refused.
    #[arg(long, env = "TANDEM_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,

    /// Also export `/metrics` under a peer's names, so a dashboard or alert
    /// written for it works unmodified: `vllm` (`vllm:*`, label `model_name`)
    /// and/or `dynamo` (`dynamo_frontend_*`, `dynamo_component_kvstats_*`,
    /// label `model`), comma-separated. The `tandem_*` series are always
    /// exported; docs/metrics.md lists the mapping.
    #[arg(long, env = "TANDEM_METRICS_COMPAT", value_delimiter = ',', value_enum)]
    pub metrics_compat: Vec<crate::metrics::Compat>,

    /// Seconds in-flight requests may run after SIGTERM/SIGINT before the
    /// process exits anyway.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
}

impl ModelHttpArgs {
    pub fn listen_address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Download the default model into the cache (does nothing if it is there), or a
    /// Hugging Face repository (`hf://ORG/REPO[@REVISION]`) into the Hugging Face
    /// cache or a directory.
    ///
    /// From the Hub it fetches config.json, the tokenizer files, generation_config.json
    /// and the safetensors weights, sending HF_TOKEN (else the token `huggingface-cli
    /// login` saved) as a bearer token, from HF_ENDPOINT (default
    /// https://huggingface.co). Without --output the files go into the Hugging Face
    /// cache (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), laid out
    /// as Python's huggingface_hub lays it out; the Hub is asked where the revision is
    /// now, so this is how a cached branch moves forward (`--model ORG/REPO` alone
    /// uses the cached commit). Complete files are skipped and an interrupted
    /// download is continued, so a restarted fetch resumes.
    Fetch {
        /// The default model's name, or hf://ORG/REPO[@REVISION] (revision default: main).
        #[arg(default_value = super::DEFAULT_MODEL)]
        name: String,
        /// Where to put the model. For hf:// a plain directory to fill instead of
        /// the Hugging Face cache (what the operator's init container loads); for
        /// the default model its .gguf file is copied into this directory after it
        /// is in the cache.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// List the models in the cache (TANDEM_MODEL_DIR, default ~/.cache/tandem/models)
    /// and the Hugging Face cache's repositories Tandem can load (as ORG/REPO, or
    /// ORG/REPO@REF for refs other than main).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show what a model is: a cached name, a .gguf path or an HF directory.
    Show {
        model: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}
