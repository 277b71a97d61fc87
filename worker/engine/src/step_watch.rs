//! Notices engine steps far slower than the recent ones and says what they
//! held, so a stall seen from outside (a token gap of 50 ms on a worker whose
//! steps take 10) can be explained from the worker's log.
//!
//! Steps are compared only with steps of their own kind: a step that computes
//! prompt tokens is legitimately slower than a decode-only step, so each kind
//! keeps its own window of recent durations. A step slower than
//! [`SLOW_STEP_FACTOR`] × its kind's median (and at least
//! [`SLOW_STEP_MIN_EXCESS`] above it, so microsecond noise on a CPU backend is
//! never news) is reported, at most once per [`REPORT_INTERVAL`]; the steps
//! left unreported in between are counted in the next report.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A step this many times its kind's recent median is slow.
pub const SLOW_STEP_FACTOR: f64 = 3.0;
/// ... and at least this much longer than the median.
pub const SLOW_STEP_MIN_EXCESS: Duration = Duration::from_millis(2);
/// Steps of a kind remembered for its median.
pub const WINDOW: usize = 64;
/// Steps of a kind seen before any is judged (a median of a few is noise).
pub const MIN_SAMPLES: usize = 16;
/// At most one report per this interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// What one engine iteration held and where its time went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepFacts {
    /// Sequences in the batch.
    pub sequences: usize,
    /// Of which decoding one token.
    pub decodes: usize,
    /// Prompt tokens computed.
    pub prefill_tokens: usize,
    /// Sequences admitted this step (prefix-cache lookup, blocks allocated).
    pub admitted: usize,
    /// Of which adopting KV a peer wrote into reserved blocks (cuda-ipc).
    pub adopted: usize,
    /// Of which installing KV shipped over the wire (gRPC).
    pub imported: usize,
    pub preempted: usize,
    /// Commands taken from the handles before the step (new requests,
    /// cancellations, reservations).
    pub commands: usize,
    /// CUDA graphs the backend captured during the step (a capture stalls
    /// the step by its eager run and instantiation).
    pub graphs_captured: usize,
    /// Time in the backend (forward, KV installs and reads).
    pub backend: Duration,
    /// The whole iteration: commands, scheduling, backend, streaming.
    pub total: Duration,
}

impl StepFacts {
    /// Host time: everything of the iteration outside the backend.
    pub fn host(&self) -> Duration {
        self.total.saturating_sub(self.backend)
    }

    fn kind(&self) -> StepKind {
        if self.prefill_tokens > 0 {
            StepKind::WithPrefill
        } else {
            StepKind::DecodeOnly
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    DecodeOnly,
    WithPrefill,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::DecodeOnly => "decode-only",
            StepKind::WithPrefill => "with prefill",
        }
    }
}

/// Recent durations of one kind of step.
#[derive(Debug, Default)]
struct Recent {
    durations: VecDeque<Duration>,
    /// Scratch for the median, kept to avoid an allocation per step.
    sorted: Vec<Duration>,
}

impl Recent {
    fn median(&mut self) -> Option<Duration> {
        if self.durations.len() < MIN_SAMPLES {
            return None;
        }
        self.sorted.clear();
        self.sorted.extend(self.durations.iter().copied());
        let mid = self.sorted.len() / 2;
        Some(*self.sorted.select_nth_unstable(mid).1)
    }

    fn push(&mut self, d: Duration) {
        if self.durations.len() == WINDOW {
            self.durations.pop_front();
        }
        self.durations.push_back(d);
    }
}

/// A step found slow, to be reported.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowStep {
    pub kind: StepKind,
    pub facts: StepFacts,
    /// The median of the kind's recent steps it was compared with.
    pub median: Duration,
    /// Slow steps not reported since the previous report (rate limit).
    pub unreported_before: u64,
}

/// Watches the engine's iterations for slow steps.
#[derive(Debug, Default)]
pub struct StepWatch {
    decode_only: Recent,
    with_prefill: Recent,
    last_report: Option<Instant>,
    unreported: u64,
}

impl StepWatch {
    /// Judges one iteration that ran a step, ended at `now`; returns it when
    /// it is slow and a report is due. Iterations without a batch are not
    /// steps and are ignored by the caller.
    pub fn observe(&mut self, facts: &StepFacts, now: Instant) -> Option<SlowStep> {
        let kind = facts.kind();
        let recent = match kind {
            StepKind::DecodeOnly => &mut self.decode_only,
            StepKind::WithPrefill => &mut self.with_prefill,
        };
        let median = recent.median();
        recent.push(facts.total);
        let median = median?;
        let slow = facts.total.as_secs_f64() > SLOW_STEP_FACTOR * median.as_secs_f64()
            && facts.total >= median + SLOW_STEP_MIN_EXCESS;
        if !slow {
            return None;
        }
        let due = self
            .last_report
            .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_INTERVAL);
        if !due {
            self.unreported += 1;
            return None;
        }
        self.last_report = Some(now);
        Some(SlowStep {
            kind,
            facts: facts.clone(),
            median,
            unreported_before: std::mem::take(&mut self.unreported),
        })
    }
}

impl SlowStep {
    /// Logs the report as a warning with every fact as a field.
    pub fn log(&self, role: &str) {
        let f = &self.facts;
        tracing::warn!(
            role,
            kind = self.kind.as_str(),
            step_ms = ms(f.total),
            median_ms = ms(self.median),
            backend_ms = ms(f.backend),
            host_ms = ms(f.host()),
            sequences = f.sequences,
            decodes = f.decodes,
            prefill_tokens = f.prefill_tokens,
            admitted = f.admitted,
            adopted = f.adopted,
            imported = f.imported,
            preempted = f.preempted,
            commands = f.commands,
            graphs_captured = f.graphs_captured,
            unreported_before = self.unreported_before,
            "slow engine step: {:.1} ms against a median of {:.1} ms for {} steps",
            ms(f.total),
            ms(self.median),
            self.kind.as_str()
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(ms: u64) -> StepFacts {
        StepFacts {
            sequences: 32,
            decodes: 32,
            total: Duration::from_millis(ms),
            ..StepFacts::default()
        }
    }

    fn prefill(ms: u64) -> StepFacts {
        StepFacts {
            prefill_tokens: 3000,
            ..decode(ms)
        }
    }

    #[test]
    fn a_step_far_above_its_kinds_median_is_reported_with_what_it_held() {
        let mut watch = StepWatch::default();
        let t0 = Instant::now();
        for i in 0..MIN_SAMPLES {
            assert_eq!(watch.observe(&decode(10 + (i % 3) as u64), t0), None);
        }
        assert_eq!(watch.observe(&decode(25), t0), None, "2.5x is not slow");
        let stall = StepFacts {
            adopted: 1,
            admitted: 1,
            graphs_captured: 1,
            backend: Duration::from_millis(48),
            ..decode(50)
        };
        let slow = watch.observe(&stall, t0).expect("5x the median is slow");
        assert_eq!(slow.kind, StepKind::DecodeOnly);
        assert_eq!(slow.median, Duration::from_millis(11));
        assert_eq!(slow.facts, stall);
        assert_eq!(slow.facts.host(), Duration::from_millis(2));
        assert_eq!(slow.unreported_before, 0);
    }

    #[test]
    fn prefill_steps_are_judged_against_prefill_steps_only() {
        let mut watch = StepWatch::default();
        let t0 = Instant::now();
        for _ in 0..MIN_SAMPLES {
            watch.observe(&decode(10), t0);
            watch.observe(&prefill(90), t0);
        }
        assert_eq!(
            watch.observe(&prefill(100), t0),
            None,
            "a usual prefill step"
        );
        let slow = watch
            .observe(&prefill(400), t0)
            .expect("4x the prefill median");
        assert_eq!(slow.kind, StepKind::WithPrefill);
        assert_eq!(slow.median, Duration::from_millis(90));
    }

    #[test]
    fn nothing_is_judged_before_enough_steps_nor_on_microsecond_noise() {
        let mut watch = StepWatch::default();
        let t0 = Instant::now();
        for _ in 0..MIN_SAMPLES - 1 {
            watch.observe(&decode(10), t0);
        }
        assert_eq!(watch.observe(&decode(100), t0), None, "too few steps yet");
        let mut watch = StepWatch::default();
        let tiny = |us| StepFacts {
            total: Duration::from_micros(us),
            ..StepFacts::default()
        };
        for _ in 0..MIN_SAMPLES {
            watch.observe(&tiny(20), t0);
        }
        assert_eq!(
            watch.observe(&tiny(200), t0),
            None,
            "10x of 20 us is below the minimum excess"
        );
    }

    #[test]
    fn reports_are_rate_limited_and_count_what_they_skipped() {
        let mut watch = StepWatch::default();
        let t0 = Instant::now();
        for _ in 0..MIN_SAMPLES {
            watch.observe(&decode(10), t0);
        }
        assert!(watch.observe(&decode(60), t0).is_some());
        let soon = t0 + REPORT_INTERVAL / 2;
        assert_eq!(watch.observe(&decode(60), soon), None);
        assert_eq!(watch.observe(&decode(60), soon), None);
        let later = t0 + REPORT_INTERVAL;
        let slow = watch.observe(&decode(60), later).expect("interval passed");
        assert_eq!(slow.unreported_before, 2);
    }
}
