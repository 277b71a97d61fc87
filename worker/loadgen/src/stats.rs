//! Latency percentiles and the run report computed from per-request records.

use std::time::Duration;

use serde::Serialize;

/// The `q`-quantile (`0.0 ..= 1.0`) of `sorted` (ascending), interpolating
/// linearly between the two nearest ranks (numpy's default), so small samples
/// are not rounded to one of their points. `None` for an empty sample.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Distribution of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

impl LatencySummary {
    /// `None` when there is no sample (e.g. ITL when every request produced one token).
    pub fn of(samples: &[Duration]) -> Option<Self> {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Some(Self {
            count: ms.len(),
            mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
            p50_ms: percentile(&ms, 0.50)?,
            p90_ms: percentile(&ms, 0.90)?,
            p99_ms: percentile(&ms, 0.99)?,
        })
    }
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// When it was sent, from the start of the run.
    pub sent_at: Duration,
    /// Time to the first streamed content; `None` if none arrived.
    pub ttft: Option<Duration>,
    /// Every gap between consecutive content chunks.
    pub itls: Vec<Duration>,
    /// Send to end of stream.
    pub e2e: Duration,
    /// Output tokens: the server's `usage.completion_tokens` when it reports
    /// usage, else the number of content chunks.
    pub output_tokens: usize,
    /// `Some` when the request failed (HTTP status, transport, bad stream).
    pub error: Option<String>,
}

impl RequestRecord {
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }

    /// Mean gap between tokens (time per output token after the first).
    pub fn mean_itl(&self) -> Option<Duration> {
        let n = u32::try_from(self.itls.len()).ok().filter(|&n| n > 0)?;
        Some(self.itls.iter().sum::<Duration>() / n)
    }
}

/// Latency objectives; a request meets them when its TTFT and its mean ITL
/// are both within bounds (an unset bound always holds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
}

impl Slo {
    pub fn met_by(&self, r: &RequestRecord) -> bool {
        let Some(ttft) = r.ttft.filter(|_| r.succeeded()) else {
            return false;
        };
        let ttft_ok = self.ttft_ms.is_none_or(|b| ttft.as_secs_f64() * 1e3 <= b);
        let itl_ok = self
            .itl_ms
            .is_none_or(|b| r.mean_itl().is_none_or(|itl| itl.as_secs_f64() * 1e3 <= b));
        ttft_ok && itl_ok
    }
}

/// The result of a run, as printed and as written to `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub requests: usize,
    pub succeeded: usize,
    pub errors: usize,
    /// Up to a few distinct error messages, for diagnosis.
    pub error_samples: Vec<String>,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens: usize,
    pub output_tokens_per_s: f64,
    pub slo: Slo,
    /// Successful requests meeting both SLOs.
    pub slo_met: usize,
    /// `slo_met` per second of the run.
    pub goodput_per_s: f64,
    pub ttft: Option<LatencySummary>,
    pub itl: Option<LatencySummary>,
    pub e2e: Option<LatencySummary>,
    /// Every request in send order, so objectives, warm-up cuts and
    /// percentiles can be recomputed from the JSON without a rerun.
    pub records: Vec<RecordJson>,
}

/// One request as the JSON report lists it; times in milliseconds (rounded
/// to microseconds), `None` where nothing arrived.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordJson {
    pub sent_ms: f64,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    pub output_tokens: usize,
    /// Every gap between consecutive content chunks.
    pub itl_ms: Vec<f64>,
    pub error: Option<String>,
}

impl RecordJson {
    fn of(r: &RequestRecord) -> Self {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        Self {
            sent_ms: ms(r.sent_at),
            ttft_ms: r.ttft.map(ms),
            e2e_ms: ms(r.e2e),
            output_tokens: r.output_tokens,
            itl_ms: r.itls.iter().copied().map(ms).collect(),
            error: r.error.clone(),
        }
    }
}

impl Report {
    /// Summarises `records` of a run that took `duration` of wall time.
    pub fn from_records(records: &[RequestRecord], duration: Duration, slo: Slo) -> Self {
        let mut sorted: Vec<&RequestRecord> = records.iter().collect();
        sorted.sort_by_key(|r| r.sent_at);
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.succeeded()).collect();
        let mut error_samples: Vec<String> = Vec::new();
        for e in records.iter().filter_map(|r| r.error.as_ref()) {
            if error_samples.len() < 5 && !error_samples.contains(e) {
                error_samples.push(e.clone());
            }
        }
        let ttfts: Vec<Duration> = ok.iter().filter_map(|r| r.ttft).collect();
        let itls: Vec<Duration> = ok.iter().flat_map(|r| r.itls.iter().copied()).collect();
        let e2es: Vec<Duration> = ok.iter().map(|r| r.e2e).collect();
        let output_tokens = ok.iter().map(|r| r.output_tokens).sum();
        let slo_met = ok.iter().filter(|r| slo.met_by(r)).count();
        let secs = duration.as_secs_f64().max(f64::MIN_POSITIVE);
        Self {
            requests: records.len(),
            succeeded: ok.len(),
            errors: records.len() - ok.len(),
            error_samples,
            duration_s: duration.as_secs_f64(),
            requests_per_s: ok.len() as f64 / secs,
            output_tokens,
            output_tokens_per_s: output_tokens as f64 / secs,
            slo,
            slo_met,
            goodput_per_s: slo_met as f64 / secs,
            ttft: LatencySummary::of(&ttfts),
            itl: LatencySummary::of(&itls),
            e2e: LatencySummary::of(&e2es),
            records: sorted.into_iter().map(RecordJson::of).collect(),
        }
    }

    /// The human-readable table printed on stdout.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "requests: {} ok, {} errors in {:.2} s",
            self.succeeded, self.errors, self.duration_s
        );
        for e in &self.error_samples {
            let _ = writeln!(s, "  error: {e}");
        }
        let _ = writeln!(s, "requests/s:        {:>10.3}", self.requests_per_s);
        let _ = writeln!(s, "output tokens/s:   {:>10.1}", self.output_tokens_per_s);
        let _ = writeln!(
            s,
            "goodput (req/s):   {:>10.3}  ({} of {} met TTFT <= {} ms, mean ITL <= {} ms)",
            self.goodput_per_s,
            self.slo_met,
            self.requests,
            fmt_bound(self.slo.ttft_ms),
            fmt_bound(self.slo.itl_ms)
        );
        let _ = writeln!(
            s,
            "{:<10} {:>8} {:>10} {:>10} {:>10} {:>10}",
            "latency", "samples", "mean ms", "p50 ms", "p90 ms", "p99 ms"
        );
        for (name, summary) in [("TTFT", self.ttft), ("ITL", self.itl), ("E2E", self.e2e)] {
            match summary {
                Some(l) => {
                    let _ = writeln!(
                        s,
                        "{name:<10} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                        l.count, l.mean_ms, l.p50_ms, l.p90_ms, l.p99_ms
                    );
                }
                None => {
                    let _ = writeln!(s, "{name:<10} {:>8}", 0);
                }
            }
        }
        s
    }
}

fn fmt_bound(b: Option<f64>) -> String {
    b.map_or_else(|| "any".to_string(), |b| format!("{b}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let data: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&data, 0.0), Some(1.0));
        assert_eq!(percentile(&data, 1.0), Some(10.0));
        assert_eq!(percentile(&data, 0.5), Some(5.5));
        // rank 0.9 * 9 = 8.1 -> 9 + 0.1 * (10 - 9)
        assert!((percentile(&data, 0.9).unwrap() - 9.1).abs() < 1e-12);
        assert!((percentile(&data, 0.99).unwrap() - 9.91).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn summary_sorts_its_samples() {
        let s = LatencySummary::of(&[ms(30), ms(10), ms(20)]).unwrap();
        assert_eq!(s.count, 3);
        assert!((s.p50_ms - 20.0).abs() < 1e-9);
        assert!((s.mean_ms - 20.0).abs() < 1e-9);
        assert!((s.p99_ms - 29.8).abs() < 1e-9);
        assert!(LatencySummary::of(&[]).is_none());
    }

    fn record(ttft: u64, itls: &[u64], error: Option<&str>) -> RequestRecord {
        RequestRecord {
            sent_at: Duration::ZERO,
            ttft: Some(ms(ttft)),
            itls: itls.iter().map(|&v| ms(v)).collect(),
            e2e: ms(ttft + itls.iter().sum::<u64>()),
            output_tokens: itls.len() + 1,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn goodput_counts_requests_meeting_both_slos() {
        let records = vec![
            record(100, &[10, 10], None), // meets both
            record(300, &[10, 10], None), // TTFT too slow
            record(100, &[10, 50], None), // mean ITL 30 > 20
            record(100, &[10], Some("HTTP 500")),
        ];
        let slo = Slo {
            ttft_ms: Some(200.0),
            itl_ms: Some(20.0),
        };
        let r = Report::from_records(&records, Duration::from_secs(2), slo);
        assert_eq!((r.requests, r.succeeded, r.errors), (4, 3, 1));
        assert_eq!(r.slo_met, 1);
        assert!((r.goodput_per_s - 0.5).abs() < 1e-9);
        assert!((r.requests_per_s - 1.5).abs() < 1e-9);
        assert_eq!(r.output_tokens, 9);
        assert!((r.output_tokens_per_s - 4.5).abs() < 1e-9);
        assert_eq!(r.ttft.unwrap().count, 3);
        assert_eq!(r.itl.unwrap().count, 6);
        assert_eq!(r.error_samples, vec!["HTTP 500".to_string()]);
        let unbounded = Report::from_records(&records, Duration::from_secs(2), Slo::default());
        assert_eq!(unbounded.slo_met, 3);
    }
}
