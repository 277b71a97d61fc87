//! Phase spans known only after the fact, built with explicit start and end
//! times from clock readings taken at the phase boundaries: where a request
//! waits for the engine (`queue`), its prompt is computed (`prefill`), its KV
//! travels (`kv_transfer`) and its tokens are generated (`decode`).
//!
//! Boundaries are read where the engine's events arrive (the request's
//! stream), never on the engine's step loop. With tracing off, [`Phases`] is
//! never created and nothing is read.

use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};

/// Records one finished span, child of `parent`.
pub fn record(
    parent: &Context,
    name: &'static str,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) {
    let Some(tracer) = crate::tracer() else {
        return;
    };
    if !parent.span().span_context().is_valid() {
        return;
    }
    let end = end.max(start);
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    span.end_with_timestamp(end);
}

/// The engine phases of one generation, as seen by whoever reads its event
/// stream: submitted → admitted (`queue`) → first token (`prefill`) → last
/// token (`decode`).
pub struct Phases {
    parent: Context,
    submitted: SystemTime,
    admitted: Option<SystemTime>,
    first_token: Option<SystemTime>,
    tokens: usize,
    /// The prompt was prefilled by another worker (which records `queue`
    /// and `prefill`): only `decode` is recorded here.
    prefilled_elsewhere: bool,
    finished: bool,
}

impl Phases {
    /// Starts timing a generation submitted now, under the current span;
    /// `None` (and no cost) when tracing is off.
    pub fn start(prefilled_elsewhere: bool) -> Option<Self> {
        if !crate::enabled() {
            return None;
        }
        let parent = crate::current_context();
        Some(Self::under(parent, SystemTime::now(), prefilled_elsewhere))
    }

    /// Starts timing a generation submitted at `submitted`, under `parent`.
    pub fn under(parent: Context, submitted: SystemTime, prefilled_elsewhere: bool) -> Self {
        Self {
            parent,
            submitted,
            admitted: None,
            first_token: None,
            tokens: 0,
            prefilled_elsewhere,
            finished: false,
        }
    }

    /// The prompt turned out to be prefilled by another worker.
    pub fn prefilled_elsewhere(mut self) -> Self {
        self.prefilled_elsewhere = true;
        self
    }

    /// The engine admitted the request (its `Started` event).
    pub fn admitted(&mut self) {
        self.admitted.get_or_insert_with(SystemTime::now);
    }

    /// A token arrived.
    pub fn token(&mut self) {
        self.tokens += 1;
        self.first_token.get_or_insert_with(SystemTime::now);
    }

    /// The generation ended (`reason`: stop, length, cancelled, error):
    /// records its spans. Later calls do nothing.
    pub fn finish(&mut self, reason: &'static str) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let now = SystemTime::now();
        let p = &self.parent;
        if !self.prefilled_elsewhere {
            let admitted = self.admitted.unwrap_or(now);
            record(p, "queue", self.submitted, admitted, Vec::new());
            if self.admitted.is_some() {
                let prefilled = self.first_token.unwrap_or(now);
                record(p, "prefill", admitted, prefilled, Vec::new());
            }
        }
        if let Some(first) = self.first_token {
            record(
                p,
                "decode",
                first,
                now,
                vec![
                    KeyValue::new("tandem.completion_tokens", self.tokens as i64),
                    KeyValue::new("tandem.finish_reason", reason),
                ],
            );
        }
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        // Dropped unfinished: the caller went away.
        self.finish("cancelled");
    }
}

/// `at` moved back by `seconds` (a duration measured elsewhere ending at `at`).
pub fn before(at: SystemTime, seconds: f64) -> SystemTime {
    let back = Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or_default();
    at.checked_sub(back).unwrap_or(at)
}
