//! Disaggregated serving with real processes on loopback and the real default
//! model: `tandem local` (frontend + prefill + decode workers) gives the same
//! greedy answers as `tandem serve`, ship exactly the KV they should, survive
//! `kill -9` of a prefill or a decode worker, spread a shared prefix over the
//! decode workers, and free everything when a client hangs up.
//!
//! Ignored in unoptimized builds (a debug engine is far too slow); `make test`
//! runs them from the release build.

mod process_support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use process_support::{complete, greedy_body, Proc};
use serde_json::{json, Value};
use tandem_disagg::discovery::Role;

/// One deployment at a time: they would fight over the two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Short enough that a test's "long" prompts stay cheap on a CPU.
const REMOTE_MIN_TOKENS: &str = "32";
/// A small context makes "near the context limit" cheap to reach.
const MAX_MODEL_LEN: usize = 512;
/// SmolLM2-135M: 30 layers × (K + V) × 3 KV heads × head_dim 64 × f32.
const KV_BYTES_PER_TOKEN: f64 = (30 * 2 * 3 * 64 * 4) as f64;
const READY: Duration = Duration::from_secs(300);

fn max_len() -> String {
    MAX_MODEL_LEN.to_string()
}

/// `tandem serve` with the same limits as the workers.
async fn start_serve() -> Proc {
    let len = max_len();
    let mut p = Proc::spawn("serve", "serve", &["--max-model-len", &len], false);
    p.wait_healthy(READY).await;
    p
}

/// A process of a `tandem local` deployment, from its endpoints file.
struct Member {
    name: String,
    http_port: u16,
    pid: u32,
}

impl Member {
    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        process_support::metric_at(self.http_port, name, labels).await
    }

    /// SIGKILL (`tandem local` restarts it after a back-off).
    fn kill9(&self) {
        let status = std::process::Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -9 {} ({})", self.pid, self.name);
    }
}

/// `tandem local --prefill P --decode M`: the deployment a user starts.
struct Cluster {
    prefill: Vec<Member>,
    decode: Vec<Member>,
    frontend: Member,
    _local: Proc,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(prefill: usize, decode: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("endpoints.json");
        let port = process_support::free_port();
        let (p, d, port_s, len) = (
            prefill.to_string(),
            decode.to_string(),
            port.to_string(),
            max_len(),
        );
        let mut local = Proc::spawn_raw(
            "tandem local",
            &[
                "local",
                "--prefill",
                &p,
                "--decode",
                &d,
                "--port",
                &port_s,
                "--max-model-len",
                &len,
                "--remote-prefill-min-tokens",
                REMOTE_MIN_TOKENS,
                "--worker-arg",
                "--threads 1",
                "--endpoints-file",
                file.to_str().unwrap(),
            ],
            port,
        );
        local.wait_healthy(READY).await;
        // The frontend answers before the supervisor has written it up.
        let expected = prefill + decode + 1;
        let started = std::time::Instant::now();
        let endpoints = loop {
            let e = tandem_disagg::discovery::EndpointsFile::read(&file).unwrap();
            if e.processes.iter().filter(|p| p.up).count() == expected {
                break e;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "not every process is up in the endpoints file: {e:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let member = |role: Role, index: usize| {
            let e = endpoints
                .processes
                .iter()
                .find(|e| e.role == role && e.index == index)
                .unwrap_or_else(|| panic!("{role}-{index} in {endpoints:?}"));
            assert!(e.up, "{role}-{index} is not up: {e:?}");
            Member {
                name: format!("{role}-{index}"),
                http_port: e.http.rsplit_once(':').unwrap().1.parse().unwrap(),
                pid: e.pid.expect("a running process has a pid"),
            }
        };
        let cluster = Self {
            prefill: (0..prefill).map(|i| member(Role::Prefill, i)).collect(),
            decode: (0..decode).map(|i| member(Role::Decode, i)).collect(),
            frontend: member(Role::Frontend, 0),
            _local: local,
            _dir: dir,
        };
        // Give the decode workers a moment to see their prefill workers' load.
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.frontend.http_port)
    }

    async fn decode_sum(&self, name: &str, labels: &[&str]) -> f64 {
        let mut total = 0.0;
        for d in &self.decode {
            total += d.metric(name, labels).await;
        }
        total
    }
}

const STORY: &str = "Once upon a time, in a small village by the sea, there lived an old \
fisherman who told stories about the stars. Every evening the children gathered around \
his fire to listen, and every evening he began with the same words.";

const SYSTEM: &str = "You are a careful assistant. You answer in one short sentence, you \
never invent facts, and when a question is ambiguous you say which reading you chose. \
You prefer plain words to jargon and you keep numbers exact.";

/// Twenty prompts: short (prefilled locally) and long (remotely), sharing a
/// prefix, unicode, and one filling the context to its limit.
fn prompts() -> Vec<(String, usize)> {
    let mut p: Vec<(String, usize)> = vec![
        ("Hello".into(), 12),
        ("The capital of France is".into(), 12),
        ("1, 2, 3, 4,".into(), 12),
        ("def fibonacci(n):".into(), 16),
        (
            "Ünïcödé: 日本語のテキストと絵文字 🚀✨ mixed with English.".into(),
            16,
        ),
        ("Ελληνικά και русский текст: что дальше?".into(), 12),
        (STORY.into(), 16),
        (format!("{STORY} The fisherman said:"), 16),
        (format!("{STORY} {STORY}"), 12),
        (format!("Summarize: {STORY}"), 16),
        (format!("Translate to French: {STORY}"), 12),
        (format!("{STORY} 🌊🐟 — «quoted» text, ümlauts, ñ."), 12),
    ];
    for q in [
        "What is the boiling point of water at sea level?",
        "How many legs does a spider have?",
        "Name the largest planet in the solar system.",
        "What is 12 times 12?",
        "Who wrote Hamlet?",
        "Which ocean is the deepest?",
        "What colour is chlorophyll?",
    ] {
        p.push((format!("{SYSTEM}\nQuestion: {q}\nAnswer:"), 12));
    }
    // Near the context limit: max_tokens is set from the reference run so that
    // prompt + generated = the limit.
    p.push(("The sea. ".repeat(160), 0));
    assert_eq!(p.len(), 20);
    p
}

/// Greedy answers of `base` for `prompts` (4 at a time). A `max_tokens` of 0
/// means "up to the context limit", resolved with `prompt_lens`.
async fn answers(
    base: &str,
    prompts: &[(String, usize)],
    limit_fill: usize,
) -> Vec<(String, Vec<String>)> {
    let client = reqwest::Client::new();
    futures::stream::iter(prompts.iter().cloned())
        .map(|(prompt, max_tokens)| {
            let client = client.clone();
            let base = base.to_string();
            async move {
                let n = if max_tokens == 0 {
                    limit_fill
                } else {
                    max_tokens
                };
                complete(&client, &base, &greedy_body(&prompt, n))
                    .await
                    .unwrap_or_else(|e| panic!("{prompt:?}: {e}"))
            }
        })
        .buffered(4)
        .collect()
        .await
}

/// Tokens of the near-limit prompt, from the server's usage.
async fn prompt_tokens(base: &str, prompt: &str) -> usize {
    let bytes = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(greedy_body(prompt, 1).to_string())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    v["usage"]["prompt_tokens"].as_u64().expect("usage") as usize
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build: cargo test --release"
)]
async fn disaggregated_greedy_outputs_equal_aggregated() {
    let _one = ONE_AT_A_TIME.lock().await;
    let prompts = prompts();
    let serve = start_serve().await;
    let long = &prompts.last().unwrap().0;
    let long_tokens = prompt_tokens(&serve.http_url(""), long).await;
    assert!(
        long_tokens > MAX_MODEL_LEN - 100 && long_tokens < MAX_MODEL_LEN,
        "the near-limit prompt has {long_tokens} tokens"
    );
    let fill = MAX_MODEL_LEN - long_tokens;
    let reference = answers(&serve.http_url(""), &prompts, fill).await;
    drop(serve);

    for (p, d) in [(1, 1), (2, 2)] {
        let cluster = Cluster::start(p, d).await;
        let got = answers(&cluster.base(), &prompts, fill).await;
        for (i, ((prompt, _), (want, have))) in
            prompts.iter().zip(reference.iter().zip(&got)).enumerate()
        {
            assert_eq!(
                have.1, want.1,
                "{p}P+{d}D, prompt {i} {prompt:?}: tokens differ from tandem serve"
            );
            assert_eq!(have.0, want.0, "{p}P+{d}D, prompt {i}: text differs");
        }
        let remote = cluster
            .decode_sum("tandem_worker_prefills_total", &["location=\"remote\""])
            .await;
        let local = cluster
            .decode_sum("tandem_worker_prefills_total", &["location=\"local\""])
            .await;
        assert!(remote >= 5.0, "{p}P+{d}D: only {remote} remote prefills");
        assert!(local >= 3.0, "{p}P+{d}D: only {local} local prefills");
        // KV bytes shipped = bytes per token × remotely prefilled tokens, on
        // both sides of the transfer.
        let tokens = cluster
            .decode_sum("tandem_worker_remote_prefill_tokens_total", &[])
            .await;
        let received = cluster
            .decode_sum(
                "tandem_kv_transfer_bytes_total",
                &["direction=\"received\""],
            )
            .await;
        let mut sent = 0.0;
        for w in &cluster.prefill {
            sent += w
                .metric("tandem_kv_transfer_bytes_total", &["direction=\"sent\""])
                .await;
        }
        assert!(tokens > 0.0);
        assert_eq!(received, KV_BYTES_PER_TOKEN * tokens, "{p}P+{d}D received");
        assert_eq!(sent, received, "{p}P+{d}D: sent and received bytes differ");
        // Every worker series carries the served model's name, as the frontend's do.
        let model = "model=\"SmolLM2-135M-Instruct\"";
        let labelled = cluster
            .decode_sum(
                "tandem_kv_transfer_bytes_total",
                &["direction=\"received\"", model],
            )
            .await;
        assert_eq!(
            labelled, received,
            "{p}P+{d}D: decode series without {model}"
        );
        for w in &cluster.prefill {
            let all = w.metric("tandem_worker_prefill_tokens_total", &[]).await;
            let labelled = w
                .metric("tandem_worker_prefill_tokens_total", &[model])
                .await;
            assert_eq!(labelled, all, "{}: series without {model}", w.name);
        }
        if p == 2 {
            for w in &cluster.prefill {
                let prefilled = w.metric("tandem_worker_prefill_tokens_total", &[]).await;
                assert!(prefilled > 0.0, "{} prefilled nothing", w.name);
            }
            for w in &cluster.decode {
                let n = w.metric("tandem_worker_prefills_total", &[]).await;
                assert!(n >= 3.0, "{} got only {n} requests", w.name);
            }
        }
    }
}

/// Fifty distinct prompts long enough to be prefilled remotely.
fn load_prompts() -> Vec<String> {
    (0..50)
        .map(|i| format!("Request number {i}. {STORY} Chapter {i} begins:"))
        .collect()
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build: cargo test --release"
)]
async fn killing_a_prefill_worker_under_load_loses_no_request() {
    let _one = ONE_AT_A_TIME.lock().await;
    let prompts: Vec<(String, usize)> = load_prompts().into_iter().map(|p| (p, 6)).collect();
    let serve = start_serve().await;
    let reference = answers(&serve.http_url(""), &prompts, 0).await;
    drop(serve);

    let cluster = Cluster::start(2, 1).await;
    let base = cluster.base();
    let client = reqwest::Client::new();
    let load = tokio::spawn({
        let prompts = prompts.clone();
        async move {
            futures::stream::iter(prompts)
                .map(|(prompt, n)| {
                    let client = client.clone();
                    let base = base.clone();
                    async move { complete(&client, &base, &greedy_body(&prompt, n)).await }
                })
                .buffered(6)
                .collect::<Vec<_>>()
                .await
        }
    });
    // Let the load get going, then kill a prefill worker that is busy.
    let started = Instant::now();
    while cluster.prefill[0]
        .metric("tandem_worker_prefill_tokens_total", &[])
        .await
        == 0.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "prefill-0 never got work"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.prefill[0].kill9();
    let results = load.await.unwrap();
    for (i, (result, want)) in results.iter().zip(&reference).enumerate() {
        let have = result
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i} failed after the prefill worker died: {e}"));
        assert_eq!(have, want, "request {i}: output differs from tandem serve");
    }
    let survivor = cluster.prefill[1]
        .metric("tandem_worker_prefill_tokens_total", &[])
        .await;
    assert!(survivor > 0.0, "the surviving prefill worker did no work");
}

/// Reads an SSE completion stream into its text; `after_first` runs once the
/// first text arrived.
async fn stream_text(
    client: &reqwest::Client,
    base: &str,
    prompt: &str,
    n: usize,
) -> Result<String, String> {
    let mut body = greedy_body(prompt, n);
    body["stream"] = json!(true);
    let r = client
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let mut text = String::new();
    let mut buf = String::new();
    let mut bytes = r.bytes_stream();
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event
                .trim()
                .strip_prefix("data: ")
                .unwrap_or("")
                .to_string();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(&data).map_err(|e| format!("{e}: {data}"))?;
            if let Some(err) = v.get("error") {
                return Err(format!("error event: {err}"));
            }
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    Ok(text)
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build: cargo test --release"
)]
async fn killing_a_decode_worker_mid_stream_migrates_every_stream() {
    let _one = ONE_AT_A_TIME.lock().await;
    let prompts: Vec<(String, usize)> = (0..8)
        .map(|i| (format!("Story {i}: {STORY}"), 40))
        .collect();
    let serve = start_serve().await;
    let reference = answers(&serve.http_url(""), &prompts, 0).await;
    drop(serve);

    let cluster = Cluster::start(1, 2).await;
    let base = cluster.base();
    let client = reqwest::Client::new();
    let streams: Vec<_> = prompts
        .iter()
        .map(|(p, n)| {
            let (client, base, p, n) = (client.clone(), base.clone(), p.clone(), *n);
            tokio::spawn(async move { stream_text(&client, &base, &p, n).await })
        })
        .collect();
    // Kill decode-0 once it is generating for some of the streams.
    let started = Instant::now();
    while cluster.decode[0]
        .metric("tandem_worker_decode_tokens_total", &[])
        .await
        < 8.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "decode-0 never generated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.decode[0].kill9();
    for (i, (s, want)) in streams.into_iter().zip(&reference).enumerate() {
        let text = s
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i} broke: {e}"));
        assert_eq!(text, want.0, "stream {i}: text differs from tandem serve");
    }
    let migrations = cluster
        .frontend
        .metric("tandem_frontend_migrations_total", &[])
        .await;
    assert!(migrations >= 1.0, "no request migrated");
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build: cargo test --release"
)]
async fn shared_prefix_load_spreads_over_decode_workers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start(0, 2).await;
    let base = cluster.base();
    let client = reqwest::Client::new();
    let results: Vec<_> = futures::stream::iter(0..100)
        .map(|i| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let prompt = format!("{SYSTEM} {SYSTEM}\nUser {i} asks: what is {i} + {i}?");
                complete(&client, &base, &greedy_body(&prompt, 3)).await
            }
        })
        .buffered(12)
        .collect()
        .await;
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "request {i}: {r:?}");
    }
    for w in &cluster.decode {
        let n = w.metric("tandem_worker_prefills_total", &[]).await;
        assert!(
            n >= 25.0,
            "{} served {n} of 100 requests sharing one prefix: hot-spotting",
            w.name
        );
    }
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "needs an optimized build: cargo test --release"
)]
async fn client_disconnect_frees_decode_and_prefill() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::start(1, 1).await;
    let mut body = greedy_body(&format!("{STORY} {STORY}"), 400);
    body["stream"] = json!(true);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", cluster.base()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut bytes = r.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        bytes.next().await.expect("stream open").unwrap();
        seen += 1;
    }
    let decode = &cluster.decode[0];
    assert!(decode.metric("tandem_worker_running_sequences", &[]).await >= 1.0);
    drop(bytes);
    let started = Instant::now();
    loop {
        let running = decode.metric("tandem_worker_running_sequences", &[]).await;
        let used = decode.metric("tandem_worker_kv_blocks_used", &[]).await;
        let prefill_used = cluster.prefill[0]
            .metric("tandem_worker_kv_blocks_used", &[])
            .await;
        if running == 0.0 && used == 0.0 && prefill_used == 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "after the client left: {running} running, {used} decode blocks, {prefill_used} prefill blocks in use"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let generated = decode
        .metric("tandem_worker_decode_tokens_total", &[])
        .await;
    assert!(
        generated < 400.0,
        "the request ran to the end: {generated} tokens"
    );
}
