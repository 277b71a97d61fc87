//! The `tandem local` supervisor with stand-in children
//! (`fixtures/fake_worker.py`: serves `/health` and echoes its arguments), so
//! these run in seconds without a model: start order and readiness, the
//! endpoints file and the Prometheus targets file, the arguments each role gets, restart after `kill -9`,
//! scaling through the control endpoint, SIGKILL after the grace period, log
//! files, and a start-up failure reported and cleaned up. The real roles with the real
//! model are in `local_real_model.rs`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_disagg::discovery::{EndpointsFile, ProcessEntry, Role};
use tandem_disagg::local::{self, LocalConfig, LocalError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn fake_worker() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_worker.py")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(dir: &Path, prefill: usize, decode: usize) -> LocalConfig {
    let mut config = LocalConfig::new(
        "python3".into(),
        prefill,
        decode,
        dir.join("endpoints.json"),
    );
    config.program_args = vec![fake_worker().into()];
    config.frontend_port = 0;
    config.shutdown_grace = Duration::from_secs(5);
    config.ready_timeout = Duration::from_secs(30);
    config.restart_backoff = Duration::from_millis(200);
    config.health_interval = Duration::from_millis(50);
    config
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), LocalError>>,
    file: PathBuf,
}

impl Running {
    fn start(config: LocalConfig) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let file = config.endpoints_file.clone();
        let task = tokio::spawn(local::run(config, async move {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task,
            file,
        }
    }

    /// Waits until the endpoints file satisfies `ready`.
    async fn wait_file(&self, what: &str, ready: impl Fn(&EndpointsFile) -> bool) -> EndpointsFile {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(file) = EndpointsFile::read(&self.file) {
                if ready(&file) {
                    return file;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what}; the file: {:?}",
                EndpointsFile::read(&self.file)
            );
            assert!(
                !self.task.is_finished(),
                "the supervisor ended while waiting for: {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn all_up(&self, count: usize) -> EndpointsFile {
        self.wait_file(&format!("{count} processes up"), |f| {
            f.processes.len() == count && f.processes.iter().all(|p| p.up)
        })
        .await
    }

    async fn stop(mut self) -> Result<(), LocalError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the supervisor stops within 30 s")
            .expect("the supervisor does not panic")
    }
}

fn entry(file: &EndpointsFile, role: Role, index: usize) -> &ProcessEntry {
    file.processes
        .iter()
        .find(|p| p.role == role && p.index == index)
        .unwrap_or_else(|| panic!("{role}-{index} in {file:?}"))
}

/// A process that has exited (and been reaped) has no /proc entry.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn put(url: &str, body: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .put(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

async fn args_of(process: &ProcessEntry) -> Vec<String> {
    let (status, args) = get(&format!("http://{}/args", process.http)).await;
    assert_eq!(status, 200);
    serde_json::from_value(args).unwrap()
}

fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
}

#[tokio::test]
async fn starts_workers_then_frontend_restarts_a_killed_worker_and_stops_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 2, 1);
    // The decode worker "loads" for a while: the frontend must wait for it.
    config.decode_args = vec!["--fake-ready-after".into(), "0.5".into()];
    config.frontend_args = vec!["--router-mode".into(), "round-robin".into()];
    config.common_args = vec!["--model".into(), "tiny.gguf".into()];
    // One GPU per prefill worker through the index placeholder.
    config.prefill_args = vec!["--device".into(), "cuda:{index}".into()];
    let endpoints = config.endpoints_file.clone();
    let running = Running::start(config);

    // Before the workers are up there is no frontend in the file.
    let early = running
        .wait_file("the workers listed", |f| f.processes.len() == 3)
        .await;
    assert!(early.processes.iter().all(|p| p.role != Role::Frontend));

    let file = running.all_up(4).await;
    let mut ports: Vec<&str> = file.processes.iter().map(|p| p.http.as_str()).collect();
    ports.extend(file.processes.iter().filter_map(|p| p.grpc.as_deref()));
    let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
    assert_eq!(
        distinct.len(),
        ports.len(),
        "every port distinct: {ports:?}"
    );
    assert!(entry(&file, Role::Frontend, 0).grpc.is_none());
    for p in &file.processes {
        assert!(alive(p.pid.unwrap()), "{p:?}");
        let (status, _) = get(&format!("http://{}/health", p.http)).await;
        assert_eq!(status, 200, "{p:?}");
    }

    // Each role got its own flags, and the pass-through ones.
    let endpoints = endpoints.to_str().unwrap();
    let frontend = args_of(entry(&file, Role::Frontend, 0)).await;
    assert_eq!(frontend[0], "frontend");
    assert!(has_pair(&frontend, "--discovery", "file"), "{frontend:?}");
    assert!(
        has_pair(&frontend, "--endpoints-file", endpoints),
        "{frontend:?}"
    );
    assert!(
        has_pair(&frontend, "--router-mode", "round-robin"),
        "{frontend:?}"
    );
    assert!(has_pair(&frontend, "--model", "tiny.gguf"), "{frontend:?}");
    assert!(!frontend.contains(&"--grpc-port".to_string()));
    let decode = args_of(entry(&file, Role::Decode, 0)).await;
    assert_eq!(decode[0], "decode");
    assert!(
        has_pair(&decode, "--endpoints-file", endpoints),
        "{decode:?}"
    );
    let grpc = entry(&file, Role::Decode, 0).grpc.clone().unwrap();
    let grpc_port = grpc.rsplit_once(':').unwrap().1;
    assert!(has_pair(&decode, "--grpc-port", grpc_port), "{decode:?}");
    let prefill = args_of(entry(&file, Role::Prefill, 1)).await;
    assert_eq!(prefill[0], "prefill");
    assert!(!prefill.contains(&"--discovery".to_string()), "{prefill:?}");
    assert!(has_pair(&prefill, "--model", "tiny.gguf"), "{prefill:?}");
    assert!(has_pair(&prefill, "--device", "cuda:1"), "{prefill:?}");
    let prefill_0 = args_of(entry(&file, Role::Prefill, 0)).await;
    assert!(has_pair(&prefill_0, "--device", "cuda:0"), "{prefill_0:?}");

    // kill -9 a worker: it is restarted on the same ports, and the file says so.
    let victim = entry(&file, Role::Prefill, 1).clone();
    let killed = std::process::Command::new("kill")
        .args(["-9", &victim.pid.unwrap().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let restarted = running
        .wait_file("prefill-1 restarted and up", |f| {
            f.processes
                .iter()
                .any(|p| p.role == Role::Prefill && p.index == 1 && p.up && p.pid != victim.pid)
        })
        .await;
    let back = entry(&restarted, Role::Prefill, 1);
    assert_eq!((&back.http, &back.grpc), (&victim.http, &victim.grpc));
    assert!(!alive(victim.pid.unwrap()));
    // Nobody else was restarted.
    for p in restarted
        .processes
        .iter()
        .filter(|p| (p.role, p.index) != (Role::Prefill, 1))
    {
        assert_eq!(p.pid, entry(&file, p.role, p.index).pid, "{p:?}");
    }

    let pids: Vec<u32> = restarted.processes.iter().filter_map(|p| p.pid).collect();
    running.stop().await.unwrap();
    for pid in pids {
        assert!(
            !alive(pid),
            "pid {pid} still running after the supervisor stopped"
        );
    }
    assert!(
        !Path::new(endpoints).exists(),
        "the endpoints file is removed"
    );
}

#[tokio::test]
async fn the_control_endpoint_scales_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 1, 1);
    let control_port = free_port();
    config.control_port = Some(control_port);
    let running = Running::start(config);
    let file = running.all_up(3).await;
    let tiers = format!("http://127.0.0.1:{control_port}/tiers");
    // The control endpoint starts right after the table is printed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(&tiers).await.is_err() {
        assert!(Instant::now() < deadline, "no control endpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&tiers).await,
        (
            200,
            json!({"prefill": {"replicas": 1, "ready": 1}, "decode": {"replicas": 1, "ready": 1}})
        )
    );

    // Up: decode-1 starts and joins the file.
    let (status, body) = put(&format!("{tiers}/decode"), r#"{"replicas": 2}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["decode"]["replicas"], 2);
    let scaled = running
        .wait_file("decode-1 up", |f| {
            f.processes
                .iter()
                .any(|p| p.role == Role::Decode && p.index == 1 && p.up)
        })
        .await;
    assert_eq!(
        get(&tiers).await.1["decode"],
        json!({"replicas": 2, "ready": 2})
    );
    assert_eq!(
        get(&format!("{tiers}/decode")).await,
        (200, json!({"replicas": 2, "ready": 2}))
    );

    // Down: the highest index stops (gracefully) and leaves the file.
    let prefill_pid = entry(&file, Role::Prefill, 0).pid.unwrap();
    let (status, body) = put(&format!("{tiers}/prefill"), r#"{"replicas": 0}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prefill"], json!({"replicas": 0, "ready": 0}));
    running
        .wait_file("prefill-0 gone", |f| {
            f.processes.iter().all(|p| p.role != Role::Prefill)
        })
        .await;
    assert!(!alive(prefill_pid));
    let decode_1 = entry(&scaled, Role::Decode, 1).pid.unwrap();
    let (status, _) = put(&format!("{tiers}/decode"), r#"{"replicas": 1}"#).await;
    assert_eq!(status, 200);
    running
        .wait_file("decode-1 gone", |f| {
            f.processes
                .iter()
                .filter(|p| p.role == Role::Decode)
                .count()
                == 1
        })
        .await;
    assert!(!alive(decode_1));
    assert!(alive(entry(&file, Role::Decode, 0).pid.unwrap()));

    // Bad requests name the problem.
    let (status, body) = put(&format!("{tiers}/frontend"), r#"{"replicas": 2}"#).await;
    assert_eq!(status, 404);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("frontend"),
        "{body}"
    );
    let (status, body) = put(&format!("{tiers}/decode"), r#"{"replica": 2}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("replicas"),
        "{body}"
    );
    let (status, body) = put(&format!("{tiers}/decode"), r#"{"replicas": 1000}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("1000"),
        "{body}"
    );

    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_process_ignoring_sigterm_is_killed_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 0, 1);
    config.decode_args = vec!["--fake-ignore-sigterm".into()];
    config.shutdown_grace = Duration::from_secs(1);
    // Output to per-process files this time (the directory is created).
    let logs = dir.path().join("logs");
    config.log_dir = Some(logs.clone());
    let running = Running::start(config);
    let file = running.all_up(2).await;
    let decode = entry(&file, Role::Decode, 0).pid.unwrap();
    let started = Instant::now();
    running.stop().await.unwrap();
    let took = started.elapsed();
    assert!(!alive(decode));
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "stopping took {took:?}: the grace, then SIGKILL"
    );
    let log = std::fs::read_to_string(logs.join("decode-0.log")).unwrap();
    assert!(log.contains("fake decode listening"), "{log}");
    let log = std::fs::read_to_string(logs.join("frontend-0.log")).unwrap();
    assert!(log.contains("fake frontend listening"), "{log}");
}

#[tokio::test]
async fn a_worker_failing_at_start_up_stops_everything_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 1, 1);
    config.decode_args = vec!["--fake-exit-at-once".into()];
    let endpoints = config.endpoints_file.clone();
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        local::run(config, std::future::pending()),
    )
    .await
    .expect("start-up fails fast")
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("decode-0 exited with exit status: 3 before becoming ready"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!endpoints.exists(), "the endpoints file is removed");
}

#[tokio::test]
async fn bad_tier_sizes_are_refused_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let err = local::run(config(dir.path(), 1, 0), std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("--decode must be at least 1"),
        "{err}"
    );
    let err = local::run(config(dir.path(), 65, 1), std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("65 prefill replicas"), "{err}");
}

/// `(tier, pod, target)` of every group in the Prometheus targets file.
fn scrape_targets(path: &Path) -> Vec<(String, String, String)> {
    let groups: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    groups
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            assert_eq!(g["labels"]["namespace"], "local", "{g}");
            assert_eq!(g["labels"]["deployment"], "smol", "{g}");
            (
                g["labels"]["tier"].as_str().unwrap().to_string(),
                g["labels"]["pod"].as_str().unwrap().to_string(),
                g["targets"][0].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_prometheus_targets_follow_the_processes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 1, 1);
    let control_port = free_port();
    config.control_port = Some(control_port);
    let targets = dir.path().join("targets.json");
    config.scrape_targets = Some(local::ScrapeTargets {
        path: targets.clone(),
        namespace: "local".into(),
        deployment: "smol".into(),
    });
    let running = Running::start(config);
    let file = running.all_up(3).await;
    let expected = |file: &EndpointsFile| -> Vec<(String, String, String)> {
        file.processes
            .iter()
            .filter(|p| p.up)
            .map(|p| {
                (
                    p.role.to_string(),
                    format!("{}-{}", p.role, p.index),
                    p.http.clone(),
                )
            })
            .collect()
    };
    assert_eq!(scrape_targets(&targets), expected(&file));
    assert_eq!(scrape_targets(&targets).len(), 3);

    // A worker the planner adds is scraped once it is up; one it removes leaves at once. The
    // targets are written just before the endpoints file, so they are current here.
    let tiers = format!("http://127.0.0.1:{control_port}/tiers");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(&tiers).await.is_err() {
        assert!(Instant::now() < deadline, "no control endpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = put(&format!("{tiers}/prefill"), r#"{"replicas": 2}"#).await;
    assert_eq!(status, 200, "{body}");
    let scaled = running.all_up(4).await;
    assert_eq!(scrape_targets(&targets), expected(&scaled));
    assert!(scrape_targets(&targets)
        .iter()
        .any(|(tier, pod, _)| tier == "prefill" && pod == "prefill-1"));
    let (status, body) = put(&format!("{tiers}/prefill"), r#"{"replicas": 1}"#).await;
    assert_eq!(status, 200, "{body}");
    let back = running
        .wait_file("prefill-1 gone", |f| {
            f.processes
                .iter()
                .filter(|p| p.role == Role::Prefill)
                .count()
                == 1
        })
        .await;
    assert_eq!(scrape_targets(&targets), expected(&back));
    assert_eq!(scrape_targets(&targets).len(), 3);

    running.stop().await.unwrap();
    assert!(
        !targets.exists(),
        "removed on exit, so Prometheus drops the targets"
    );
}
