//! Logs and traces of every Tandem process (docs/tracing.md).
//!
//! - [`init`]: logs to stderr as text or JSON (`--log-format`, `RUST_LOG`), and
//!   when the standard `OTEL_*` variables name an OTLP endpoint, traces
//!   exported over OTLP ([`otlp`]). Without an endpoint no exporter, no
//!   OpenTelemetry layer and no phase spans exist: tracing costs nothing.
//! - [`request_span`]: the `tracing` span of one request in one process. It
//!   carries the request id (a `request_id` field on every log line inside
//!   it) and, with tracing on, is that process's OpenTelemetry span for the
//!   request, child of the caller's (`traceparent`).
//! - [`propagation`]: trace context and request id in and out of HTTP headers
//!   and gRPC metadata.
//! - [`phases`]: the phase spans (`queue`, `prefill`, `kv_transfer`,
//!   `decode`) built after the fact from timestamps read at phase boundaries.

pub mod otlp;
pub mod phases;
pub mod propagation;

use std::sync::OnceLock;

use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

pub use opentelemetry::KeyValue;
pub use propagation::{MAX_REQUEST_ID_LEN, REQUEST_ID_HEADER};

/// The `tracing` target of request spans. Only spans of this target become
/// OpenTelemetry spans; it is always enabled at `info` so `request_id` is on
/// every log line of a request whatever `RUST_LOG` says.
pub const REQUEST_TARGET: &str = "tandem::request";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event; the request span's fields, among
    /// them `request_id`, prefix the message.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with
    /// `message`), `target`, `span` and `spans` (with `request_id`); the
    /// operator's `--log-format json`.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: json or text")),
        }
    }
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Keeps the trace exporter running; dropping it flushes the spans not yet
/// exported and stops it. Hold it in `main` until the process ends.
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    otlp: Option<otlp::Exporting>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing(&self) -> bool {
        self.otlp.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(exporting) = self.otlp.take() {
            exporting.shutdown();
        }
    }
}

/// Starts logging in `format` and, when configured by `OTEL_*`, trace export
/// as service `default_service` (unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` names one). Logs go to stderr, filtered by
/// `RUST_LOG` (default `info`). A second call only returns a handle that
/// does nothing.
pub fn init(default_service: &str, format: LogFormat) -> Telemetry {
    use std::io::IsTerminal;
    let (exporting, otlp_error) = match otlp::from_env(default_service) {
        Ok(exporting) => (exporting, None),
        Err(e) => (None, Some(e)),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = match format!("{REQUEST_TARGET}=info").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        // Colour codes only help a person at a terminal; in log files they are noise.
        LogFormat::Text => fmt
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![
        RequestIdLayer
            .with_filter(filter_fn(|m| m.is_span() && m.target() == REQUEST_TARGET))
            .boxed(),
        fmt,
    ];
    if let Some(exporting) = &exporting {
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(exporting.tracer())
                .with_location(false)
                .with_threads(false)
                .with_level(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_filter(filter_fn(|m| m.is_span() && m.target() == REQUEST_TARGET))
                .boxed(),
        );
    }
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_err()
    {
        return Telemetry { otlp: None };
    }
    if let Some(e) = otlp_error {
        tracing::error!("trace export is off: {e}");
    }
    if let Some(exporting) = &exporting {
        tracing::info!(
            service = exporting.service(),
            protocol = exporting.protocol(),
            "exporting traces over OTLP"
        );
        let _ = TRACER.set(exporting.tracer());
    }
    Telemetry { otlp: exporting }
}

static TRACER: OnceLock<opentelemetry_sdk::trace::SdkTracer> = OnceLock::new();

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

pub(crate) fn tracer() -> Option<&'static opentelemetry_sdk::trace::SdkTracer> {
    TRACER.get()
}

/// The span of one request in this process: a `server` span (an HTTP
/// request, an incoming RPC) or a `client` span (an outgoing RPC), named
/// `name` in traces. Its `request_id` field is on every log line inside it.
/// `parent`: the caller's trace context for a server span (empty: a new
/// trace); `None` makes it a child of the current span.
pub fn request_span(
    name: &str,
    kind: &'static str,
    request_id: &str,
    parent: Option<Context>,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: REQUEST_TARGET,
        "request",
        otel.name = name,
        otel.kind = kind,
        request_id = request_id,
    );
    if let (Some(parent), true) = (parent, enabled()) {
        let _ = span.set_parent(parent);
    }
    span
}

/// A child span of the current request span with real timing (entered
/// while the work runs), e.g. `route`.
pub fn phase_span(name: &'static str) -> tracing::Span {
    tracing::info_span!(target: REQUEST_TARGET, "phase", otel.name = name)
}

/// A client span for an outgoing RPC of the current request (named like the
/// RPC, e.g. `tandem.Decode/Generate`); its context is what goes in the
/// call's metadata.
pub fn client_span(name: &'static str) -> tracing::Span {
    tracing::info_span!(target: REQUEST_TARGET, "rpc", otel.name = name, otel.kind = "client")
}

/// Sets a span attribute (nothing with tracing off).
pub fn set_attribute(
    span: &tracing::Span,
    key: &'static str,
    value: impl Into<opentelemetry::Value>,
) {
    if enabled() {
        span.set_attribute(key, value);
    }
}

/// The HTTP status of a server span's answer; 5xx marks the span failed.
pub fn record_http_status(span: &tracing::Span, status: u16) {
    if !enabled() {
        return;
    }
    span.set_attribute("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.set_status(opentelemetry::trace::Status::error(format!(
            "HTTP {status}"
        )));
    }
}

/// Marks a span failed (nothing with tracing off).
pub fn set_error(span: &tracing::Span, description: impl Into<std::borrow::Cow<'static, str>>) {
    if enabled() {
        span.set_status(opentelemetry::trace::Status::error(description));
    }
}

/// The OpenTelemetry context of the current `tracing` span (empty when
/// tracing is off or outside a request).
pub fn current_context() -> Context {
    if !enabled() {
        return Context::new();
    }
    // Entering a request span makes its context the current one (context
    // activation), also under spans of other targets inside it, which have
    // no OpenTelemetry span of their own.
    let cx = Context::current();
    if cx.span().span_context().is_valid() {
        return cx;
    }
    tracing::Span::current().context()
}

/// The trace id of the current request span, as 32 hex digits (`None` when
/// tracing is off).
pub fn current_trace_id() -> Option<String> {
    let cx = current_context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The request id of the current request span (or of the nearest one above
/// the current span).
pub fn current_request_id() -> Option<String> {
    tracing::Span::current()
        .with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<Registry>()?;
            let span = registry.span(id)?;
            span.scope()
                .find_map(|s| s.extensions().get::<RequestId>().map(|r| r.0.clone()))
        })
        .flatten()
}

/// The request id of a request span, kept where [`current_request_id`]
/// finds it.
struct RequestId(String);

/// Keeps each request span's `request_id` field in the span's extensions.
struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let mut visitor = RequestIdVisitor(None);
        attrs.record(&mut visitor);
        if let (Some(request_id), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().insert(RequestId(request_id));
        }
    }
}

struct RequestIdVisitor(Option<String>);

impl Visit for RequestIdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "request_id" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "request_id" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_as_the_flag_spells_them() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("JSON ".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Json.as_str(), "json");
    }

    #[test]
    fn the_request_id_of_a_request_span_is_found_from_inside_it() {
        let subscriber = tracing_subscriber::registry().with(
            RequestIdLayer.with_filter(filter_fn(|m| m.is_span() && m.target() == REQUEST_TARGET)),
        );
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current_request_id(), None);
            let span = request_span("POST /v1/completions", "server", "abc-1", None);
            let _entered = span.enter();
            assert_eq!(current_request_id().as_deref(), Some("abc-1"));
            // A phase span inside inherits it.
            let phase = phase_span("route");
            let _in_phase = phase.enter();
            assert_eq!(current_request_id().as_deref(), Some("abc-1"));
        });
    }
}
