//! Shared by the `server_*` tests: a byte-level BPE tokenizer built in code,
//! a scripted fake `Infer` that records what it was asked and whether its
//! requests were cancelled, and small HTTP helpers over the router.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tandem_api::infer::{GenerateStream, Infer, InferError, OnDrop};
use tandem_api::types::{FinishReason, GenerateEvent, GenerateRequest, TokenOutput};
use tandem_model::{ChatTemplate, Tokenizer};
use tandem_server::{AppState, ServedModel, ServerConfig};
use tokio::sync::{mpsc, Semaphore};
use tower::ServiceExt;

pub const MODEL: &str = "test-model";
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
pub const BOS: u32 = 256;
pub const EOS: u32 = 257;

/// GPT-2's printable stand-ins for the 256 byte values.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut chars = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        chars[b as usize] = if printable.contains(&b) {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    chars
}

/// A byte-level BPE tokenizer: every byte is a token (so multi-byte
/// characters span several tokens), a few merges make multi-byte tokens, and
/// ChatML's special tokens are 256 and 257.
pub fn tokenizer() -> Tokenizer {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;

    let chars = byte_chars();
    let mut vocab: Vocab = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    vocab.insert("<|im_start|>".into(), BOS);
    vocab.insert("<|im_end|>".into(), EOS);
    let merges = [("H", "e"), ("l", "l"), ("He", "ll"), ("Ġ", "w"), ("o", "r")];
    for (id, (a, b)) in (258..).zip(merges) {
        vocab.insert(format!("{a}{b}"), id);
    }
    let merges = merges
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .expect("valid BPE");
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    inner.add_special_tokens(&[
        AddedToken::from("<|im_start|>", true),
        AddedToken::from("<|im_end|>", true),
    ]);
    Tokenizer::new(inner, Some(BOS), vec![EOS], false)
}

/// How the fake answers `generate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accept,
    /// Admit this many more requests, then answer as `Overloaded`.
    AcceptOnly(usize),
    Overloaded,
    Unavailable,
    /// Admit, then report an engine error instead of tokens.
    FailAfterStart,
}

/// A fake engine: answers every request with the tokens of `reply` (up to
/// `max_tokens`), then `Finished(Stop)`, or `Finished(Length)` when cut.
pub struct FakeInfer {
    reply: Vec<u32>,
    admission: Mutex<Admission>,
    ready: AtomicBool,
    /// When set, each token waits for a permit: tests hold requests in flight.
    gate: Option<Arc<Semaphore>>,
    token_delay: Duration,
    /// The logprob of every token of a request, when it asks for logprobs.
    token_logprob: fn(&GenerateRequest) -> f32,
    pub requests: Mutex<Vec<GenerateRequest>>,
    /// Ids of requests whose stream was dropped before `Finished`.
    pub cancelled: Arc<Mutex<Vec<String>>>,
    /// Per request id, how many tokens the fake actually sent.
    pub tokens_sent: Arc<Mutex<HashMap<String, usize>>>,
}

impl FakeInfer {
    pub fn replying(reply: Vec<u32>) -> Self {
        Self {
            reply,
            admission: Mutex::new(Admission::Accept),
            ready: AtomicBool::new(true),
            gate: None,
            token_delay: Duration::ZERO,
            token_logprob: |_| -0.5,
            requests: Mutex::new(Vec::new()),
            cancelled: Arc::new(Mutex::new(Vec::new())),
            tokens_sent: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn with_gate(mut self, gate: Arc<Semaphore>) -> Self {
        self.gate = Some(gate);
        self
    }

    pub fn with_token_delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    pub fn with_token_logprob(mut self, logprob: fn(&GenerateRequest) -> f32) -> Self {
        self.token_logprob = logprob;
        self
    }

    pub fn set_admission(&self, admission: Admission) {
        *self.admission.lock().unwrap() = admission;
    }

    pub fn last_request(&self) -> GenerateRequest {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }

    pub fn cancelled_ids(&self) -> Vec<String> {
        self.cancelled.lock().unwrap().clone()
    }
}

impl Infer for FakeInfer {
    fn generate(&self, request: GenerateRequest) -> Result<GenerateStream, InferError> {
        let admission = {
            let mut admission = self.admission.lock().unwrap();
            if let Admission::AcceptOnly(left) = *admission {
                *admission = match left {
                    0 => Admission::Overloaded,
                    n => Admission::AcceptOnly(n - 1),
                };
            }
            *admission
        };
        match admission {
            Admission::Overloaded => return Err(InferError::Overloaded("queue is full".into())),
            Admission::Unavailable => return Err(InferError::Unavailable("engine stopped".into())),
            Admission::Accept | Admission::AcceptOnly(_) | Admission::FailAfterStart => {}
        }
        self.requests.lock().unwrap().push(request.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let finished = Arc::new(AtomicBool::new(false));
        let reply = self.reply.clone();
        let gate = self.gate.clone();
        let delay = self.token_delay;
        let sent_counts = self.tokens_sent.clone();
        let finished_in_task = finished.clone();
        let id = request.id.clone();
        let logprob = (self.token_logprob)(&request);
        tokio::spawn(async move {
            let _ = tx.send(GenerateEvent::Started {
                prompt_tokens: request.prompt.len(),
                cached_tokens: 0,
            });
            if let Some(k) = request.sampling.prompt_logprobs {
                // Prompt token i (from the second on) gets -i/10, its alternatives below it.
                let tokens = request.prompt[1..]
                    .iter()
                    .zip(1..)
                    .map(|(&id, i)| TokenOutput {
                        id,
                        logprob: Some(-(i as f32) / 10.0),
                        top_logprobs: (0..k).map(|j| (id, -1.0 - j as f32)).collect(),
                    })
                    .collect();
                let _ = tx.send(GenerateEvent::PromptLogprobs(tokens));
            }
            if admission == Admission::FailAfterStart {
                finished_in_task.store(true, Ordering::SeqCst);
                let _ = tx.send(GenerateEvent::Error("device lost".into()));
                return;
            }
            let max = request.stop.max_tokens;
            let mut sent = 0;
            for &token in reply.iter().take(max) {
                if let Some(gate) = &gate {
                    gate.acquire().await.expect("gate open").forget();
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let output = TokenOutput {
                    id: token,
                    logprob: request.sampling.logprobs.map(|_| logprob),
                    top_logprobs: (0..request.sampling.logprobs.unwrap_or(0))
                        .map(|i| (token, -1.0 - i as f32))
                        .collect(),
                };
                if tx.send(GenerateEvent::Token(output)).is_err() {
                    break;
                }
                sent += 1;
                sent_counts.lock().unwrap().insert(id.clone(), sent);
            }
            let reason = if sent == max && reply.len() > max {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            finished_in_task.store(true, Ordering::SeqCst);
            let _ = tx.send(GenerateEvent::Finished(reason));
        });
        let cancelled = self.cancelled.clone();
        let id = request.id;
        let on_drop = OnDrop::new(move || {
            if !finished.load(Ordering::SeqCst) {
                cancelled.lock().unwrap().push(id);
            }
        });
        Ok(GenerateStream::new(rx, on_drop))
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// A ready server over `fake` with a context of `max_model_len` tokens.
pub fn state_with(fake: Arc<FakeInfer>, max_model_len: usize) -> Arc<AppState> {
    let tokenizer = tokenizer();
    let template = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
    let mut config = ServerConfig::new(MODEL);
    config.shutdown_grace = Duration::from_secs(5);
    AppState::with_model(
        config,
        ServedModel {
            infer: fake,
            tokenizer,
            chat_template: Some(template),
            max_model_len,
        },
    )
}

pub fn encode(text: &str) -> Vec<u32> {
    tokenizer().encode(text).unwrap()
}

/// A request to `path` with a JSON body.
pub fn post_json(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

/// Send one request through the router; status, headers and the whole body.
pub async fn send(
    router: &Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

pub async fn send_json(router: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let (status, _, body) = send(router, request).await;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, value)
}

/// The `data:` payloads of an SSE body, checking the framing on the way:
/// every event is exactly one `data: ...` line followed by a blank line.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).expect("SSE body is UTF-8");
    assert!(
        text.ends_with("\n\n"),
        "SSE body must end with a blank line: {text:?}"
    );
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event is not a data line: {event:?}"));
            assert!(!data.contains('\n'), "one data line per event: {event:?}");
            data.to_string()
        })
        .collect()
}

/// The JSON chunks of an SSE body, asserting it ends with `data: [DONE]`.
pub fn sse_chunks(body: &[u8]) -> Vec<Value> {
    let mut data = sse_data(body);
    assert_eq!(
        data.pop().as_deref(),
        Some("[DONE]"),
        "stream must end with [DONE]"
    );
    data.iter()
        .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
        .collect()
}

/// Poll `cond` for up to two seconds.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Start `serve` on an ephemeral loopback port; returns the address, the
/// trigger that plays SIGTERM, and the server task.
pub async fn start_server(
    state: Arc<AppState>,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tandem_server::serve(listener, state, async move {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

/// Write one HTTP/1.1 request (`Connection: close`) on a fresh connection.
pub async fn open_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    Ok(stream)
}

/// Read a whole response to EOF: status and de-chunked body.
pub async fn read_response(mut stream: tokio::net::TcpStream) -> (u16, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = &raw[split + 4..];
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_vec()
        },
    )
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .expect("hex chunk size");
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
