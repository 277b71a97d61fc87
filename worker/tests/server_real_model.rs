//! `tandem serve` as a real process with the default model (SmolLM2-135M-Instruct):
//! it answers the capital of France, batching does not change greedy outputs,
//! and a prefix-cache hit gives the same tokens as a miss.
//!
//! The binary is `$TANDEM_BIN` when set (`make test` points it at the release
//! build), else the one Cargo built for this test run. The model must be in
//! the cache (`make model`). In unoptimized test builds these tests are
//! ignored: a debug `tandem` takes about a minute per chat answer (run them
//! with `cargo test --release`, as `make test` does, or `-- --ignored`).

mod server_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_support::{open_request, read_response, sse_chunks};

/// One model server at a time: they would fight over the two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct ServeProcess {
    child: Child,
    addr: std::net::SocketAddr,
}

impl ServeProcess {
    async fn start() -> Self {
        let bin = std::env::var("TANDEM_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tandem").to_string());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let mut server = Self {
            child,
            addr: ([127, 0, 0, 1], port).into(),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "tandem serve exited early with {status} (is the model cached? `make model`)"
                );
            }
            if let Ok(conn) = open_request(self.addr, "GET", "/health", None).await {
                if read_response(conn).await.0 == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("tandem serve did not become ready");
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Vec<u8>) {
        let conn = open_request(self.addr, "POST", path, Some(body))
            .await
            .unwrap();
        read_response(conn).await
    }

    async fn post_json(&self, path: &str, body: &Value) -> Value {
        let (status, bytes) = self.post(path, body).await;
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, 200, "{value}");
        value
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        // SIGTERM so the server drains and exits 0, like an orchestrator stops it.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({
        "model": "default", "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true, "logprobs": 0,
    })
}

/// The generated token strings of a completions response (logprobs on).
fn tokens(response: &Value) -> Vec<String> {
    response["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("logprobs.tokens")
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build: cargo test --release"
)]
async fn capital_of_france_is_paris() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = ServeProcess::start().await;
    let question = json!({
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "max_tokens": 32,
    });
    let body = server.post_json("/v1/chat/completions", &question).await;
    let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "answer: {answer:?}");

    // The same through SSE.
    let mut streaming = question.clone();
    streaming["stream"] = json!(true);
    let (status, bytes) = server.post("/v1/chat/completions", &streaming).await;
    assert_eq!(status, 200);
    let streamed: String = sse_chunks(&bytes)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, answer);
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build: cargo test --release"
)]
async fn eight_concurrent_greedy_requests_equal_each_alone() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = ServeProcess::start().await;
    let prompts = [
        "The quick brown fox",
        "In the beginning",
        "Water boils at",
        "My favourite food is",
        "The history of Rome",
        "def fibonacci(n):",
        "Once upon a time, in a land far away,",
        "The three primary colours are",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(tokens(
            &server
                .post_json("/v1/completions", &completion(p, 24))
                .await,
        ));
    }
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let addr = server.addr;
            let body = completion(p, 24);
            tokio::spawn(async move {
                let conn = open_request(addr, "POST", "/v1/completions", Some(&body))
                    .await
                    .unwrap();
                read_response(conn).await
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, bytes) = h.await.unwrap();
        assert_eq!(status, 200);
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(tokens(&body).len(), 24);
        assert_eq!(tokens(&body), alone[i], "prompt {:?}", prompts[i]);
    }
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build: cargo test --release"
)]
async fn prefix_cache_hit_gives_the_same_tokens_as_a_miss() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = ServeProcess::start().await;
    // Several full KV blocks of shared prefix.
    let prompt = "Paris is the capital and largest city of France. It is known for the Eiffel \
                  Tower, the Louvre museum, its cafes and its long history as a centre of art, \
                  fashion and science. Write one more sentence about the city:";
    let miss = server
        .post_json("/v1/completions", &completion(prompt, 24))
        .await;
    let hit = server
        .post_json("/v1/completions", &completion(prompt, 24))
        .await;
    let prompt_tokens = miss["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens >= 32,
        "prompt spans whole blocks: {prompt_tokens}"
    );
    assert_eq!(miss["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = hit["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= 16,
        "second request hits the prefix cache: {cached}"
    );
    assert_eq!(tokens(&hit), tokens(&miss));
}
