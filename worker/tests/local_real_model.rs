//! `tandem local --prefill 1 --decode 1` as a real process with the real
//! default model: it prints the table and writes the endpoints file, answers
//! through the frontend with the prompt prefilled on the prefill worker (found
//! through the file), restarts a `kill -9`ed decode worker which the frontend
//! picks up again without a restart, and on SIGTERM stops everything and
//! exits 0, removing the file.
//!
//! The binary is `$TANDEM_BIN` when set (`make test` points it at the release
//! build), else the one Cargo built for this test run. The default model must
//! be in the cache (`make model`). Ignored in unoptimized builds (a debug
//! engine takes about half a minute per answer; `-- --ignored` runs it anyway).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod process_support;

use process_support::{free_port, metric_at, tandem_bin};
use serde_json::{json, Value};
use tandem_disagg::discovery::{EndpointsFile, ProcessEntry, Role};

const READY: Duration = Duration::from_secs(300);

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn entry(file: &EndpointsFile, role: Role) -> ProcessEntry {
    file.processes
        .iter()
        .find(|p| p.role == role && p.index == 0)
        .unwrap_or_else(|| panic!("{role}-0 in {file:?}"))
        .clone()
}

async fn wait_file(
    path: &Path,
    child: &mut std::process::Child,
    what: &str,
    ready: impl Fn(&EndpointsFile) -> bool,
) -> EndpointsFile {
    let deadline = Instant::now() + READY;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("tandem local exited with {status} while waiting for: {what}");
        }
        if let Ok(file) = EndpointsFile::read(path) {
            if ready(&file) {
                return file;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A greedy chat answer through the frontend.
async fn ask(client: &reqwest::Client, frontend: &str) -> String {
    let body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8, "temperature": 0,
    });
    let response = client
        .post(format!("http://{frontend}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let v: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build: cargo test --release"
)]
async fn local_serves_restarts_a_killed_worker_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.json");
    let table = dir.path().join("table.txt");
    let port = free_port();
    let mut local = Command::new(tandem_bin())
        .args([
            "local",
            "--prefill",
            "1",
            "--decode",
            "1",
            "--port",
            &port.to_string(),
            "--max-model-len",
            "512",
            // The chat prompt (~37 tokens) is then prefilled remotely.
            "--remote-prefill-min-tokens",
            "16",
            "--worker-arg",
            "--threads 1",
            "--shutdown-grace-secs",
            "20",
            "--endpoints-file",
        ])
        .arg(&endpoints)
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&table).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    let file = wait_file(&endpoints, &mut local, "all three processes up", |f| {
        f.processes.len() == 3 && f.processes.iter().all(|p| p.up)
    })
    .await;
    let frontend = entry(&file, Role::Frontend);
    let prefill = entry(&file, Role::Prefill);
    let decode = entry(&file, Role::Decode);
    assert_eq!(frontend.http, format!("127.0.0.1:{port}"));
    // The table is printed once everything is up: give stdout a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let printed = std::fs::read_to_string(&table).unwrap();
    for p in [&frontend, &prefill, &decode] {
        let row = printed
            .lines()
            .find(|l| l.starts_with(&format!("{}-0 ", p.role)))
            .unwrap_or_else(|| panic!("no {} row in:\n{printed}", p.role));
        assert!(row.contains(&p.pid.unwrap().to_string()), "{row}");
        assert!(row.contains(&p.http), "{row}");
    }

    let client = reqwest::Client::new();
    let answer = ask(&client, &frontend.http).await;
    assert!(answer.contains("Paris"), "{answer}");
    // The decode worker found the prefill worker through the file and used it.
    let decode_port = decode.http.rsplit_once(':').unwrap().1.parse().unwrap();
    let remote = metric_at(
        decode_port,
        "tandem_worker_prefills_total",
        &["location=\"remote\""],
    )
    .await;
    assert!(remote >= 1.0, "remote prefills: {remote}");

    // kill -9 the decode worker: restarted on the same ports, back in the file.
    assert!(Command::new("kill")
        .args(["-9", &decode.pid.unwrap().to_string()])
        .status()
        .unwrap()
        .success());
    let file = wait_file(&endpoints, &mut local, "decode-0 restarted", |f| {
        let d = entry(f, Role::Decode);
        d.up && d.pid != decode.pid
    })
    .await;
    let restarted = entry(&file, Role::Decode);
    assert_eq!(
        (&restarted.http, &restarted.grpc),
        (&decode.http, &decode.grpc)
    );
    // The frontend (not restarted) routes to it again once it rejoins.
    assert_eq!(entry(&file, Role::Frontend).pid, frontend.pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = client
            .get(format!("http://{}/health", frontend.http))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string());
        if health == Ok(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "frontend not healthy again: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ask(&client, &frontend.http).await, answer);

    // SIGTERM: everything stops, exit 0, the file is gone.
    let pids: Vec<u32> = file.processes.iter().filter_map(|p| p.pid).collect();
    assert!(Command::new("kill")
        .args(["-TERM", &local.id().to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = local.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "tandem local still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "tandem local exited with {status}");
    for pid in pids {
        assert!(!alive(pid), "pid {pid} outlived tandem local");
    }
    assert!(!endpoints.exists());
}
