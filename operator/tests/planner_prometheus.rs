//! The planner's Prometheus client against a REAL Prometheus (the Debian package `prometheus`;
//! `make test` installs it). The test runs a tiny exporter on loopback serving the metrics
//! contract's series for one deployment, starts Prometheus scraping it every second, and reads
//! observations with the planner's own queries: the decision follows the series, and a dead
//! target stops the planner.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, Opts, Registry, TextEncoder,
};
use tandem_operator::planner::{
    decide, unix_now_s, PlannerConfig, PlannerState, Slo, TierBounds, TierCounts,
};
use tandem_operator::prometheus::{PrometheusSource, Scope};

#[path = "common/prometheus.rs"]
mod prometheus_support;
use prometheus_support::{free_port, Prometheus};

/// What the synthetic deployment is doing right now.
#[derive(Clone, Copy)]
struct Load {
    requests_per_s: f64,
    ttft_s: f64,
    itl_s: f64,
    prefill_queue: f64,
}

/// The series of one tier's pods, as the real processes name them.
struct Tier {
    registry: Registry,
}

impl Tier {
    fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }
}

struct Exporter {
    frontend: Tier,
    prefill: Tier,
    decode: Tier,
    requests: IntCounter,
    ttft: Histogram,
    itl: Histogram,
    input: Histogram,
    output: Histogram,
    queue: Gauge,
    prefill_tokens: IntCounter,
    decode_tokens: IntCounter,
}

fn histogram(registry: &Registry, name: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, name).buckets(buckets)).unwrap();
    registry.register(Box::new(h.clone())).unwrap();
    h
}

fn counter(registry: &Registry, name: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(name, name)).unwrap();
    registry.register(Box::new(c.clone())).unwrap();
    c
}

fn gauge(registry: &Registry, name: &str) -> Gauge {
    let g = Gauge::with_opts(Opts::new(name, name)).unwrap();
    registry.register(Box::new(g.clone())).unwrap();
    g
}

impl Exporter {
    fn new() -> Self {
        let latency = vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0];
        let tokens = vec![16.0, 64.0, 256.0, 1024.0, 4096.0];
        let (f, p, d) = (Registry::new(), Registry::new(), Registry::new());
        let exporter = Exporter {
            requests: counter(&f, "tandem_frontend_requests_total"),
            ttft: histogram(
                &f,
                "tandem_frontend_time_to_first_token_seconds",
                latency.clone(),
            ),
            itl: histogram(&f, "tandem_frontend_inter_token_latency_seconds", latency),
            input: histogram(&f, "tandem_frontend_input_tokens", tokens.clone()),
            output: histogram(&f, "tandem_frontend_output_tokens", tokens),
            queue: gauge(&p, "tandem_worker_queue_depth"),
            prefill_tokens: counter(&p, "tandem_worker_prefill_tokens_total"),
            decode_tokens: counter(&d, "tandem_worker_decode_tokens_total"),
            frontend: Tier { registry: f },
            prefill: Tier { registry: p },
            decode: Tier { registry: d },
        };
        gauge(&exporter.decode.registry, "tandem_worker_kv_blocks_used").set(512.0);
        gauge(&exporter.decode.registry, "tandem_worker_kv_blocks_total").set(1024.0);
        exporter
    }

    /// `requests` at `load`: 1000-token prompts, 100-token outputs.
    fn serve(&self, load: Load, requests: u64) {
        for _ in 0..requests {
            self.requests.inc();
            self.ttft.observe(load.ttft_s);
            self.itl.observe(load.itl_s);
            self.input.observe(1000.0);
            self.output.observe(100.0);
        }
        self.prefill_tokens.inc_by(requests * 1000);
        self.decode_tokens.inc_by(requests * 100);
        self.queue.set(load.prefill_queue);
    }
}

/// Serves `/frontend`, `/prefill`, `/decode` on loopback while it lives, generating traffic at
/// the current `Load` ten times a second.
async fn start_exporter(load: Arc<Mutex<Load>>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::routing::get;
    let exporter = Arc::new(Exporter::new());
    let ticking = exporter.clone();
    let traffic = tokio::spawn(async move {
        // Requests follow wall time, however late a busy machine wakes this loop.
        let started = Instant::now();
        let mut served_s = 0.0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = *load.lock().unwrap();
            let elapsed = started.elapsed().as_secs_f64();
            let due = ((elapsed * now.requests_per_s).floor()
                - (served_s * now.requests_per_s).floor())
            .max(0.0);
            ticking.serve(now, due as u64);
            served_s = elapsed;
        }
    });
    let (f, p, d) = (exporter.clone(), exporter.clone(), exporter);
    let app = axum::Router::new()
        .route("/frontend", get(move || async move { f.frontend.render() }))
        .route("/prefill", get(move || async move { p.prefill.render() }))
        .route("/decode", get(move || async move { d.decode.render() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let serving = axum::serve(listener, app);
        let _traffic = AbortOnDrop(traffic);
        serving.await.unwrap();
    });
    (addr, server)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The scratch directory of this test's Prometheus, removed on drop (declare it before the
/// process, which then stops first).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts Prometheus scraping the exporter's three tiers as the scrape job in
/// `manifests/prometheus/scrape-config.yaml` labels real pods: `namespace`, `deployment`, `tier`.
async fn start_prometheus(exporter: SocketAddr, dir: &Path) -> Prometheus {
    let jobs: String = ["frontend", "prefill", "decode"]
        .iter()
        .map(|tier| {
            format!(
                "- job_name: {tier}\n  metrics_path: /{tier}\n  static_configs:\n  - targets: ['{exporter}']\n    labels: {{namespace: prod, deployment: llama, tier: {tier}}}\n"
            )
        })
        .collect();
    let prometheus = Prometheus::start(dir, &jobs, free_port());
    prometheus.wait_ready(Duration::from_secs(30)).await;
    prometheus
}

fn config() -> PlannerConfig {
    PlannerConfig::new(
        Slo {
            ttft_p90_s: 0.5,
            itl_p90_s: 0.05,
        },
        TierBounds { min: 1, max: 8 },
        TierBounds { min: 1, max: 8 },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planner_reads_a_real_prometheus_and_its_decision_follows_the_series() {
    let overloaded = Load {
        requests_per_s: 20.0,
        ttft_s: 1.5,
        itl_s: 0.02,
        prefill_queue: 30.0,
    };
    let load = Arc::new(Mutex::new(overloaded));
    let (exporter, server) = start_exporter(load.clone()).await;
    let scratch =
        Scratch(std::env::temp_dir().join(format!("tandem-planner-prom-{}", std::process::id())));
    let prometheus = start_prometheus(exporter, &scratch.0).await;
    let source = PrometheusSource::new(&prometheus.url).unwrap();
    let scope = Scope {
        namespace: "prod".into(),
        deployment: "llama".into(),
        window_s: 5,
    };

    // Prometheus hands static targets to its scrapers a few seconds after it is ready: wait for
    // the first scrapes, then for the 5 s window to fill.
    let deadline = Instant::now() + Duration::from_secs(30);
    while source
        .observe(&scope)
        .await
        .expect("query")
        .ttft_p90_s
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "no scrape of the exporter in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    let seen = source.observe(&scope).await.expect("query");
    let ttft = seen.ttft_p90_s.expect("TTFT p90");
    assert!(
        (1.0..=2.0).contains(&ttft),
        "TTFT p90 {ttft} (observed 1.5 s)"
    );
    let itl = seen.itl_p90_s.expect("ITL p90");
    assert!(
        (0.01..=0.025).contains(&itl),
        "ITL p90 {itl} (observed 0.02 s)"
    );
    let rate = seen.request_rate.expect("request rate");

    assert!(
        (15.0..=25.0).contains(&rate),
        "request rate {rate} (sent 20/s)"
    );
    assert_eq!(seen.mean_input_tokens.map(f64::round), Some(1000.0));
    assert_eq!(seen.mean_output_tokens.map(f64::round), Some(100.0));
    assert_eq!(seen.prefill_queue_depth, Some(30.0));
    assert_eq!(seen.decode_kv_utilization, Some(0.5));
    let prefill_tps = seen.prefill_tokens_per_s.expect("prefill tokens/s");
    assert!(
        (prefill_tps / rate - 1000.0).abs() < 100.0,
        "{prefill_tps} vs {rate}"
    );
    assert!(
        unix_now_s() - seen.timestamp_s < 5.0,
        "the newest scrape is fresh: {}",
        seen.timestamp_s
    );

    let config = config();
    let mut state = PlannerState::default();
    let current = TierCounts {
        prefill: 2,
        decode: 2,
    };
    let mut observed = seen.clone();
    observed.ready = current;
    let decision = decide(&config, &mut state, &observed, current, unix_now_s());
    assert!(
        decision.desired.prefill > 2,
        "a 1.5 s TTFT p90 against 500 ms grows prefill: {}",
        decision.reason
    );
    assert_eq!(
        decision.desired.decode, 2,
        "decode meets its SLO: {}",
        decision.reason
    );

    // The deployment recovers: fast first tokens, nothing queued.
    *load.lock().unwrap() = Load {
        ttft_s: 0.08,
        prefill_queue: 0.0,
        ..overloaded
    };
    tokio::time::sleep(Duration::from_secs(7)).await;
    let seen = source.observe(&scope).await.expect("query");
    let ttft = seen.ttft_p90_s.expect("TTFT p90");
    assert!(
        ttft < 0.1,
        "TTFT p90 {ttft} after recovery (observed 0.08 s)"
    );
    let grown = decision.desired;
    let mut observed = seen;
    observed.ready = grown;
    let after = decide(&config, &mut state, &observed, grown, unix_now_s());
    assert!(after.refusal.is_none(), "{}", after.reason);
    assert!(
        after.desired.prefill <= grown.prefill,
        "no further growth once TTFT is back under the SLO: {}",
        after.reason
    );

    // Traffic stops: no prompt arrives in the window. The arrival rate reads 0 and the
    // latencies and mean lengths have no value: an observation of no traffic, not missing data.
    *load.lock().unwrap() = Load {
        requests_per_s: 0.0,
        ..overloaded
    };
    tokio::time::sleep(Duration::from_secs(7)).await;
    let seen = source.observe(&scope).await.expect("query");
    assert_eq!(seen.request_rate, Some(0.0), "{seen:?}");
    assert_eq!(seen.ttft_p90_s, None, "{seen:?}");
    assert_eq!(seen.mean_output_tokens, None, "{seen:?}");
    let mut observed = seen;
    observed.ready = grown;
    let idle = decide(&config, &mut state, &observed, grown, unix_now_s());
    assert!(idle.refusal.is_none(), "{}", idle.reason);
    assert!(idle.reason.contains("no traffic"), "{}", idle.reason);

    // The pods disappear: no successful scrape, so the planner refuses to act.
    server.abort();
    let _ = server.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = source.observe(&scope).await.expect("query");
    let refused = decide(&config, &mut state, &seen, grown, unix_now_s());
    assert_eq!(refused.desired, grown, "{}", refused.reason);
    let refusal = refused.refusal.expect("a refusal for the status condition");
    assert_eq!(refusal.reason, "MetricsMissing", "{}", refusal.message);
}
