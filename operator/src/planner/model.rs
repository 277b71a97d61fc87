//! Per-tier throughput models learned online from the observations themselves (no profiling).
//!
//! Each model answers one question: how much load (tokens/s) can one ready replica carry while
//! the tier's p90 latency stays at a given target? The planner divides the demand by that
//! capacity to get a replica count.

/// Prefill: a one-point-calibrated queueing curve, `p90_ttft(L) = I / (C - L)`.
///
/// `L` is the prefill load per ready replica (input tokens/s), `I` the mean input length and `C`
/// the replica's raw prefill capacity (tokens/s). The curve is the sojourn time of a single
/// server queue in the shape of M/M/1: flat at low load and rising without bound as `L → C`.
/// Each interval inverts it at the observed point, `C = L + I / p90`, and smooths `C` with an
/// EWMA. Because every sample passes through an observed point, the curve is exact near the
/// operating point and only its extrapolation relies on the shape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefillModel {
    /// Smoothed raw capacity of one replica, tokens/s; `None` until the first sample.
    pub raw_capacity: Option<f64>,
    /// Smoothed mean input length, tokens.
    pub mean_input_tokens: Option<f64>,
    /// Samples absorbed so far.
    pub samples: u64,
}

impl PrefillModel {
    /// Absorbs one interval: load per replica (tokens/s), mean input tokens, TTFT p90 (s).
    pub fn observe(
        &mut self,
        load_per_replica: f64,
        mean_input_tokens: f64,
        ttft_p90_s: f64,
        alpha: f64,
    ) {
        if !(load_per_replica >= 0.0 && mean_input_tokens > 0.0 && ttft_p90_s > 0.0) {
            return;
        }
        let sample = load_per_replica + mean_input_tokens / ttft_p90_s;
        self.raw_capacity = Some(ewma(self.raw_capacity, sample, alpha));
        self.mean_input_tokens = Some(ewma(self.mean_input_tokens, mean_input_tokens, alpha));
        self.samples += 1;
    }

    /// Absorbs a measured ceiling: a replica with prompts always queued served
    /// `tokens_per_s_per_replica`, so its raw capacity is no higher. This corrects the curve's
    /// extrapolation (fitted at light load, `C` tends to come out above the real capacity) and
    /// gives a first estimate before any interval met the SLO.
    pub fn observe_saturated(&mut self, tokens_per_s_per_replica: f64, mean_input_tokens: f64) {
        if !(tokens_per_s_per_replica > 0.0 && mean_input_tokens > 0.0) {
            return;
        }
        self.raw_capacity = Some(self.raw_capacity.map_or(tokens_per_s_per_replica, |c| {
            c.min(tokens_per_s_per_replica)
        }));
        self.mean_input_tokens.get_or_insert(mean_input_tokens);
    }

    /// Load per replica (input tokens/s) at which the model predicts `ttft_p90_s`; `None` before
    /// any sample or when even an idle replica would miss it.
    pub fn capacity_at(&self, ttft_p90_s: f64) -> Option<f64> {
        let capacity = self.raw_capacity? - self.mean_input_tokens? / ttft_p90_s;
        (capacity > 0.0).then_some(capacity)
    }
}

/// Decode: the step time of a batched decode replica is affine in its batch,
/// `itl(n) = a + b·n`, with `n` the concurrent sequences per replica.
///
/// `n` is not observed directly; Little's law gives it from the decode load per replica `L`
/// (output tokens/s) and the ITL: `n = L · itl`. `a` and `b` come from an exponentially
/// forgetting least-squares fit over the intervals seen (scaling events move `n` at a given
/// load, so the fit gets spread without profiling). Until the points spread enough to fit a
/// slope, the model assumes `a = 0.3 × the lowest ITL seen` — a pessimistic prior that credits
/// most of the latency to the batch and so predicts little spare capacity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodeModel {
    sum_w: f64,
    sum_n: f64,
    sum_itl: f64,
    sum_nn: f64,
    sum_n_itl: f64,
    lowest_itl: Option<f64>,
    /// Largest batch per replica implied by KV utilization (`n / utilization`), smoothed.
    pub max_batch: Option<f64>,
    /// Latest batch per replica seen (for the single-point fallback).
    last_point: Option<(f64, f64)>,
    /// Samples absorbed so far.
    pub samples: u64,
}

/// Points closer together than this relative spread (std dev of `n` / mean `n`) do not pin a
/// slope; the fallback prior is used instead.
const MIN_RELATIVE_SPREAD: f64 = 0.25;
/// Weight kept by old points at each new sample.
const FORGETTING: f64 = 0.98;
/// Fraction of the lowest ITL seen that the fallback assumes to be the fixed step cost.
const PRIOR_FIXED_FRACTION: f64 = 0.5;

impl DecodeModel {
    /// Absorbs one interval: load per replica (output tokens/s), ITL p90 (s), KV utilization.
    pub fn observe(
        &mut self,
        load_per_replica: f64,
        itl_p90_s: f64,
        kv_utilization: Option<f64>,
        alpha: f64,
    ) {
        if !(load_per_replica > 0.0 && itl_p90_s > 0.0) {
            return;
        }
        let n = load_per_replica * itl_p90_s;
        self.sum_w = self.sum_w * FORGETTING + 1.0;
        self.sum_n = self.sum_n * FORGETTING + n;
        self.sum_itl = self.sum_itl * FORGETTING + itl_p90_s;
        self.sum_nn = self.sum_nn * FORGETTING + n * n;
        self.sum_n_itl = self.sum_n_itl * FORGETTING + n * itl_p90_s;
        self.lowest_itl = Some(self.lowest_itl.map_or(itl_p90_s, |low| low.min(itl_p90_s)));
        if let Some(utilization) = kv_utilization.filter(|u| *u > 0.05 && *u <= 1.0) {
            self.max_batch = Some(ewma(self.max_batch, n / utilization, alpha));
        }
        self.last_point = Some((n, itl_p90_s));
        self.samples += 1;
    }

    /// `(a, b)` of `itl = a + b·n`: the fit when the points spread, else the prior through the
    /// latest point.
    pub fn coefficients(&self) -> Option<(f64, f64)> {
        let (last_n, last_itl) = self.last_point?;
        let mean_n = self.sum_n / self.sum_w;
        let mean_itl = self.sum_itl / self.sum_w;
        let var_n = self.sum_nn / self.sum_w - mean_n * mean_n;
        if var_n > 0.0 && var_n.sqrt() >= MIN_RELATIVE_SPREAD * mean_n {
            let slope = (self.sum_n_itl / self.sum_w - mean_n * mean_itl) / var_n;
            let intercept = mean_itl - slope * mean_n;
            if slope > 0.0 && intercept >= 0.0 {
                return Some((intercept, slope));
            }
        }
        let fixed = PRIOR_FIXED_FRACTION * self.lowest_itl?;
        let slope = (last_itl - fixed) / last_n;
        (slope > 0.0).then_some((fixed, slope))
    }

    /// Load per replica (output tokens/s) at which the model predicts `itl_p90_s`, within the
    /// KV-limited batch; `None` before any sample or when one sequence alone would miss it.
    pub fn capacity_at(&self, itl_p90_s: f64) -> Option<f64> {
        let (fixed, slope) = self.coefficients()?;
        let mut batch = (itl_p90_s - fixed) / slope;
        if let Some(max_batch) = self.max_batch {
            batch = batch.min(max_batch);
        }
        (batch > 0.0).then_some(batch / itl_p90_s)
    }
}

fn ewma(previous: Option<f64>, sample: f64, alpha: f64) -> f64 {
    match previous {
        Some(previous) => previous + alpha * (sample - previous),
        None => sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_model_reproduces_the_observed_point_and_rises_with_load() {
        let mut model = PrefillModel::default();
        model.observe(4000.0, 1000.0, 0.25, 0.5);
        // C = 4000 + 1000 / 0.25 = 8000; at the observed latency the capacity is the load seen.
        assert_eq!(model.raw_capacity, Some(8000.0));
        assert!((model.capacity_at(0.25).unwrap() - 4000.0).abs() < 1e-9);
        assert!(model.capacity_at(0.5).unwrap() > 4000.0);
        // 1000 tokens at 8000 tokens/s take 0.125 s: no load meets a 0.1 s target.
        assert_eq!(model.capacity_at(0.1), None);
    }

    #[test]
    fn decode_model_fits_an_affine_step_time() {
        let mut model = DecodeModel::default();
        // itl = 0.010 + 0.0005·n, observed at three batch sizes.
        for n in [10.0, 20.0, 40.0] {
            let itl = 0.010 + 0.0005 * n;
            model.observe(n / itl, itl, None, 0.5);
        }
        let (a, b) = model.coefficients().unwrap();
        assert!(
            (a - 0.010).abs() < 1e-6 && (b - 0.0005).abs() < 1e-7,
            "a={a} b={b}"
        );
        // At 30 ms: n = 40 sequences, 40 / 0.03 tokens/s.
        assert!((model.capacity_at(0.030).unwrap() - 40.0 / 0.030).abs() < 1e-3);
    }
}
