//! The planner's real local loop: a real `tandem local --prefill 1 --decode 1` with the default
//! model, a real Prometheus (the Debian package, on loopback) scraping its processes every second
//! through the `--prometheus-sd-file` targets, and the planner ([`LocalPlanner`], the loop
//! `planner-local` runs) resizing the tiers through the control endpoint. A load step from
//! `tandem bench` (long prompts, many in flight) breaks the TTFT SLO: the prefill tier, the one
//! that limits TTFT, grows and its new worker becomes ready while decode, within its ITL SLO,
//! stays; when the load ends, prefill goes back to one.
//!
//! The binary is `$TANDEM_BIN` (`make test` points it at the release build), else the `tandem`
//! beside this test's target directory. The default model must be in the cache (`make model`).
//! Ignored in unoptimized builds (a debug engine takes about half a minute per answer;
//! `-- --ignored` with `TANDEM_BIN` set to a release build runs it anyway).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/prometheus.rs"]
mod prometheus_support;
use prometheus_support::{free_port, Prometheus};
use tandem_operator::planner::local::{LocalPlanner, LocalTarget};
use tandem_operator::planner::{PlannerConfig, Slo, TierBounds};
use tandem_operator::prometheus::{PrometheusSource, Scope};

/// Seconds between planner decisions: short, so the test sees several within a load step.
const INTERVAL_S: f64 = 3.0;

/// The SLOs. This machine has two cores shared with other work, so the margins are wide
/// (measured with this test's settings while the machine ran other builds, load average 6-20):
/// - TTFT 2.5 s: an idle 1P+1D deployment gives a 200-token prompt its first token in about
///   0.9 s (p90 of single requests), well under; the load step keeps 6 such prompts in flight
///   against one single-threaded prefill worker, so each waits for the ones ahead of it and the
///   p90 goes to 5-20 s (with the machine's other load), far over.
/// - ITL 3 s: decode generates 4 tokens per request and prefills nothing itself (every prompt
///   goes to the prefill tier, see below); its p90 gap stays around 0.1 s, so the ITL SLO does
///   not break and decode is not the tier that limits the SLO.
const TTFT_SLO_S: f64 = 2.5;
const ITL_SLO_S: f64 = 3.0;

/// The load step: `tandem bench` closed loop. Prompts of 64 tokens or more are prefilled on the
/// prefill tier (`--remote-prefill-min-tokens 64`; the default 256 would keep these on decode),
/// and the decode worker waits for a prefill worker however long its queue
/// (`--prefill-max-queue 64`; by default it prefills locally past 4 queued, and a 200-token
/// prefill on decode's core stalls every running sequence's next token for a second or more).
const LOAD_CONCURRENCY: usize = 6;
const LOAD_INPUT_TOKENS: usize = 200;
const LOAD_OUTPUT_TOKENS: usize = 4;
const LOAD_SECONDS: u64 = 40;

/// Range of the planner's queries. The request rate counts arrivals, but TTFT, ITL and output
/// length are observed only as requests get tokens and finish, and under the load step each
/// one takes several seconds, so the window must hold several answers or the planner sees
/// `MetricsMissing` (at 6 in flight, 20 s holds about ten even when TTFT reaches 10 s).
const WINDOW_S: u64 = 20;

/// Longest the whole deployment may take to load the model and answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(180);

fn tandem_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TANDEM_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<this test> → target/<profile>/tandem (`cargo test --workspace`
    // builds it).
    let exe = std::env::current_exe().expect("the test's own path");
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("tandem"))
        .filter(|p| p.is_file());
    beside.expect("set TANDEM_BIN to a release `tandem` (make test does)")
}

/// A child process stopped on drop: SIGTERM, then SIGKILL after `grace`.
struct Stopped {
    name: &'static str,
    child: Child,
    grace: Duration,
}

impl Stopped {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{} did not stop in {:?}; killing it", self.name, self.grace);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The scratch directory, removed on drop (after the processes, which are declared later).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `GET /tiers` reports: (prefill replicas, prefill ready, decode replicas, decode ready).
type Tiers = (u64, u64, u64, u64);

async fn tiers(http: &reqwest::Client, control: &str) -> Tiers {
    let body = http
        .get(format!("{control}/tiers"))
        .send()
        .await
        .expect("control endpoint answers")
        .text()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
    let n = |tier: &str, field: &str| v[tier][field].as_u64().unwrap_or_else(|| panic!("{body}"));
    (
        n("prefill", "replicas"),
        n("prefill", "ready"),
        n("decode", "replicas"),
        n("decode", "ready"),
    )
}

/// The frontend's address from the endpoints file once every process is up.
async fn wait_up(endpoints: &Path, local: &mut Stopped) -> String {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = local.exited() {
            panic!("tandem local exited with {status} while starting");
        }
        let file: Option<Value> = std::fs::read(endpoints)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(processes) = file.as_ref().and_then(|f| f["processes"].as_array()) {
            let all_up = processes.len() == 3 && processes.iter().all(|p| p["up"] == true);
            let frontend = processes.iter().find(|p| p["role"] == "frontend");
            if let (true, Some(frontend)) = (all_up, frontend) {
                return frontend["http"].as_str().unwrap().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "tandem local not up in {START_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls `GET /tiers` every second until `done` holds, recording each distinct state.
async fn wait_tiers(
    http: &reqwest::Client,
    control: &str,
    started: Instant,
    timeline: &mut Vec<(f64, Tiers)>,
    timeout: Duration,
    what: &str,
    done: impl Fn(Tiers) -> bool,
) -> Tiers {
    let deadline = Instant::now() + timeout;
    loop {
        let now = tiers(http, control).await;
        if timeline.last().is_none_or(|(_, last)| *last != now) {
            let at = started.elapsed().as_secs_f64();
            eprintln!(
                "[{at:5.1}s] tiers: prefill {}/{} ready, decode {}/{} ready",
                now.0, now.1, now.2, now.3
            );
            timeline.push((at, now));
        }
        if done(now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; tiers over time {timeline:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Prefill workers Prometheus scrapes successfully now (found through the targets file).
async fn scraped_prefill_workers(http: &reqwest::Client, prometheus: &str) -> usize {
    let body = http
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", "up{deployment=\"smol\",tier=\"prefill\"} == 1")])
        .send()
        .await
        .expect("Prometheus answers")
        .text()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
    v["data"]["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .len()
}

/// Waits until Prometheus scrapes `expected` prefill workers: the targets file followed the tier.
async fn wait_scraped(http: &reqwest::Client, prometheus: &str, expected: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let scraped = scraped_prefill_workers(http, prometheus).await;
        if scraped == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus scrapes {scraped} prefill workers, not {expected}, 20 s after the change"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn planner_config() -> PlannerConfig {
    let mut config = PlannerConfig::new(
        Slo {
            ttft_p90_s: TTFT_SLO_S,
            itl_p90_s: ITL_SLO_S,
        },
        // Two cores: a second prefill worker is as far as it makes sense to go.
        TierBounds { min: 1, max: 2 },
        TierBounds { min: 1, max: 2 },
    );
    config.interval_s = INTERVAL_S;
    // Scrapes every second; a loaded machine may delay some.
    config.max_staleness_s = 10.0;
    // Short windows so the test sees the whole cycle in about two minutes (the defaults are
    // minutes, for pods).
    config.cooldown_s = 10.0;
    config.scale_down_stabilization_s = 9.0;
    config.scale_up_min_step = 1;
    // A local worker loads the 135M model in seconds.
    config.replica_startup_s = 10.0;
    config.lookahead_s = 10.0;
    config.backlog_drain_s = 10.0;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized engine (make test runs release); -- --ignored with TANDEM_BIN to force"
)]
async fn a_ttft_breach_under_load_grows_prefill_and_the_end_of_the_load_shrinks_it() {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("tandem-planner-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = Scratch(dir.clone());
    let endpoints = dir.join("endpoints.json");
    let targets = dir.join("targets.json");
    let control_port = free_port();
    let control = format!("http://127.0.0.1:{control_port}");

    let local = Command::new(tandem_bin())
        .args(["local", "--prefill", "1", "--decode", "1", "--port", "0"])
        .arg("--control-port")
        .arg(control_port.to_string())
        .arg("--endpoints-file")
        .arg(&endpoints)
        .arg("--prometheus-sd-file")
        .arg(&targets)
        .args(["--deployment", "smol", "--shutdown-grace-secs", "5"])
        .args(["--remote-prefill-min-tokens", "64"])
        .args(["--decode-arg", "--prefill-max-queue 64"])
        // One compute thread per worker: the two cores are shared by prefill and decode.
        .args(["--worker-arg", "--threads 1"])
        .arg("--log-dir")
        .arg(dir.join("logs"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting tandem local");
    let mut local = Stopped {
        name: "tandem local",
        child: local,
        grace: Duration::from_secs(30),
    };
    let prometheus_port = free_port();
    let _prometheus = Prometheus::start(
        &dir,
        &format!(
            "- job_name: tandem-local\n  file_sd_configs:\n  - files: ['{}']\n    refresh_interval: 1s\n",
            targets.display()
        ),
        prometheus_port,
    );
    let frontend = wait_up(&endpoints, &mut local).await;
    eprintln!(
        "[{:5.1}s] tandem local up, frontend {frontend}",
        started.elapsed().as_secs_f64()
    );

    let written: Value = serde_json::from_slice(&std::fs::read(&targets).unwrap()).unwrap();
    let tiers_scraped: Vec<&str> = written
        .as_array()
        .unwrap()
        .iter()
        .map(|group| group["labels"]["tier"].as_str().unwrap())
        .collect();
    assert_eq!(tiers_scraped.len(), 3, "one target per process: {written}");

    let prometheus = format!("http://127.0.0.1:{prometheus_port}");
    let source = PrometheusSource::new(&prometheus).unwrap();
    let scope = Scope {
        namespace: "local".into(),
        deployment: "smol".into(),
        window_s: WINDOW_S,
    };
    // Prometheus reads the targets file and scrapes within a few seconds of starting (a
    // successful scrape of any of the deployment's processes gives the observation its time).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(seen) = source.observe(&scope).await {
            if seen.timestamp_s.is_finite() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape tandem local through {} in 60 s",
            targets.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "[{:5.1}s] Prometheus scrapes the deployment",
        started.elapsed().as_secs_f64()
    );

    let target = LocalTarget::new(&control).unwrap();
    let mut planner = LocalPlanner::new(source, scope, target, planner_config()).unwrap();
    let decisions = Arc::new(Mutex::new(Vec::<String>::new()));
    let (stop_planner, planner_stopped) = tokio::sync::oneshot::channel::<()>();
    let log = decisions.clone();
    let planner_task = tokio::spawn(async move {
        planner
            .run(
                async {
                    let _ = planner_stopped.await;
                },
                |outcome| {
                    let line = match outcome {
                        Ok(step) => step.to_string(),
                        Err(e) => format!("no decision: {e}"),
                    };
                    eprintln!("[{:5.1}s] planner: {line}", started.elapsed().as_secs_f64());
                    log.lock().unwrap().push(line);
                },
            )
            .await;
    });

    let http = reqwest::Client::new();
    let mut timeline = Vec::new();
    // Idle: no traffic keeps both tiers at their minimum.
    tokio::time::sleep(Duration::from_secs_f64(2.5 * INTERVAL_S)).await;
    let idle = wait_tiers(
        &http,
        &control,
        started,
        &mut timeline,
        Duration::ZERO,
        "idle",
        |_| true,
    )
    .await;
    assert_eq!(idle, (1, 1, 1, 1), "idle: {:?}", decisions.lock().unwrap());

    // The load step.
    let bench = Command::new(tandem_bin())
        .arg("bench")
        .arg("--url")
        .arg(format!("http://{frontend}"))
        .args(["--concurrency", &LOAD_CONCURRENCY.to_string()])
        .args(["--input-len", &LOAD_INPUT_TOKENS.to_string()])
        .args(["--output-len", &LOAD_OUTPUT_TOKENS.to_string()])
        .args(["--duration", &LOAD_SECONDS.to_string(), "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting tandem bench");
    let load_started = Instant::now();
    let mut bench = Stopped {
        name: "tandem bench",
        child: bench,
        grace: Duration::from_secs(5),
    };
    eprintln!("[{:5.1}s] load step: {LOAD_CONCURRENCY} in flight, {LOAD_INPUT_TOKENS}-token prompts, {LOAD_SECONDS} s", started.elapsed().as_secs_f64());

    let grown = wait_tiers(
        &http,
        &control,
        started,
        &mut timeline,
        Duration::from_secs(LOAD_SECONDS),
        "prefill grows under the load step",
        |(prefill, ..)| prefill >= 2,
    )
    .await;
    eprintln!(
        "[{:5.1}s] prefill grew {:.0} s into the load",
        started.elapsed().as_secs_f64(),
        load_started.elapsed().as_secs_f64()
    );
    let ready = wait_tiers(
        &http,
        &control,
        started,
        &mut timeline,
        Duration::from_secs(60),
        "the new prefill worker becomes ready",
        |(prefill, prefill_ready, ..)| prefill_ready >= 2 && prefill_ready == prefill,
    )
    .await;
    wait_scraped(&http, &prometheus, 2).await;
    assert_eq!(
        (grown.2, ready.2),
        (1, 1),
        "decode met its ITL SLO and stays: {:?}",
        decisions.lock().unwrap()
    );

    // The load ends (bench stops sending after its duration and waits for what is in flight).
    let bench_deadline = load_started + Duration::from_secs(LOAD_SECONDS + 60);
    while bench.exited().is_none() {
        assert!(
            Instant::now() < bench_deadline,
            "tandem bench did not finish"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = bench.exited().unwrap();
    let mut report = String::new();
    if let Some(mut out) = bench.child.stdout.take() {
        use std::io::Read;
        let _ = out.read_to_string(&mut report);
    }
    eprintln!("tandem bench ({status}):\n{report}");
    assert!(status.success(), "tandem bench failed: {report}");
    eprintln!("[{:5.1}s] load over", started.elapsed().as_secs_f64());

    // No traffic: back to the minimum once the window has emptied, the scale-down stabilization
    // window has passed and the cooldown after the scale-up is over.
    wait_tiers(
        &http,
        &control,
        started,
        &mut timeline,
        Duration::from_secs(60),
        "prefill shrinks back once the load is gone",
        |t| t == (1, 1, 1, 1),
    )
    .await;
    wait_scraped(&http, &prometheus, 1).await;
    eprintln!(
        "[{:5.1}s] back to 1 prefill + 1 decode; tiers over time (s, (prefill, ready, decode, ready)): {timeline:?}",
        started.elapsed().as_secs_f64()
    );
    let decisions = decisions.lock().unwrap().clone();
    assert!(
        decisions.iter().any(|d| d.contains("prefill 1->2")),
        "a logged scale-up: {decisions:#?}"
    );
    assert!(
        decisions.iter().any(|d| d.contains("prefill 2->1")),
        "a logged scale-down: {decisions:#?}"
    );

    let _ = stop_planner.send(());
    planner_task.await.unwrap();
    drop(local);
    assert!(
        !endpoints.exists() && !targets.exists(),
        "tandem local removes its endpoints and targets files on exit"
    );
    drop(scratch);
}
