//! `tandem bench` against a tiny in-test server that streams fake SSE with
//! known timings: the statistics it reports must match those timings.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tandem_loadgen::{
    self as bench, Arrivals, BenchConfig, Endpoint, LengthSpec, PromptSource, Slo, Stop,
};

const FIRST_TOKEN_MS: u64 = 80;
const GAP_MS: u64 = 30;
const TOKENS: usize = 5;

type Seen = Arc<Mutex<Vec<Value>>>;

/// Streams `TOKENS` content chunks: the first after `FIRST_TOKEN_MS`, the
/// others `GAP_MS` apart, then a usage chunk and `[DONE]`.
async fn chat(State(seen): State<Seen>, Json(body): Json<Value>) -> Response {
    seen.lock().unwrap().push(body);
    let events = futures::stream::unfold(0usize, |i| async move {
        let event = match i {
            0..TOKENS => {
                let wait = if i == 0 { FIRST_TOKEN_MS } else { GAP_MS };
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let chunk =
                    json!({"choices": [{"index": 0, "delta": {"content": format!("t{i}")}}]});
                format!("data: {chunk}\n\n")
            }
            TOKENS => {
                let usage = json!({"choices": [], "usage": {"completion_tokens": TOKENS}});
                format!("data: {usage}\n\n")
            }
            n if n == TOKENS + 1 => "data: [DONE]\n\n".to_string(),
            _ => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(event), i + 1))
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

async fn failing() -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, "engine on fire").into_response()
}

async fn serve() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(failing))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn config(url: String, endpoint: Endpoint, arrivals: Arrivals, requests: usize) -> BenchConfig {
    BenchConfig {
        url,
        model: "tiny".into(),
        endpoint,
        prompts: PromptSource::Synthetic(LengthSpec::Fixed(16)),
        output_len: LengthSpec::Fixed(TOKENS),
        arrivals,
        stop: Stop::Requests(requests),
        drain_timeout: None,
        slo: Slo {
            ttft_ms: Some(FIRST_TOKEN_MS as f64 + 150.0),
            itl_ms: Some(5.0),
        },
        seed: 7,
        progress: false,
        extra_body: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timings_of_a_streaming_server_are_measured() {
    let (url, seen) = serve().await;
    let report = bench::run(config(url, Endpoint::Chat, Arrivals::Concurrency(2), 6))
        .await
        .unwrap();
    assert_eq!(
        (report.requests, report.succeeded, report.errors),
        (6, 6, 0)
    );
    assert_eq!(report.output_tokens, 6 * TOKENS);

    let ttft = report.ttft.unwrap();
    assert_eq!(ttft.count, 6);
    // Sleeps never end early; a loaded machine may add, but not 100 ms.
    assert!(ttft.p50_ms >= FIRST_TOKEN_MS as f64, "{ttft:?}");
    assert!(ttft.p99_ms < FIRST_TOKEN_MS as f64 + 100.0, "{ttft:?}");
    let itl = report.itl.unwrap();
    assert_eq!(itl.count, 6 * (TOKENS - 1));
    // Gaps are measured on the client, so delivery jitter may shorten one gap
    // by what it lengthened the previous: check the mean and the median.
    assert!((itl.mean_ms - GAP_MS as f64).abs() < 15.0, "{itl:?}");
    assert!(itl.p50_ms >= GAP_MS as f64 - 5.0 && itl.p50_ms < GAP_MS as f64 + 40.0);
    // Every request is listed, in send order, with its own timings.
    assert_eq!(report.records.len(), 6);
    for pair in report.records.windows(2) {
        assert!(pair[0].sent_ms <= pair[1].sent_ms, "{pair:?}");
    }
    for r in &report.records {
        assert!(r.ttft_ms.unwrap() >= FIRST_TOKEN_MS as f64, "{r:?}");
        assert_eq!(r.itl_ms.len(), TOKENS - 1, "{r:?}");
        assert_eq!(r.output_tokens, TOKENS);
        assert!(r.e2e_ms >= r.ttft_ms.unwrap() + r.itl_ms.iter().sum::<f64>() - 1e-6);
        assert_eq!(r.error, None);
    }
    let e2e = report.e2e.unwrap();
    let min_e2e = (FIRST_TOKEN_MS + GAP_MS * (TOKENS as u64 - 1)) as f64;
    assert!(e2e.p50_ms >= min_e2e, "{e2e:?}");
    // Two clients back to back, 3 requests each.
    assert!(report.duration_s >= 3.0 * min_e2e / 1e3);
    assert!((report.requests_per_s - 6.0 / report.duration_s).abs() < 1e-9);
    // The ITL objective (5 ms) is below every gap: no request meets both.
    assert_eq!(report.slo_met, 0);
    assert_eq!(report.goodput_per_s, 0.0);

    let bodies = seen.lock().unwrap().clone();
    assert_eq!(bodies.len(), 6);
    let mut prefixes = Vec::new();
    for b in &bodies {
        assert_eq!(b["max_tokens"], json!(TOKENS));
        assert_eq!(b["ignore_eos"], json!(true));
        assert_eq!(b["stream"], json!(true));
        assert_eq!(b["model"], json!("tiny"));
        let content = b["messages"][0]["content"].as_str().unwrap();
        assert_eq!(content.split(' ').count(), 1 + 1 + 12);
        prefixes.push(content.split(':').next().unwrap().to_string());
    }
    prefixes.sort();
    prefixes.dedup();
    assert_eq!(prefixes.len(), 6, "every request has its own prefix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisson_arrivals_meet_a_loose_slo() {
    let (url, _) = serve().await;
    let mut cfg = config(
        url,
        Endpoint::Chat,
        Arrivals::Poisson {
            rate: 40.0,
            max_in_flight: None,
        },
        8,
    );
    cfg.slo.itl_ms = Some(GAP_MS as f64 + 100.0);
    let report = bench::run(cfg).await.unwrap();
    assert_eq!(report.succeeded, 8);
    assert_eq!(report.slo_met, 8);
    assert!((report.goodput_per_s - report.requests_per_s).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_counted_with_their_reason() {
    let (url, _) = serve().await;
    let report = bench::run(config(
        url,
        Endpoint::Completions,
        Arrivals::Concurrency(1),
        3,
    ))
    .await
    .unwrap();
    assert_eq!((report.succeeded, report.errors), (0, 3));
    assert!(report.ttft.is_none());
    assert_eq!(report.error_samples.len(), 1);
    assert!(
        report.error_samples[0].contains("HTTP 500") && report.error_samples[0].contains("on fire"),
        "{:?}",
        report.error_samples
    );
}

#[tokio::test]
async fn bad_settings_are_refused_before_sending() {
    let mut cfg = config(
        "127.0.0.1:1".into(),
        Endpoint::Chat,
        Arrivals::Concurrency(1),
        1,
    );
    assert!(bench::run(cfg.clone())
        .await
        .unwrap_err()
        .to_string()
        .contains("http://"));
    cfg.url = "http://127.0.0.1:1".into();
    cfg.arrivals = Arrivals::Poisson {
        rate: 0.0,
        max_in_flight: None,
    };
    assert!(bench::run(cfg)
        .await
        .unwrap_err()
        .to_string()
        .contains("--rate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_streaming_after_the_drain_period_are_cut_off() {
    let (url, _) = serve().await;
    let mut cfg = config(url, Endpoint::Chat, Arrivals::Concurrency(1), 1);
    // Sending stops at 50 ms and the drain ends at 70 ms: before the first
    // token (80 ms) of a stream that would take 200 ms.
    cfg.stop = Stop::Duration(Duration::from_millis(50));
    cfg.drain_timeout = Some(Duration::from_millis(20));
    let report = bench::run(cfg).await.unwrap();
    assert_eq!((report.requests, report.succeeded), (1, 0));
    assert_eq!(
        report.error_samples,
        vec![bench::client::CUT_OFF.to_string()]
    );
    assert_eq!(report.records[0].ttft_ms, None);
    let whole_stream_s = (FIRST_TOKEN_MS + GAP_MS * (TOKENS as u64 - 1)) as f64 / 1e3;
    assert!(
        report.duration_s < whole_stream_s,
        "the run waited for the whole stream: {} s",
        report.duration_s
    );
}

#[tokio::test]
async fn a_drain_timeout_without_a_duration_is_refused() {
    let mut cfg = config(
        "http://127.0.0.1:1".into(),
        Endpoint::Chat,
        Arrivals::Concurrency(1),
        1,
    );
    cfg.drain_timeout = Some(Duration::from_secs(1));
    let err = bench::run(cfg).await.unwrap_err().to_string();
    assert!(err.contains("--drain-timeout needs --duration"), "{err}");
}
