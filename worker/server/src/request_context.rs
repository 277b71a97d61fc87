//! Every HTTP request's identity: its `x-request-id` (the client's, when
//! usable, else a new one), echoed on the response, errors and streams
//! included; and, except for `/health` and `/metrics` (polled, not served),
//! its span: the `request_id` on every log line about it, the trace's server
//! span (child of the client's `traceparent`), and one `request finished`
//! line when the response ends (for a stream, when its last event is sent or
//! the client goes away).

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use tracing::Instrument;

use tandem_telemetry::propagation::{extract_http, request_id_from_headers, REQUEST_ID_HEADER};

pub async fn request_context(request: Request, next: Next) -> Response {
    let request_id = request_id_from_headers(request.headers());
    let echo = HeaderValue::from_str(&request_id).expect("sanitized request ids are header-safe");
    let path = request.uri().path();
    if path == "/health" || path == "/metrics" {
        let mut response = next.run(request).await;
        response.headers_mut().insert(REQUEST_ID_HEADER, echo);
        return response;
    }
    let method = request.method().clone();
    // The route, not the path: `/v1/models/{*model}` is one name, and unknown
    // paths do not make a span name each.
    let name = match request.extensions().get::<MatchedPath>() {
        Some(route) => format!("{method} {}", route.as_str()),
        None => method.to_string(),
    };
    let span = tandem_telemetry::request_span(
        &name,
        "server",
        &request_id,
        Some(extract_http(request.headers())),
    );
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    response.headers_mut().insert(REQUEST_ID_HEADER, echo);
    let finished = Finished {
        span,
        name,
        status: response.status().as_u16(),
        started,
    };
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        return response;
    }
    // The request lasts as long as its stream: the span and the log line end
    // with the body.
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _ = &finished;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// Ends a request: one log line, and the span closes with it.
struct Finished {
    span: tracing::Span,
    name: String,
    status: u16,
    started: Instant,
}

impl Drop for Finished {
    fn drop(&mut self) {
        tandem_telemetry::record_http_status(&self.span, self.status);
        let _in_request = self.span.enter();
        tracing::info!(
            route = %self.name,
            status = self.status,
            elapsed_ms = (self.started.elapsed().as_secs_f64() * 1e3).round() as u64,
            trace_id = tandem_telemetry::current_trace_id().as_deref(),
            "request finished"
        );
    }
}
