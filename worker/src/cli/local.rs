//! `tandem local`: flags to [`LocalConfig`], then the supervisor in
//! [`tandem_disagg::local`] until Ctrl-C or SIGTERM.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use tandem_disagg::local::{self, LocalConfig, ScrapeTargets};
use tandem_disagg::router::RouterMode;

/// A whole disaggregated deployment on this machine: a frontend, N prefill
/// and M decode workers as child processes on loopback, supervised.
///
/// Workers start first; once each answers /health, the frontend starts on
/// --port. The decode workers and the frontend find their peers through the
/// endpoints file (--endpoints-file), which this process rewrites whenever a
/// process starts, becomes ready, dies or is stopped: a crashed worker is
/// restarted (same ports, growing backoff) and rejoins without restarting
/// anyone else. Ctrl-C or SIGTERM stops the frontend, then the decode, then
/// the prefill workers (SIGTERM, SIGKILL after --shutdown-grace-secs) and
/// exits 0.
///
/// Extra flags for the children go through --prefill-arg, --decode-arg,
/// --worker-arg (both worker roles) and --frontend-arg. Each takes one
/// string, split on whitespace into arguments (no quoting), and may repeat:
/// `--decode-arg '--threads 1' --worker-arg '--kv-cache-memory 256MiB'`.
/// `{index}` in any of them becomes the child's index within its role, for
/// per-replica settings: `--decode-arg '--device cuda:{index}'` puts each
/// decode worker on its own GPU; `{index*K}` is the index times K, so
/// `--decode-arg '--device cuda:{index*2} --tensor-parallel-size 2'` gives each
/// decode worker its own pair of GPUs.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// Prefill workers to start.
    #[arg(long, env = "TANDEM_LOCAL_PREFILL", default_value_t = 1)]
    pub prefill: usize,

    /// Decode workers to start (at least 1).
    #[arg(long, env = "TANDEM_LOCAL_DECODE", default_value_t = 1)]
    pub decode: usize,

    /// Model for every process (see `tandem serve --model`). Omitted: the
    /// default model. A Hub repository is downloaded by this process before
    /// any child starts.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,

    /// Names clients may pass as `model`, comma-separated (as for `tandem serve`).
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Also export every process's `/metrics` under a peer's names: `vllm`
    /// and/or `dynamo`, comma-separated (see `tandem serve --metrics-compat`).
    #[arg(long, env = "TANDEM_METRICS_COMPAT", value_delimiter = ',', value_enum)]
    pub metrics_compat: Vec<tandem_api::metrics::Compat>,

    /// Longest sequence a request may use, for every process.
    #[arg(long, env = "TANDEM_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,

    /// The frontend's port: the OpenAI API (0 picks a free one).
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Where to write the endpoints JSON (role, index, pid, http, grpc, up of
    /// every process). Default: a file in the temporary directory. Removed on
    /// exit.
    #[arg(long, env = "TANDEM_LOCAL_ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,

    /// How the frontend picks a decode worker.
    #[arg(long, env = "TANDEM_ROUTER_MODE", value_enum, default_value_t = RouterMode::Kv)]
    pub router_mode: RouterMode,

    /// Passed to the decode workers: prompts with at least this many uncached
    /// tokens are prefilled remotely. Default: the decode worker's own.
    #[arg(long, env = "TANDEM_REMOTE_PREFILL_MIN_TOKENS")]
    pub remote_prefill_min_tokens: Option<usize>,

    /// A Jinja chat template file that replaces the model's own (see `tandem
    /// serve --chat-template`); checked here before anything starts and passed
    /// to the frontend, which renders the templates, by its absolute path.
    #[arg(long, env = "TANDEM_CHAT_TEMPLATE", value_name = "FILE")]
    pub chat_template: Option<PathBuf>,

    /// More arguments for the prefill workers (split on whitespace; repeatable).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub prefill_arg: Vec<String>,

    /// More arguments for the decode workers (split on whitespace; repeatable).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub decode_arg: Vec<String>,

    /// More arguments for prefill and decode workers alike (split on
    /// whitespace; repeatable).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub worker_arg: Vec<String>,

    /// More arguments for the frontend (split on whitespace; repeatable).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub frontend_arg: Vec<String>,

    /// Write each process's output to DIR/<role>-<index>.log (appended across
    /// restarts) instead of prefixed lines on stderr.
    #[arg(long, env = "TANDEM_LOCAL_LOG_DIR", value_name = "DIR")]
    pub log_dir: Option<PathBuf>,

    /// Serve the control endpoint on this loopback port: `GET /tiers`, and
    /// `PUT /tiers/{prefill|decode}` with `{"replicas": N}` to start or stop
    /// workers (the highest index stops first). Default: no endpoint.
    #[arg(long, env = "TANDEM_LOCAL_CONTROL_PORT")]
    pub control_port: Option<u16>,

    /// Write a Prometheus file-based service discovery file here
    /// (`file_sd_configs`): one target group per process that is up, labelled
    /// `namespace`, `deployment` (the two flags below), `tier` and `pod`, as the
    /// Kubernetes scrape job labels pods, so the planner (`planner-local`)
    /// reads this deployment with its usual queries. Rewritten atomically as
    /// processes come and go; removed on exit. Default: none.
    #[arg(long, env = "TANDEM_LOCAL_PROMETHEUS_SD_FILE", value_name = "PATH")]
    pub prometheus_sd_file: Option<PathBuf>,

    /// `namespace` label of the scrape targets (--prometheus-sd-file).
    #[arg(long, env = "TANDEM_LOCAL_NAMESPACE", default_value = "local")]
    pub namespace: String,

    /// `deployment` label of the scrape targets (--prometheus-sd-file).
    #[arg(long, env = "TANDEM_LOCAL_DEPLOYMENT", default_value = "local")]
    pub deployment: String,

    /// Seconds a stopped process may drain after SIGTERM before SIGKILL.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Seconds start-up may wait for every process to answer /health.
    #[arg(long, env = "TANDEM_LOCAL_READY_TIMEOUT_SECS", default_value_t = 600)]
    pub ready_timeout_secs: u64,
}

pub fn run(args: LocalArgs, log_format: tandem_telemetry::LogFormat) -> anyhow::Result<()> {
    let program = std::env::current_exe().context("finding the tandem binary to start")?;
    let mut config = config(&args, program)?;
    // Every process logs as this one does (with --log-dir, one JSON file per process).
    config
        .common_args
        .extend(["--log-format".to_string(), log_format.as_str().to_string()]);
    // Once here, before any child starts: a Hub repository (or the default
    // model) is downloaded by this process, with one progress display, and
    // every child then finds it in the cache without asking the Hub.
    tandem_model::resolve(args.model.as_deref()).context("--model")?;
    super::common::runtime()?.block_on(local::run(config, super::common::shutdown_signal()))?;
    Ok(())
}

fn split_args(groups: &[&[String]]) -> Vec<String> {
    groups
        .iter()
        .flat_map(|g| g.iter())
        .flat_map(|a| a.split_whitespace())
        .map(String::from)
        .collect()
}

fn config(args: &LocalArgs, program: PathBuf) -> anyhow::Result<LocalConfig> {
    let endpoints_file = args.endpoints_file.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tandem-local-{}.json", std::process::id()))
    });
    let mut config = LocalConfig::new(program, args.prefill, args.decode, endpoints_file);
    config.host = IpAddr::V4(Ipv4Addr::LOCALHOST);
    config.frontend_port = args.port;
    let mut common = Vec::new();
    if let Some(model) = &args.model {
        common.extend(["--model".to_string(), model.clone()]);
    }
    if let Some(names) = &args.served_model_name {
        common.extend(["--served-model-name".to_string(), names.clone()]);
    }
    if !args.metrics_compat.is_empty() {
        let names: Vec<String> = args
            .metrics_compat
            .iter()
            .map(|c| {
                clap::ValueEnum::to_possible_value(c)
                    .expect("every peer has a name")
                    .get_name()
                    .to_string()
            })
            .collect();
        common.extend(["--metrics-compat".to_string(), names.join(",")]);
    }
    if let Some(len) = args.max_model_len {
        common.extend(["--max-model-len".to_string(), len.to_string()]);
    }
    common.extend([
        "--shutdown-grace-secs".to_string(),
        args.shutdown_grace_secs.to_string(),
    ]);
    config.common_args = common;
    config.prefill_args = split_args(&[&args.worker_arg, &args.prefill_arg]);
    let mut decode = Vec::new();
    if let Some(min) = args.remote_prefill_min_tokens {
        decode.extend(["--remote-prefill-min-tokens".to_string(), min.to_string()]);
    }
    decode.extend(split_args(&[&args.worker_arg, &args.decode_arg]));
    config.decode_args = decode;
    let mut frontend = vec![
        "--router-mode".to_string(),
        args.router_mode.as_str().to_string(),
    ];
    if let Some(file) = &args.chat_template {
        // The children may not share this process's working directory.
        let file = std::path::absolute(file)
            .with_context(|| format!("--chat-template {}", file.display()))?;
        tandem_model::read_chat_template(&file).context("--chat-template")?;
        frontend.extend(["--chat-template".to_string(), file.display().to_string()]);
    }
    frontend.extend(split_args(&[&args.frontend_arg]));
    config.frontend_args = frontend;
    config.log_dir = args.log_dir.clone();
    config.control_port = args.control_port;
    config.scrape_targets = args.prometheus_sd_file.clone().map(|path| ScrapeTargets {
        path,
        namespace: args.namespace.clone(),
        deployment: args.deployment.clone(),
    });
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    config.ready_timeout = Duration::from_secs(args.ready_timeout_secs);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> LocalArgs {
        let cli = crate::cli::Cli::try_parse_from(["tandem", "local"].iter().chain(args)).unwrap();
        let crate::cli::Command::Local(args) = cli.command else {
            panic!("local")
        };
        args
    }

    #[test]
    fn flags_become_the_children_arguments() {
        let args = parse(&[
            "--prefill",
            "2",
            "--decode",
            "3",
            "--model",
            "smol.gguf",
            "--remote-prefill-min-tokens",
            "64",
            "--router-mode",
            "round-robin",
            "--decode-arg",
            "--threads 1",
            "--worker-arg=--kv-cache-memory 256MiB",
            "--frontend-arg",
            "--migration-limit 2",
            "--endpoints-file",
            "/tmp/e.json",
            "--shutdown-grace-secs",
            "5",
        ]);
        let config = config(&args, "/bin/tandem".into()).unwrap();
        assert_eq!((config.prefill, config.decode), (2, 3));
        assert_eq!(config.endpoints_file, PathBuf::from("/tmp/e.json"));
        assert_eq!(
            config.common_args,
            ["--model", "smol.gguf", "--shutdown-grace-secs", "5"]
        );
        assert_eq!(config.prefill_args, ["--kv-cache-memory", "256MiB"]);
        assert_eq!(
            config.decode_args,
            [
                "--remote-prefill-min-tokens",
                "64",
                "--kv-cache-memory",
                "256MiB",
                "--threads",
                "1"
            ]
        );
        assert_eq!(
            config.frontend_args,
            ["--router-mode", "round-robin", "--migration-limit", "2"]
        );
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));
        assert_eq!(config.scrape_targets, None);
    }

    #[test]
    fn the_scrape_targets_file_carries_the_deployment_labels() {
        let args = parse(&[
            "--prometheus-sd-file",
            "/tmp/t.json",
            "--deployment",
            "smol",
        ]);
        let config = config(&args, "/bin/tandem".into()).unwrap();
        assert_eq!(
            config.scrape_targets,
            Some(ScrapeTargets {
                path: "/tmp/t.json".into(),
                namespace: "local".into(),
                deployment: "smol".into(),
            })
        );
    }

    #[test]
    fn a_chat_template_is_checked_and_reaches_the_frontend_by_absolute_path() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.jinja");
        std::fs::write(&good, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
        let args = parse(&["--chat-template", good.to_str().unwrap()]);
        let local = config(&args, "/bin/tandem".into()).unwrap();
        assert_eq!(
            local.frontend_args,
            [
                "--router-mode",
                "kv",
                "--chat-template",
                good.to_str().unwrap()
            ]
        );
        assert!(local.prefill_args.is_empty() && local.decode_args.is_empty());

        let bad = dir.path().join("bad.jinja");
        std::fs::write(&bad, "{% for m in messages %}{{ m.content }}").unwrap();
        let args = parse(&["--chat-template", bad.to_str().unwrap()]);
        let err = format!("{:#}", config(&args, "/bin/tandem".into()).unwrap_err());
        assert!(
            err.contains("bad.jinja") && err.contains("does not compile"),
            "{err}"
        );
        let args = parse(&["--chat-template", "/nonexistent/t.jinja"]);
        let err = format!("{:#}", config(&args, "/bin/tandem".into()).unwrap_err());
        assert!(err.contains("/nonexistent/t.jinja"), "{err}");
    }

    #[test]
    fn defaults_are_one_of_each_on_port_8000() {
        let args = parse(&[]);
        let config = config(&args, "/bin/tandem".into()).unwrap();
        assert_eq!((config.prefill, config.decode), (1, 1));
        assert_eq!(config.frontend_port, 8000);
        assert_eq!(config.control_port, None);
        assert_eq!(config.frontend_args, ["--router-mode", "kv"]);
        assert!(config.decode_args.is_empty());
        assert!(config.endpoints_file.starts_with(std::env::temp_dir()));
    }
}
