//! Per-tier throughput models learned online from the observations themselves (no profiling).
//!
//! Each model answers one question: how much load (tokens/s) can one ready replica carry while
//! the tier's p90 latency stays at a given target? The planner turns that into a replica count
//! for the demand.

/// Prefill: a one-point-calibrated queueing curve of `c` replicas sharing one queue of prompts,
/// `p90_ttft(L) = (I / C) · (1 + ρ / (c · (1 − ρ))))`, `ρ = L / C`.
///
/// `L` is the prefill load per ready replica (input tokens/s), `I` the mean input length, `C`
/// the replica's raw prefill capacity (tokens/s) and `c` the ready replicas. `I / C` is the
/// service time; the second term is the queueing wait of the pooled tier, which in heavy traffic
/// behaves as one server `c` times as fast (the wait of M/M/1 at utilization `ρ`, divided by
/// `c`). At `c = 1` it is M/M/1's sojourn, `I / (C − L)`. The pooling matters: the frontend
/// hands each prompt to a free replica, so with several replicas the p90 stays nearly flat
/// until utilization is high and then climbs steeply; a per-replica M/M/1 curve fitted on the
/// flat part puts `C` far above the real capacity and lets the tier run into the cliff.
///
/// Each interval inverts the curve at the observed point (a quadratic in `C`) and smooths `C`
/// with an EWMA, so the curve is exact near the operating point and only its extrapolation
/// relies on the shape. A raw capacity measured while the tier was saturated caps `C`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefillModel {
    /// Smoothed raw capacity of one replica, tokens/s; `None` until the first sample.
    pub raw_capacity: Option<f64>,
    /// Smoothed mean input length, tokens.
    pub mean_input_tokens: Option<f64>,
    /// Samples absorbed so far.
    pub samples: u64,
    /// Raw capacity of one replica measured while it was saturated (prompts always queued),
    /// tokens/s, smoothed: a hard ceiling on any load per replica.
    pub measured_capacity: Option<f64>,
}

impl PrefillModel {
    /// Absorbs one interval: load per replica (tokens/s), mean input tokens, TTFT p90 (s), over
    /// `replicas` ready replicas.
    pub fn observe(
        &mut self,
        load_per_replica: f64,
        mean_input_tokens: f64,
        ttft_p90_s: f64,
        replicas: u32,
        alpha: f64,
    ) {
        if !(load_per_replica >= 0.0 && mean_input_tokens > 0.0 && ttft_p90_s > 0.0)
            || replicas == 0
        {
            return;
        }
        let sample = raw_capacity_through(
            load_per_replica,
            mean_input_tokens,
            ttft_p90_s,
            f64::from(replicas),
        );
        self.raw_capacity = Some(ewma(self.raw_capacity, sample, alpha));
        self.mean_input_tokens = Some(ewma(self.mean_input_tokens, mean_input_tokens, alpha));
        self.samples += 1;
    }

    /// Absorbs a measured ceiling: a replica with prompts always queued served
    /// `tokens_per_s_per_replica`, so no load per replica above it is sustainable. It caps the
    /// curve's extrapolation (fitted at light load, `C` can come out far above the real
    /// capacity) without moving the curve off the points it was fitted to, and gives a first
    /// estimate (`C` = the measurement) before any interval met the SLO.
    pub fn observe_saturated(&mut self, tokens_per_s_per_replica: f64, mean_input_tokens: f64) {
        if !(tokens_per_s_per_replica > 0.0 && mean_input_tokens > 0.0) {
            return;
        }
        self.measured_capacity = Some(ewma(self.measured_capacity, tokens_per_s_per_replica, 0.5));
        self.mean_input_tokens.get_or_insert(mean_input_tokens);
    }

    /// Load per replica (input tokens/s) at which `replicas` ready replicas have the p90
    /// `ttft_p90_s`; `None` before any sample or when even an idle replica would miss it.
    pub fn capacity_at(&self, ttft_p90_s: f64, replicas: u32) -> Option<f64> {
        let input = self.mean_input_tokens?;
        let raw = match (self.raw_capacity, self.measured_capacity) {
            (Some(curve), Some(measured)) => curve.min(measured),
            (curve, measured) => curve.or(measured)?,
        };
        // Solve the curve for ρ: with `a = t·C/I − 1` (the wait the target leaves, in service
        // times), `ρ / (c(1 − ρ)) = a` gives `ρ = a·c / (1 + a·c)`.
        let spare = ttft_p90_s * raw / input - 1.0;
        let pooled = spare * f64::from(replicas.max(1));
        (spare > 0.0).then(|| raw * pooled / (1.0 + pooled))
    }

    /// The fewest replicas (up to `limit`) that carry `demand` prompt tokens/s with the p90 at
    /// `ttft_p90_s`: more replicas pool the queue, so each also carries more. `None` before any
    /// sample, when even an idle replica misses the target, or when `limit` replicas do not
    /// suffice.
    pub fn replicas_for(&self, demand: f64, ttft_p90_s: f64, limit: u32) -> Option<u32> {
        (1..=limit.max(1)).find(|&replicas| {
            self.capacity_at(ttft_p90_s, replicas)
                .is_some_and(|capacity| capacity * f64::from(replicas) >= demand)
        })
    }
}

/// Decode: the step time of a batched decode replica is affine in its batch,
/// `itl(n) = a + b·n`, with `n` the concurrent sequences per replica.
///
/// `n` is not observed directly; Little's law gives it from the decode load per replica `L`
/// (output tokens/s) and the ITL: `n = L · itl`, counted as at least 1 (a replica decoding less
/// than one sequence on average is idle between steps of one sequence; its ITL varies with what
/// else runs on the machine, not with a batch, so such points must not pin a slope). `a` and `b`
/// come from an exponentially forgetting least-squares fit over the intervals seen (scaling events move `n` at a given
/// load, so the fit gets spread without profiling). Until the points spread enough to fit a
/// slope, the model assumes `a = 0.65 × the lowest ITL seen` and draws the line through the
/// recent (smoothed) point — a mildly pessimistic prior (a step's fixed cost is usually most of a
/// lightly loaded step) that credits the rest of the latency to the batch. At 0.5 the
/// simulator's constant trace kept four decode replicas where three carry it.
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
    /// Recent `(batch per replica, ITL p90)`, smoothed (EWMA, the model's alpha), for the
    /// single-point fallback: one interval's p90 scatters, and a line through it alone would move
    /// the capacity with that scatter.
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
const PRIOR_FIXED_FRACTION: f64 = 0.65;

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
        let n = (load_per_replica * itl_p90_s).max(1.0);
        self.sum_w = self.sum_w * FORGETTING + 1.0;
        self.sum_n = self.sum_n * FORGETTING + n;
        self.sum_itl = self.sum_itl * FORGETTING + itl_p90_s;
        self.sum_nn = self.sum_nn * FORGETTING + n * n;
        self.sum_n_itl = self.sum_n_itl * FORGETTING + n * itl_p90_s;
        self.lowest_itl = Some(self.lowest_itl.map_or(itl_p90_s, |low| low.min(itl_p90_s)));
        if let Some(utilization) = kv_utilization.filter(|u| *u > 0.05 && *u <= 1.0) {
            self.max_batch = Some(ewma(self.max_batch, n / utilization, alpha));
        }
        self.last_point = Some(match self.last_point {
            Some((last_n, last_itl)) => (
                ewma(Some(last_n), n, alpha),
                ewma(Some(last_itl), itl_p90_s, alpha),
            ),
            None => (n, itl_p90_s),
        });
        self.samples += 1;
    }

    /// `(a, b)` of `itl = a + b·n`: the fit when the points spread, else the prior through the
    /// recent (smoothed) point.
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

/// The raw capacity `C` of the pooled curve through one observed point: `t·c·C² − c(t·L + I)·C +
/// I·L·(c − 1) = 0`, its larger root (the smaller lies below `L`). At `c = 1`, `C = L + I / t`.
fn raw_capacity_through(load: f64, input: f64, ttft: f64, replicas: f64) -> f64 {
    let b = replicas * (ttft * load + input);
    let discriminant = b * b - 4.0 * ttft * replicas * input * load * (replicas - 1.0);
    (b + discriminant.max(0.0).sqrt()) / (2.0 * ttft * replicas)
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
        model.observe(4000.0, 1000.0, 0.25, 1, 0.5);
        // C = 4000 + 1000 / 0.25 = 8000; at the observed latency the capacity is the load seen.
        assert_eq!(model.raw_capacity, Some(8000.0));
        assert!((model.capacity_at(0.25, 1).unwrap() - 4000.0).abs() < 1e-9);
        assert!(model.capacity_at(0.5, 1).unwrap() > 4000.0);
        // 1000 tokens at 8000 tokens/s take 0.125 s: no load meets a 0.1 s target.
        assert_eq!(model.capacity_at(0.1, 1), None);
    }

    #[test]
    fn pooled_replicas_each_carry_more_and_the_fit_is_not_fooled_by_a_flat_p90() {
        let mut model = PrefillModel::default();
        // Five replicas of 8000 tokens/s at 83% utilization, p90 0.26 s (1024-token prompts):
        // the pooled curve puts C near 8000 where per-replica M/M/1 would say 6640 + 3940.
        model.observe(6640.0, 1024.0, 0.26, 5, 0.5);
        let raw = model.raw_capacity.unwrap();
        assert!((7500.0..8500.0).contains(&raw), "C = {raw}");
        // The curve passes through the observed point at the observed count...
        assert!((model.capacity_at(0.26, 5).unwrap() - 6640.0).abs() < 1e-6);
        // ...and one replica alone carries less at the same p90 than each of five.
        assert!(model.capacity_at(0.26, 1).unwrap() < model.capacity_at(0.26, 5).unwrap());
        // Demand for five at that p90 needs five, a little more needs six, never past the limit.
        assert_eq!(model.replicas_for(5.0 * 6640.0, 0.26, 16), Some(5));
        assert_eq!(model.replicas_for(5.0 * 6700.0, 0.26, 16), Some(6));
        assert_eq!(model.replicas_for(1e9, 0.26, 16), None);
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

    #[test]
    fn latency_below_one_sequence_does_not_make_a_slope() {
        // A nearly idle replica (1 token/s, 4-token answers) whose ITL went from 74 to 240 ms
        // because prefill shared its CPU: the batch never exceeded one sequence. Taken at face
        // value (n = 0.074 and 0.24) the points fit 1 s per sequence, one replica carries 1
        // token/s at a 2.7 s target, and the planner scaled decode under a met SLO.
        let mut model = DecodeModel::default();
        model.observe(1.0, 0.074, None, 0.3);
        model.observe(1.0, 0.240, None, 0.3);
        let capacity = model.capacity_at(2.7).unwrap();
        assert!(capacity > 10.0, "{capacity} tokens/s per replica");
    }
}
