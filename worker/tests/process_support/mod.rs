//! Real `tandem` processes on loopback for the process tests: start one with
//! free ports, wait for `/health`, read its `/metrics`, kill it (`-9`) or stop
//! it (SIGTERM, on drop).
//!
//! The binary is `$TANDEM_BIN` when set (`make test` points it at the release
//! build), else the one Cargo built for this test run. The default model must
//! be in the cache (`make model`).

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn tandem_bin() -> String {
    std::env::var("TANDEM_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tandem").to_string())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `tandem` child process.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub http_port: u16,
    pub grpc_port: Option<u16>,
    args: Vec<String>,
}

impl Proc {
    /// Starts `tandem <role> <args> --host 127.0.0.1 --port P [--grpc-port G]`.
    /// Starts `tandem <args>` as is; `http_port` is where its `/health` answers.
    pub fn spawn_raw(name: &str, args: &[&str], http_port: u16) -> Self {
        let mut p = Self {
            name: name.to_string(),
            child: None,
            http_port,
            grpc_port: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        p.start();
        p
    }

    pub fn spawn(name: &str, role: &str, args: &[&str], grpc: bool) -> Self {
        let http_port = free_port();
        let grpc_port = grpc.then(free_port);
        let mut full: Vec<String> = vec![
            role.into(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            http_port.to_string(),
        ];
        if let Some(g) = grpc_port {
            full.push("--grpc-port".into());
            full.push(g.to_string());
        }
        full.extend(args.iter().map(|a| a.to_string()));
        let mut p = Self {
            name: name.to_string(),
            child: None,
            http_port,
            grpc_port,
            args: full,
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let bin = tandem_bin();
        let child = Command::new(&bin)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        self.child = Some(child);
    }

    /// Starts it again with the same ports and flags (after `kill9`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        self.start();
    }

    pub fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port.expect("a worker"))
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub async fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let client = reqwest::Client::new();
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("{} exited early with {status}", self.name);
                }
            }
            if let Ok(r) = client.get(self.http_url("/health")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} did not become healthy within {timeout:?}", self.name);
    }

    /// The process's `/metrics`: `name{labels}` → value.
    pub async fn metrics(&self) -> Vec<(String, f64)> {
        metrics_at(self.http_port).await
    }

    /// Sum of the series of `name` whose label text contains every `labels` part.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric_at(self.http_port, name, labels).await
    }

    /// SIGKILL: the process dies without cleaning up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A greedy completion: the generated token ids are recovered from logprobs'
/// token strings, so two servers can be compared token for token.
pub fn greedy_body(prompt: &str, max_tokens: usize) -> Value {
    serde_json::json!({
        "model": "default", "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true, "logprobs": 0,
    })
}

/// POST a completion and return (text, token strings).
pub async fn complete(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
) -> Result<(String, Vec<String>), String> {
    let r = client
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let v: Value = serde_json::from_slice(&r.bytes().await.map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {v}"));
    }
    let choice = &v["choices"][0];
    let tokens = choice["logprobs"]["tokens"]
        .as_array()
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    Ok((choice["text"].as_str().unwrap().to_string(), tokens))
}

/// `/metrics` of the process whose HTTP port is `port`: `name{labels}` → value.
pub async fn metrics_at(port: u16) -> Vec<(String, f64)> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Sum of the series of `name` whose label text contains every `labels` part.
pub async fn metric_at(port: u16, name: &str, labels: &[&str]) -> f64 {
    metrics_at(port)
        .await
        .into_iter()
        .filter(|(k, _)| {
            (k == name || k.starts_with(&format!("{name}{{")))
                && labels.iter().all(|l| k.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}
