//! `tandem bench`: a load generator for any OpenAI-compatible endpoint.
//!
//! Requests arrive as a Poisson process (`rate`) or from a fixed number of
//! closed-loop clients (`concurrency`), stream their tokens, and are timed
//! chunk by chunk; [`stats::Report`] turns the records into percentiles,
//! throughput and goodput.

pub mod client;
pub mod stats;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;

pub use client::Endpoint;
pub use stats::{Report, RequestRecord, Slo};
pub use workload::{LengthSpec, Prompt};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot read prompts from {path}: {reason}")]
    Prompts { path: String, reason: String },
    #[error("invalid benchmark settings: {0}")]
    Config(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Where prompts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptSource {
    /// Random words of a sampled length, with a unique prefix per request.
    Synthetic(LengthSpec),
    /// Prompts used in order, cycling when there are fewer than requests.
    Fixed(Vec<Prompt>),
}

/// How requests are issued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Open loop: Poisson arrivals at this many requests per second, with at
    /// most `max_in_flight` outstanding (none when `None`).
    Poisson {
        rate: f64,
        max_in_flight: Option<usize>,
    },
    /// Closed loop: this many clients, each sending its next request when the
    /// previous one ends.
    Concurrency(usize),
}

/// When the run ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    Requests(usize),
    /// No request starts after this much time; those in flight finish.
    Duration(Duration),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    /// Base URL of the server, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub prompts: PromptSource,
    pub output_len: LengthSpec,
    pub arrivals: Arrivals,
    pub stop: Stop,
    /// With [`Stop::Duration`]: how long requests still streaming when
    /// sending stops may go on; then they are cut off (cancelled) and count
    /// as errors, so an overloaded run ends on time and leaves the server
    /// idle. `None`: wait for every request.
    pub drain_timeout: Option<Duration>,
    pub slo: Slo,
    pub seed: u64,
    pub progress: bool,
    /// Fields merged into every request body (e.g. a `response_format`), over
    /// the ones the load generator sets.
    pub extra_body: serde_json::Map<String, serde_json::Value>,
}

impl BenchConfig {
    fn validate(&self) -> Result<(), BenchError> {
        match self.arrivals {
            Arrivals::Poisson { rate, .. } if !(rate.is_finite() && rate > 0.0) => {
                return Err(BenchError::Config(format!(
                    "--rate must be a positive number of requests per second, got {rate}"
                )))
            }
            Arrivals::Poisson {
                max_in_flight: Some(0),
                ..
            }
            | Arrivals::Concurrency(0) => {
                return Err(BenchError::Config(
                    "--concurrency must be at least 1".into(),
                ))
            }
            _ => {}
        }
        match self.stop {
            Stop::Requests(0) => {
                return Err(BenchError::Config(
                    "--num-requests must be at least 1".into(),
                ))
            }
            Stop::Duration(d) if d.is_zero() => {
                return Err(BenchError::Config("--duration must be positive".into()))
            }
            _ => {}
        }
        if self.drain_timeout.is_some() && !matches!(self.stop, Stop::Duration(_)) {
            return Err(BenchError::Config(
                "--drain-timeout needs --duration (it counts from the end of sending)".into(),
            ));
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(BenchError::Config(format!(
                "--url `{}` must start with http:// or https://",
                self.url
            )));
        }
        Ok(())
    }
}

/// Everything needed to send request number `index`, drawn up front from the
/// seeded generator so a run is reproducible whatever the timing.
struct Planned {
    body: serde_json::Value,
}

struct Planner {
    cfg: BenchConfig,
    rng: rand::rngs::StdRng,
    next: usize,
}

impl Planner {
    fn next(&mut self) -> Planned {
        let index = self.next;
        self.next += 1;
        let prompt = match &self.cfg.prompts {
            PromptSource::Synthetic(len) => {
                let n = len.sample(&mut self.rng);
                Prompt::Text(workload::synthetic_prompt(index, n, &mut self.rng))
            }
            PromptSource::Fixed(list) => list[index % list.len()].clone(),
        };
        let max_tokens = self.cfg.output_len.sample(&mut self.rng);
        Planned {
            body: client::with_extra(
                client::request_body(self.cfg.endpoint, &self.cfg.model, &prompt, max_tokens),
                &self.cfg.extra_body,
            ),
        }
    }

    /// Seconds until the next Poisson arrival.
    fn interarrival(&mut self, rate: f64) -> Duration {
        let u: f64 = self.rng.random();
        Duration::from_secs_f64(-(1.0 - u).ln() / rate)
    }
}

/// Runs the benchmark and returns its report.
pub async fn run(cfg: BenchConfig) -> Result<Report, BenchError> {
    cfg.validate()?;
    let client = reqwest::Client::builder()
        .timeout(client::REQUEST_TIMEOUT)
        .build()
        .map_err(|e| BenchError::Client(e.to_string()))?;
    let url: Arc<str> = format!("{}{}", cfg.url.trim_end_matches('/'), cfg.endpoint.path()).into();
    let progress = progress_bar(&cfg);
    let mut planner = Planner {
        rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
        cfg: cfg.clone(),
        next: 0,
    };
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<RequestRecord>();
    let start = Instant::now();
    let cut_off = match (cfg.stop, cfg.drain_timeout) {
        (Stop::Duration(d), Some(drain)) => Some(start + d + drain),
        _ => None,
    };
    let may_start = |sent: usize| match cfg.stop {
        Stop::Requests(n) => sent < n,
        Stop::Duration(d) => start.elapsed() < d,
    };
    let spawn = |planned: Planned, permit: Option<tokio::sync::OwnedSemaphorePermit>| {
        let (client, url, done, progress) = (
            client.clone(),
            url.clone(),
            done_tx.clone(),
            progress.clone(),
        );
        tokio::spawn(async move {
            let record = client::send(&client, &url, &planned.body, start, cut_off).await;
            drop(permit);
            progress.inc(1);
            let _ = done.send(record);
        });
    };

    let mut sent = 0;
    match cfg.arrivals {
        Arrivals::Poisson {
            rate,
            max_in_flight,
        } => {
            let limit = max_in_flight.map(|n| Arc::new(Semaphore::new(n)));
            let mut next_at = start;
            loop {
                next_at += planner.interarrival(rate);
                tokio::time::sleep_until(next_at.into()).await;
                if !may_start(sent) {
                    break;
                }
                let permit = match &limit {
                    Some(s) => Some(s.clone().acquire_owned().await.expect("never closed")),
                    None => None,
                };
                spawn(planner.next(), permit);
                sent += 1;
            }
        }
        Arrivals::Concurrency(n) => {
            let slots = Arc::new(Semaphore::new(n));
            while may_start(sent) {
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                if !may_start(sent) {
                    break;
                }
                spawn(planner.next(), Some(permit));
                sent += 1;
            }
        }
    }
    drop(done_tx);
    let mut records = Vec::with_capacity(sent);
    while let Some(r) = done_rx.recv().await {
        records.push(r);
    }
    let elapsed = start.elapsed();
    progress.finish_and_clear();
    Ok(Report::from_records(&records, elapsed, cfg.slo))
}

fn progress_bar(cfg: &BenchConfig) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    match cfg.stop {
        Stop::Requests(n) => ProgressBar::new(n as u64).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} requests, {elapsed} {msg}")
                .expect("valid template"),
        ),
        Stop::Duration(_) => {
            let bar = ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {pos} requests done, {elapsed}")
                    .expect("valid template"),
            );
            // Without a length the bar only moves on completions; keep it alive.
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        }
    }
}
