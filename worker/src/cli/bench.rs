//! `tandem bench`: flags, then [`tandem_loadgen::run`], then the table and JSON.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use tandem_loadgen::{
    self as bench, self, workload, Arrivals, BenchConfig, Endpoint, LengthSpec, PromptSource, Slo,
    Stop,
};

/// Load-test an OpenAI endpoint: TTFT, ITL and E2E percentiles, throughput, goodput.
///
/// Every request streams; TTFT, each inter-token gap (ITL) and end-to-end
/// time are measured per request.
/// Synthetic prompts are random common English words (about one token each)
/// after a prefix unique to each request, so a server's prefix cache cannot
/// reuse one request's prompt for another and flatter the results. Output
/// length is enforced with `max_tokens` and `ignore_eos: true`.
///
/// ITL is every gap between streamed content chunks; a request meets the ITL
/// SLO when the mean of its gaps is within it. Goodput counts requests per
/// second meeting both SLOs. The JSON report lists every request too (send
/// time, TTFT, every gap, error), to recompute any of it offline.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Base URL of the server (the API paths are appended).
    #[arg(
        long,
        env = "TANDEM_BENCH_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub url: String,
    /// Model name sent in each request.
    #[arg(long, env = "TANDEM_BENCH_MODEL", default_value = "default")]
    pub model: String,
    #[arg(
        long,
        value_enum,
        env = "TANDEM_BENCH_ENDPOINT",
        default_value = "chat"
    )]
    pub endpoint: Endpoint,
    /// Poisson arrivals at this many requests per second (open loop);
    /// `--concurrency` then caps the requests in flight.
    #[arg(long, env = "TANDEM_BENCH_RATE")]
    pub rate: Option<f64>,
    /// Clients sending back to back (closed loop; default 1 without `--rate`).
    #[arg(long, env = "TANDEM_BENCH_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Prompt length in tokens: N or uniform:MIN:MAX (synthetic prompts).
    #[arg(long, env = "TANDEM_BENCH_INPUT_LEN", default_value = "512")]
    pub input_len: LengthSpec,
    /// Output length in tokens: N or uniform:MIN:MAX.
    #[arg(long, env = "TANDEM_BENCH_OUTPUT_LEN", default_value = "128")]
    pub output_len: LengthSpec,
    /// Prompts from a JSONL file instead: one {"prompt": ...} or
    /// {"messages": [...]} per line, used in order and cycled.
    #[arg(long, env = "TANDEM_BENCH_PROMPTS", conflicts_with = "input_len")]
    pub prompts: Option<PathBuf>,
    /// Requests to send (default 100 without `--duration`).
    #[arg(long, env = "TANDEM_BENCH_NUM_REQUESTS", conflicts_with = "duration")]
    pub num_requests: Option<usize>,
    /// Send requests for this many seconds, then wait for those in flight.
    #[arg(long, env = "TANDEM_BENCH_DURATION")]
    pub duration: Option<f64>,
    /// With `--duration`: requests still streaming this many seconds after
    /// sending stopped are cut off (cancelled) and count as errors, so an
    /// overloaded run ends on time and leaves the server idle.
    #[arg(long, env = "TANDEM_BENCH_DRAIN_TIMEOUT", requires = "duration")]
    pub drain_timeout: Option<f64>,
    /// Time-to-first-token objective in milliseconds.
    #[arg(long, env = "TANDEM_BENCH_SLO_TTFT_MS")]
    pub slo_ttft_ms: Option<f64>,
    /// Inter-token latency objective in milliseconds (per-request mean).
    #[arg(long, env = "TANDEM_BENCH_SLO_ITL_MS")]
    pub slo_itl_ms: Option<f64>,
    /// Write the report as JSON here too.
    #[arg(long, env = "TANDEM_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Seed for prompt words, lengths and arrival times.
    #[arg(long, env = "TANDEM_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// A JSON object whose fields are set in every request body, over the
    /// ones `bench` sets: e.g. `{"response_format": {"type": "json_object"}}`
    /// to measure constrained decoding. `@FILE` reads it from a file.
    #[arg(long, env = "TANDEM_BENCH_EXTRA_BODY", value_name = "JSON|@FILE")]
    pub extra_body: Option<String>,
}

impl BenchArgs {
    fn extra_body(&self) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        let Some(arg) = &self.extra_body else {
            return Ok(Default::default());
        };
        let text = match arg.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading --extra-body from {path}"))?,
            None => arg.clone(),
        };
        match serde_json::from_str(&text) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            Ok(_) => anyhow::bail!("--extra-body must be a JSON object"),
            Err(e) => anyhow::bail!("--extra-body is not JSON: {e}"),
        }
    }

    pub fn to_config(&self) -> anyhow::Result<BenchConfig> {
        let prompts = match &self.prompts {
            Some(path) => PromptSource::Fixed(workload::read_prompts(path)?),
            None => PromptSource::Synthetic(self.input_len),
        };
        let arrivals = match (self.rate, self.concurrency) {
            (Some(rate), max_in_flight) => Arrivals::Poisson {
                rate,
                max_in_flight,
            },
            (None, n) => Arrivals::Concurrency(n.unwrap_or(1)),
        };
        let stop = match (self.num_requests, self.duration) {
            (_, Some(secs)) => Stop::Duration(
                Duration::try_from_secs_f64(secs)
                    .map_err(|_| anyhow::anyhow!("--duration {secs} is not a number of seconds"))?,
            ),
            (n, None) => Stop::Requests(n.unwrap_or(100)),
        };
        let drain_timeout = self
            .drain_timeout
            .map(|secs| {
                Duration::try_from_secs_f64(secs).map_err(|_| {
                    anyhow::anyhow!("--drain-timeout {secs} is not a number of seconds")
                })
            })
            .transpose()?;
        Ok(BenchConfig {
            url: self.url.clone(),
            model: self.model.clone(),
            endpoint: self.endpoint,
            prompts,
            output_len: self.output_len,
            arrivals,
            stop,
            drain_timeout,
            slo: Slo {
                ttft_ms: self.slo_ttft_ms,
                itl_ms: self.slo_itl_ms,
            },
            seed: self.seed,
            progress: !self.quiet,
            extra_body: self.extra_body()?,
        })
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let cfg = args.to_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(bench::run(cfg))?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if report.succeeded == 0 {
        anyhow::bail!("every request failed; is the server at {} up?", args.url);
    }
    Ok(())
}
