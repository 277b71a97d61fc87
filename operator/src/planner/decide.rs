//! The pure decision: one observation in, desired replicas per tier out.
//!
//! Per tier, in this order (every knob is a [`PlannerConfig`] field):
//! 1. **Refuse on bad data.** An observation older than `max_staleness_s`, or missing the
//!    request rate (or, with traffic, the latencies and mean lengths), leaves the replicas as
//!    they are and returns a [`Refusal`] for the status condition. A request rate of 0 is no
//!    traffic, not missing data: the latencies and lengths may then be absent.
//! 2. **Learn.** Each tier's throughput model ([`PrefillModel`], [`DecodeModel`]) absorbs the
//!    interval when the tier is steady (all desired replicas ready) and met its SLO: only then
//!    does the arrival rate equal the served load (an overloaded tier's queue grows instead).
//!    A steady tier that starts to breach instead records the load per replica as a ceiling on its
//!    capacity (see `breach_ceiling_relax`), which caps the model's extrapolation.
//! 3. **Recommend.** `model` = the fewest replicas that carry the demand with the p90 at
//!    `target_latency_fraction × SLO` (prefill replicas pool one queue, so the count is searched,
//!    see [`PrefillModel`]); the demand is the request rate's least-squares trend ([`Trend`])
//!    projected `lookahead_s` ahead, times the smoothed mean lengths. SLO feedback on top: a p90
//!    over the SLO asks for at least one more replica, the largest step when over `2 ×` the SLO
//!    (once earlier additions are ready); a single mild breach (≤ 1.5 × SLO) that the model does
//!    not explain waits one interval; when the model count exceeds the current count two
//!    intervals running (or once, with the p90 already over the planning target) the tier
//!    scales up to it before the p90 reaches the SLO; a scale-down needs the p90 under
//!    `scale_down_below × SLO` *and* the model to keep it there with fewer replicas (sized at
//!    `scale_down_below × SLO`, tighter than the planning target: hysteresis).
//!    No traffic recommends the minimum.
//! 4. **Coordinate P:D.** Both tiers are sized from the same demand in the same decision; a TTFT
//!    breach while decode is saturated and the prefill queue is short is blamed on decode
//!    backpressure (prefill is not grown for it); the optional `prefill_per_decode` ratio band raises the lagging tier.
//! 5. **Clamp** to the tier's bounds.
//! 6. **Stabilize** like the HPA: going up takes the *lowest* recommendation of the last
//!    `scale_up_stabilization_s`, going down the *highest* of the last
//!    `scale_down_stabilization_s`, so a single noisy interval moves nothing.
//! 7. **Cool down:** a tier changed less than `cooldown_s` ago holds, except that a scale-up may
//!    follow a scale-up (replicas still starting already count in the current number, and the
//!    breach feedback waits for them to be ready, so this cannot overshoot).
//! 8. **Bound the step** to `max(1, scale_up_min_step, ceil(max_step_up_fraction × current))`
//!    replicas up and
//!    `max(1, ceil(max_step_down_fraction × current))` down.

use std::collections::VecDeque;

use super::model::{DecodeModel, PrefillModel};
use super::types::{Decision, Observation, Refusal, Tier, TierCounts, TierReasons};
use crate::conditions::reasons;

/// p90 latency targets, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    pub ttft_p90_s: f64,
    pub itl_p90_s: f64,
}

/// Inclusive replica range of one tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierBounds {
    pub min: u32,
    pub max: u32,
}

/// Every knob of the planner. [`PlannerConfig::new`] gives the documented defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannerConfig {
    /// Latency targets.
    pub slo: Slo,
    /// Prefill replica range.
    pub prefill_bounds: TierBounds,
    /// Decode replica range.
    pub decode_bounds: TierBounds,
    /// Seconds between decisions (the observation window). Default 30.
    pub interval_s: f64,
    /// An observation older than this (seconds) is stale: no action. Default 2 × interval.
    pub max_staleness_s: f64,
    /// Window over which a scale-up must hold (min of recommendations). Default 0: react at
    /// once (a replica takes its startup time to help; waiting costs SLO).
    pub scale_up_stabilization_s: f64,
    /// Window over which a scale-down must hold (max of recommendations). Default 300.
    pub scale_down_stabilization_s: f64,
    /// After a tier changes, it holds this long (seconds). Default 60.
    pub cooldown_s: f64,
    /// Largest increase per decision, as a fraction of the current count (at least 1).
    /// Default 1.0 (double), as the HPA's default scale-up policy.
    pub max_step_up_fraction: f64,
    /// An increase of this many replicas is always allowed, whatever the fraction (the HPA's
    /// "4 pods" scale-up policy), so a small tier can meet a sudden step. Default 4.
    pub scale_up_min_step: u32,
    /// Largest decrease per decision, as a fraction of the current count (at least 1). Default 0.5.
    pub max_step_down_fraction: f64,
    /// The model sizes each tier for its p90 at this fraction of the SLO (headroom). Default 0.9.
    pub target_latency_fraction: f64,
    /// Scale down only while the p90 is under this fraction of the SLO. Default 0.8.
    pub scale_down_below: f64,
    /// Seconds ahead the rising demand trend is projected for scale-up: about the replica
    /// startup time plus two intervals (the soonest a new replica can help, and the interval
    /// it then has to catch up). Default 120.
    pub lookahead_s: f64,
    /// EWMA weight of a new model sample. Default 0.3.
    pub model_alpha: f64,
    /// Optional band `(low, high)` for prefill replicas per decode replica.
    pub prefill_per_decode: Option<(f64, f64)>,
    /// Decode KV utilization above which decode counts as saturated. Default 0.95.
    pub kv_saturation: f64,
    /// A steady tier that breached its SLO at load `L` per replica is not planned above
    /// `L × target_latency_fraction` per replica; that ceiling rises by this fraction each
    /// interval without a breach, so an old breach is forgotten over time. Default 0.005.
    pub breach_ceiling_relax: f64,
    /// Seconds from asking for a replica to it serving (scheduling, image, weights). The backlog
    /// surge counts the queue that builds meanwhile. Default 60.
    pub replica_startup_s: f64,
    /// Seconds in which a prefill backlog should be gone once the replicas asked for are ready.
    /// While TTFT breaches with prompts queued, prefill is sized to carry the demand *and* drain
    /// the backlog projected to the moment new replicas serve within this time, and decode to
    /// carry what that prefill will emit (the surge). Surge replicas bypass the step bound and
    /// the stabilization window both ways: they leave as soon as the queue is gone. Default 20.
    pub backlog_drain_s: f64,
}

/// A configuration the planner cannot run with.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("SLO targets must be positive seconds (ttft {ttft}, itl {itl})")]
    Slo { ttft: f64, itl: f64 },
    #[error("{tier} bounds: min {min} exceeds max {max}")]
    Bounds { tier: Tier, min: u32, max: u32 },
    #[error("{name} must be {expected}, got {value}")]
    Knob {
        name: &'static str,
        expected: &'static str,
        value: f64,
    },
    #[error("prefill_per_decode band ({0}, {1}) must satisfy 0 < low <= high")]
    Ratio(f64, f64),
}

impl PlannerConfig {
    /// Defaults for every knob but the SLOs and bounds.
    pub fn new(slo: Slo, prefill_bounds: TierBounds, decode_bounds: TierBounds) -> Self {
        let interval_s = 30.0;
        PlannerConfig {
            slo,
            prefill_bounds,
            decode_bounds,
            interval_s,
            max_staleness_s: 2.0 * interval_s,
            scale_up_stabilization_s: 0.0,
            scale_down_stabilization_s: 300.0,
            cooldown_s: 60.0,
            max_step_up_fraction: 1.0,
            max_step_down_fraction: 0.5,
            scale_up_min_step: 4,
            target_latency_fraction: 0.9,
            scale_down_below: 0.8,
            lookahead_s: 120.0,
            model_alpha: 0.3,
            prefill_per_decode: None,
            kv_saturation: 0.95,
            breach_ceiling_relax: 0.005,
            replica_startup_s: 60.0,
            backlog_drain_s: 20.0,
        }
    }

    /// Names the first knob out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Slo {
            ttft_p90_s: ttft,
            itl_p90_s: itl,
        } = self.slo;
        if !(ttft > 0.0 && itl > 0.0) {
            return Err(ConfigError::Slo { ttft, itl });
        }
        for (tier, bounds) in [
            (Tier::Prefill, self.prefill_bounds),
            (Tier::Decode, self.decode_bounds),
        ] {
            if bounds.min > bounds.max {
                return Err(ConfigError::Bounds {
                    tier,
                    min: bounds.min,
                    max: bounds.max,
                });
            }
        }
        let positive = "positive";
        let non_negative = "zero or more";
        let fraction = "in (0, 1]";
        let knobs = [
            ("interval_s", self.interval_s, positive),
            ("max_staleness_s", self.max_staleness_s, positive),
            (
                "scale_up_stabilization_s",
                self.scale_up_stabilization_s,
                non_negative,
            ),
            (
                "scale_down_stabilization_s",
                self.scale_down_stabilization_s,
                non_negative,
            ),
            ("cooldown_s", self.cooldown_s, non_negative),
            ("lookahead_s", self.lookahead_s, non_negative),
            ("max_step_up_fraction", self.max_step_up_fraction, positive),
            (
                "max_step_down_fraction",
                self.max_step_down_fraction,
                fraction,
            ),
            (
                "target_latency_fraction",
                self.target_latency_fraction,
                fraction,
            ),
            ("scale_down_below", self.scale_down_below, fraction),
            ("model_alpha", self.model_alpha, fraction),
            ("kv_saturation", self.kv_saturation, fraction),
            (
                "breach_ceiling_relax",
                self.breach_ceiling_relax,
                non_negative,
            ),
            ("replica_startup_s", self.replica_startup_s, non_negative),
            ("backlog_drain_s", self.backlog_drain_s, positive),
        ];
        for (name, value, expected) in knobs {
            let ok = match expected {
                "positive" => value > 0.0,
                "zero or more" => value >= 0.0,
                _ => value > 0.0 && value <= 1.0,
            };
            if !ok || !value.is_finite() {
                return Err(ConfigError::Knob {
                    name,
                    expected,
                    value,
                });
            }
        }
        if let Some((low, high)) = self.prefill_per_decode {
            if !(low > 0.0 && low <= high) {
                return Err(ConfigError::Ratio(low, high));
            }
        }
        Ok(())
    }

    fn bounds(&self, tier: Tier) -> TierBounds {
        match tier {
            Tier::Prefill => self.prefill_bounds,
            Tier::Decode => self.decode_bounds,
        }
    }

    fn slo_s(&self, tier: Tier) -> f64 {
        match tier {
            Tier::Prefill => self.slo.ttft_p90_s,
            Tier::Decode => self.slo.itl_p90_s,
        }
    }
}

/// What the planner carries from one interval to the next.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlannerState {
    pub prefill_model: PrefillModel,
    pub decode_model: DecodeModel,
    prefill: TierHistory,
    decode: TierHistory,
    /// `(time, request rate)` of the last intervals since the last step in the load, for the
    /// demand trend (see [`Trend`]).
    rates: VecDeque<(f64, f64)>,
    /// Mean input and output lengths, smoothed (EWMA, `model_alpha`): one interval's means
    /// scatter with its sample of requests, and the sizing should not follow that scatter.
    lengths: Option<(f64, f64)>,
    /// Ready replicas at the previous observation: a throughput measured over an interval in
    /// which the ready count changed cannot be split per replica.
    last_ready: Option<TierCounts>,
    /// Prompts queued for prefill at the previous observation: a tier is saturated over an
    /// interval only if prompts were queued at its start as well as at its end.
    last_prefill_queue: Option<f64>,
    /// Whether the last decision surged (see `backlog_drain_s`): its replicas are not a level
    /// to hold, and the interval after a surge still carries the drained backlog.
    surged_last: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct TierHistory {
    /// `(time, clamped recommendation)` within the longest stabilization window.
    recommendations: VecDeque<(f64, u32)>,
    /// When the tier last changed and whether it went up.
    last_change: Option<(f64, bool)>,
    /// Lowest load per replica (tokens/s) at which the steady tier breached its SLO, relaxed
    /// upward by `breach_ceiling_relax` each interval without a breach.
    breach_ceiling: Option<f64>,
    /// Whether the last steady interval breached (only the onset of a breach sets the
    /// ceiling: later intervals also carry the backlog it built).
    breaching: bool,
    /// Whether the model asked for more replicas than the tier had at the last decision: a
    /// scale-up on the model alone (no breach) needs two intervals running, so one noisy
    /// interval at the edge of the hysteresis band does not undo a scale-down.
    model_ahead: bool,
}

impl PlannerState {
    fn history(&mut self, tier: Tier) -> &mut TierHistory {
        match tier {
            Tier::Prefill => &mut self.prefill,
            Tier::Decode => &mut self.decode,
        }
    }

    /// When the tier's replicas last changed, if ever.
    pub fn last_change_s(&self, tier: Tier) -> Option<f64> {
        match tier {
            Tier::Prefill => self.prefill.last_change.map(|(t, _)| t),
            Tier::Decode => self.decode.last_change.map(|(t, _)| t),
        }
    }
}

/// Decides desired replicas per tier. `current` is the desired count each tier runs with now
/// (what the target was last told), `now_s` the planner's clock.
pub fn decide(
    config: &PlannerConfig,
    state: &mut PlannerState,
    observation: &Observation,
    current: TierCounts,
    now_s: f64,
) -> Decision {
    if let Some(refusal) = refusal(config, observation, now_s) {
        return Decision {
            desired: current,
            reason: format!("no action: {}", refusal.message),
            tier_reasons: TierReasons::default(),
            refusal: Some(refusal),
        };
    }
    let rate = observation.request_rate.unwrap_or(0.0);
    let input = observation.mean_input_tokens.unwrap_or(0.0);
    let output = observation.mean_output_tokens.unwrap_or(0.0);
    let decode_saturated = observation
        .itl_p90_s
        .is_some_and(|itl| itl > config.slo.itl_p90_s)
        || observation
            .decode_kv_utilization
            .is_some_and(|u| u >= config.kv_saturation);
    let prefill_queue_short = observation
        .prefill_queue_depth
        .is_some_and(|depth| depth <= f64::from(observation.ready.prefill));
    let blame_decode = decode_saturated && prefill_queue_short;
    // Whether the model, before this interval teaches it anything, says each tier's current
    // replicas carry the demand at the SLO (a mild first breach it cannot explain is noise).
    let carries = |capacity: Option<f64>, demand: f64, replicas: u32| {
        capacity.is_some_and(|c| demand <= c * f64::from(replicas))
    };
    let unexplained_breach_possible = [
        !state.prefill.breaching
            && carries(
                state
                    .prefill_model
                    .capacity_at(config.slo.ttft_p90_s, current.prefill),
                rate * input,
                current.prefill,
            ),
        !state.decode.breaching
            && carries(
                state.decode_model.capacity_at(config.slo.itl_p90_s),
                rate * output,
                current.decode,
            ),
    ];
    let measured_prefill_capacity = state
        .last_ready
        .is_some_and(|last| last.prefill == observation.ready.prefill)
        .then(|| saturated_prefill_per_replica(config, observation, state.last_prefill_queue))
        .flatten();
    state.last_prefill_queue = observation.prefill_queue_depth;
    learn(
        config,
        state,
        observation,
        current,
        blame_decode,
        measured_prefill_capacity,
        [rate, input, output],
    );

    let trend = Trend::fit(&state.rates, observation.timestamp_s);
    let projected_rate = trend.map_or(rate, |trend| trend.projected(config.lookahead_s));
    if rate > 0.0 {
        state.lengths = Some(match state.lengths {
            Some((i, o)) => (
                i + config.model_alpha * (input - i),
                o + config.model_alpha * (output - o),
            ),
            None => (input, output),
        });
    }
    let (input, output) = state.lengths.unwrap_or((input, output));

    // Replicas each tier needs for the projected demand: the model's count, raised by the
    // breach ceiling; at the planning target (`target_latency_fraction × SLO`) and at
    // `scale_down_below × SLO`. A breach at load L per replica bounds the capacity at the SLO by
    // L, and at a fraction of the SLO by about that fraction of L.
    let shares = [config.target_latency_fraction, config.scale_down_below];
    let prefill_demand = projected_rate * input;
    let decode_demand = projected_rate * output;
    let limit = |tier: Tier| config.bounds(tier).max.max(current.get(tier)).max(1) * 4;
    let with_ceiling = |model: Option<u32>, demand: f64, ceiling: Option<f64>, share: f64| {
        let by_ceiling = ceiling.map(|c| (demand / (c * share)).ceil().max(1.0) as u32);
        match (model, by_ceiling) {
            (Some(model), Some(by_ceiling)) => Some(model.max(by_ceiling)),
            (model, by_ceiling) => model.or(by_ceiling),
        }
    };
    let prefill_counts = shares.map(|share| {
        let model = state.prefill_model.replicas_for(
            prefill_demand,
            share * config.slo.ttft_p90_s,
            limit(Tier::Prefill),
        );
        with_ceiling(model, prefill_demand, state.prefill.breach_ceiling, share)
    });
    let decode_capacity =
        shares.map(|share| state.decode_model.capacity_at(share * config.slo.itl_p90_s));
    let decode_counts = [0, 1].map(|i| {
        let model = decode_capacity[i].map(|c| (decode_demand / c).ceil().max(1.0) as u32);
        with_ceiling(model, decode_demand, state.decode.breach_ceiling, shares[i])
    });
    // The load per replica the planning-target count runs at, for the reason line.
    let per_replica = |demand: f64, count: Option<u32>| count.map(|n| demand / f64::from(n.max(1)));
    let prefill_at_slo = state
        .prefill_model
        .capacity_at(config.slo.ttft_p90_s, current.prefill.max(1))
        .map(|model| {
            state
                .prefill
                .breach_ceiling
                .map_or(model, |ceiling| model.min(ceiling))
        });
    let decode_at_target = match (decode_capacity[0], state.decode.breach_ceiling) {
        (Some(model), Some(ceiling)) => Some(model.min(ceiling * shares[0])),
        (model, ceiling) => model.or(ceiling.map(|c| c * shares[0])),
    };
    let surge = if blame_decode {
        None
    } else {
        backlog_surge(
            config,
            state,
            observation,
            current,
            now_s,
            [rate * input, input, output],
            // A breach ceiling alone is an upper bound on capacity, not an estimate: without a
            // measurement or a fitted curve, the breach feedback sizes the step instead.
            measured_prefill_capacity.or(prefill_at_slo),
            decode_at_target,
        )
    };
    let decode_saturated_now = observation
        .decode_kv_utilization
        .is_some_and(|u| u >= config.kv_saturation);
    let mut recommended = TierCounts::default();
    let mut why = TierReasons::default();
    for tier in [Tier::Prefill, Tier::Decode] {
        let (counts, demand, latency) = match tier {
            Tier::Prefill => (prefill_counts, prefill_demand, observation.ttft_p90_s),
            Tier::Decode => (decode_counts, decode_demand, observation.itl_p90_s),
        };
        let surging = surge.is_some() || state.surged_last;
        let explained = match tier {
            Tier::Prefill if blame_decode => Some(Explained::DecodeBackpressure),
            _ if surging => Some(Explained::Backlog),
            Tier::Decode if decode_saturated_now => Some(Explained::Saturated),
            _ => None,
        };
        let model_ahead = counts[0].is_some_and(|count| count > current.get(tier));
        let model_ahead_before = std::mem::replace(
            &mut state.history(tier).model_ahead,
            model_ahead && rate > 0.0,
        );
        let (count, reason) = recommend(
            config,
            tier,
            current.get(tier),
            observation.ready.get(tier),
            rate,
            model_ahead_before,
            counts,
            per_replica(demand, counts[0]),
            latency,
            explained,
            unexplained_breach_possible[tier as usize],
        );
        recommended.set(tier, count);
        why.set(tier, reason);
    }

    if let Some((low, high)) = config.prefill_per_decode {
        let min_prefill = (low * f64::from(recommended.decode)).ceil() as u32;
        if recommended.prefill < min_prefill {
            recommended.prefill = min_prefill;
            why.set(
                Tier::Prefill,
                format!("raised to keep prefill:decode >= {low}"),
            );
        }
        let min_decode = (f64::from(recommended.prefill) / high).ceil() as u32;
        if recommended.decode < min_decode {
            recommended.decode = min_decode;
            why.set(
                Tier::Decode,
                format!("raised to keep prefill:decode <= {high}"),
            );
        }
    }

    let mut desired = current;
    let mut reason = String::new();
    let mut tier_reasons = TierReasons::default();
    for tier in [Tier::Prefill, Tier::Decode] {
        let bounds = config.bounds(tier);
        let clamped = recommended.get(tier).clamp(bounds.min, bounds.max);
        let now_count = current.get(tier);
        let (mut next, mut note) = settle(config, state.history(tier), now_count, clamped, now_s);
        if let Some((counts, why_surge)) = &surge {
            let surge_count = counts.get(tier).clamp(bounds.min, bounds.max);
            if surge_count > next {
                next = surge_count;
                note = format!(" (backlog surge: {why_surge})");
            }
        }
        desired.set(tier, next);
        if next != now_count {
            state.history(tier).last_change = Some((now_s, next > now_count));
        }
        let line = format!("{tier} {now_count}->{next}: {}{note}", why.get(tier));
        if !reason.is_empty() {
            reason.push_str("; ");
        }
        reason.push_str(&line);
        tier_reasons.set(tier, line);
    }
    state.surged_last = surge.is_some();
    Decision {
        desired,
        reason,
        tier_reasons,
        refusal: None,
    }
}

fn refusal(config: &PlannerConfig, observation: &Observation, now_s: f64) -> Option<Refusal> {
    if !observation.timestamp_s.is_finite() {
        return Some(Refusal {
            reason: reasons::METRICS_MISSING,
            message: "no successful scrape of this deployment's pods in Prometheus (are they \
                      scraped, with `namespace` and `deployment` labels?)"
                .to_string(),
        });
    }
    let age = now_s - observation.timestamp_s;
    if age > config.max_staleness_s {
        return Some(Refusal {
            reason: reasons::METRICS_STALE,
            message: format!(
                "newest metrics are {age:.0}s old (limit {:.0}s)",
                config.max_staleness_s
            ),
        });
    }
    let mut missing = Vec::new();
    match observation.request_rate {
        None => missing.push("request rate"),
        Some(rate) if rate > 0.0 => {
            let fields = [
                ("TTFT p90", observation.ttft_p90_s),
                ("ITL p90", observation.itl_p90_s),
                ("mean input tokens", observation.mean_input_tokens),
                ("mean output tokens", observation.mean_output_tokens),
            ];
            missing.extend(
                fields
                    .iter()
                    .filter(|(_, value)| value.is_none())
                    .map(|(name, _)| *name),
            );
        }
        Some(_) => {}
    }
    (!missing.is_empty()).then(|| Refusal {
        reason: reasons::METRICS_MISSING,
        message: format!("no data for {}", missing.join(", ")),
    })
}

#[allow(clippy::too_many_arguments)]
fn learn(
    config: &PlannerConfig,
    state: &mut PlannerState,
    observation: &Observation,
    current: TierCounts,
    prefill_blamed_on_decode: bool,
    measured_prefill_capacity: Option<f64>,
    [rate, input, output]: [f64; 3],
) {
    let now = observation.timestamp_s;
    // A rate more than a quarter off the trend is a step, not noise: the history before it
    // says nothing about the new level, and projecting the jump forward would size for a load
    // that is not coming.
    let expected = Trend::fit(&state.rates, now).map(|trend| trend.level);
    let stepped = expected
        .is_some_and(|expected| (rate - expected).abs() > STEP_FRACTION * expected.max(rate));
    if stepped {
        state.rates.clear();
    }
    // A repeated observation (no newer scrape) replaces its earlier reading.
    while state.rates.back().is_some_and(|(then, _)| *then >= now) {
        state.rates.pop_back();
    }
    state.rates.push_back((now, rate));
    while state.rates.len() > TREND_INTERVALS {
        state.rates.pop_front();
    }
    if rate <= 0.0 {
        return;
    }
    let ready = observation.ready;
    // Replicas still starting do not change what the ready ones served flat out.
    if let Some(per_replica) = measured_prefill_capacity {
        state.prefill_model.observe_saturated(per_replica, input);
    }
    // A load per replica is only meaningful over an interval the ready count held through.
    let held = |tier: Tier| {
        state
            .last_ready
            .is_none_or(|last| last.get(tier) == ready.get(tier))
    };
    if ready.prefill > 0 && ready.prefill >= current.prefill && held(Tier::Prefill) {
        if let Some(ttft) = observation.ttft_p90_s {
            let load = rate * input / f64::from(ready.prefill);
            if ttft <= config.slo.ttft_p90_s {
                state
                    .prefill_model
                    .observe(load, input, ttft, ready.prefill, config.model_alpha);
            }
            // A breach caused by decode backpressure says nothing about prefill capacity.
            let breached = ttft > config.slo.ttft_p90_s && !prefill_blamed_on_decode;
            record_ceiling(config, &mut state.prefill, load, breached);
        }
    }
    // Decode's load is what it served; without that measurement, the arrival rate stands for
    // it only while prefill keeps up (a backlogged prefill hands decode less than arrives).
    let decode_served = observation.decode_tokens_per_s.or_else(|| {
        let prefill_keeps_up = observation
            .ttft_p90_s
            .is_none_or(|ttft| ttft <= config.slo.ttft_p90_s)
            || prefill_blamed_on_decode;
        prefill_keeps_up.then_some(rate * output)
    });
    if let (true, Some(served)) = (
        ready.decode > 0 && ready.decode >= current.decode && held(Tier::Decode),
        decode_served,
    ) {
        if let Some(itl) = observation.itl_p90_s {
            let load = served / f64::from(ready.decode);
            if itl <= config.slo.itl_p90_s {
                let kv = observation.decode_kv_utilization;
                // After a step the smoothed operating point is another load's: start afresh.
                let alpha = if stepped { 1.0 } else { config.model_alpha };
                state.decode_model.observe(load, itl, kv, alpha);
            }
            record_ceiling(config, &mut state.decode, load, itl > config.slo.itl_p90_s);
        }
    }
    state.last_ready = Some(ready);
}

/// Prompt tokens per second one ready prefill replica served while a backlog stood (TTFT over
/// the SLO and more prompts queued than replicas at both ends of the interval, so every replica
/// was busy throughout): its raw capacity, measured. A short queue under the SLO is ordinary
/// queueing, not saturation; a queue only at the end would count the idle start as capacity
/// missing and under-measure.
fn saturated_prefill_per_replica(
    config: &PlannerConfig,
    observation: &Observation,
    queued_at_start: Option<f64>,
) -> Option<f64> {
    let ready = f64::from(observation.ready.prefill);
    let queued = observation.prefill_queue_depth?.min(queued_at_start?);
    let served = observation.prefill_tokens_per_s?;
    let breached = observation.ttft_p90_s? > config.slo.ttft_p90_s;
    (breached && ready > 0.0 && queued > ready && served > 0.0).then(|| served / ready)
}

fn record_ceiling(config: &PlannerConfig, history: &mut TierHistory, load: f64, breached: bool) {
    history.breach_ceiling = match (breached, history.breaching) {
        (true, false) => Some(
            history
                .breach_ceiling
                .map_or(load, |ceiling| ceiling.min(load)),
        ),
        (true, true) => history.breach_ceiling,
        (false, _) => history
            .breach_ceiling
            .map(|c| c * (1.0 + config.breach_ceiling_relax)),
    };
    history.breaching = breached;
}

/// A request rate further than this fraction off the trend is a step.
const STEP_FRACTION: f64 = 0.25;

/// Intervals the demand trend is fitted over (4 minutes at the default interval): enough to
/// average out the Poisson noise of one interval's count, short enough to follow a ramp.
const TREND_INTERVALS: usize = 8;

/// The request rate's least-squares line over the intervals since the last step.
///
/// One interval's rate scatters by its Poisson noise (±1/√(rate × interval)), and a slope from
/// two consecutive rates scatters far more; both would move the replicas on noise. The line's
/// level at the last point is the demand now; the slope is projected ahead less half its
/// standard error, so a flat load projects (almost) no growth while a ramp a few intervals old
/// already does (a full standard error left the start of a ramp unprojected for too long).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Trend {
    /// Requests/s now, on the line.
    level: f64,
    /// Requests/s per second, less half its standard error, at least 0.
    rising: f64,
}

impl Trend {
    /// The line through `rates` evaluated at `now`; `None` without any point. Fewer than three
    /// points give their mean and no slope.
    fn fit(rates: &VecDeque<(f64, f64)>, now: f64) -> Option<Trend> {
        let n = rates.len() as f64;
        if rates.is_empty() {
            return None;
        }
        let mean_t = rates.iter().map(|(t, _)| t).sum::<f64>() / n;
        let mean_r = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
        let sxx: f64 = rates.iter().map(|(t, _)| (t - mean_t).powi(2)).sum();
        if rates.len() < 3 || sxx <= 0.0 {
            return Some(Trend {
                level: mean_r,
                rising: 0.0,
            });
        }
        let sxy: f64 = rates.iter().map(|(t, r)| (t - mean_t) * (r - mean_r)).sum();
        let slope = sxy / sxx;
        let intercept = mean_r - slope * mean_t;
        let residual: f64 = rates
            .iter()
            .map(|(t, r)| (r - intercept - slope * t).powi(2))
            .sum();
        let standard_error = (residual / (n - 2.0) / sxx).sqrt();
        Some(Trend {
            level: (intercept + slope * now).max(0.0),
            rising: (slope - 0.5 * standard_error).max(0.0),
        })
    }

    /// Requests/s expected `ahead_s` from now.
    fn projected(&self, ahead_s: f64) -> f64 {
        self.level + self.rising * ahead_s
    }
}

/// A breach up to this multiple of the SLO, in one interval, while the model says the current
/// replicas carry the demand at the SLO, is treated as noise until the next interval confirms it
/// (p90s of one interval scatter; reacting to each would oscillate under constant load).
const MILD_BREACH: f64 = 1.5;

/// What, other than the tier's own capacity, accounts for a breach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Explained {
    /// Prefill's TTFT breach comes from decode not taking prefilled prompts.
    DecodeBackpressure,
    /// A backlog surge is on or just ended: the tier's latency and its current (surged) count
    /// say nothing about the steady demand, which the model sizes alone.
    Backlog,
    /// Decode's KV is full.
    Saturated,
}

/// The backlog surge: replicas per tier that carry the demand *and* drain the prefill queue
/// within `backlog_drain_s` of new replicas serving, and why; `None` unless TTFT breaches with
/// more prompts queued than prefill replicas, or before the models can size it.
///
/// The backlog is projected to the moment a replica asked for now serves (`replica_startup_s`):
/// the queue now, plus what the ready replicas fall short of the demand until then, minus what
/// replicas already starting will serve once ready. Prefill drains at its capacity at the SLO;
/// decode must carry what prefill then emits, at its planning capacity.
#[allow(clippy::too_many_arguments)]
fn backlog_surge(
    config: &PlannerConfig,
    state: &PlannerState,
    observation: &Observation,
    current: TierCounts,
    now_s: f64,
    [demand, input, output]: [f64; 3],
    prefill_per_replica: Option<f64>,
    decode_per_replica: Option<f64>,
) -> Option<(TierCounts, String)> {
    // `prefill_per_replica` is the measured saturated throughput when there is one (draining
    // runs the replicas flat out), else the model's capacity at the SLO.
    let ttft = observation.ttft_p90_s?;
    let queue = observation.prefill_queue_depth?;
    let ready = observation.ready.prefill;
    if ttft <= config.slo.ttft_p90_s || queue <= f64::from(ready) || input <= 0.0 {
        return None;
    }
    let per_replica = prefill_per_replica?;
    let startup = config.replica_startup_s;
    let starting = f64::from(current.prefill.saturating_sub(ready));
    let starting_serve_in = match state.prefill.last_change {
        Some((at, true)) => (at + startup - now_s).clamp(0.0, startup),
        _ => startup,
    };
    let shortfall = (demand - f64::from(ready) * per_replica).max(0.0);
    let backlog = (queue * input + shortfall * startup
        - starting * per_replica * (startup - starting_serve_in))
        .max(0.0);
    let throughput = demand + backlog / config.backlog_drain_s;
    let prefill = (throughput / per_replica).ceil() as u32;
    let decode = match decode_per_replica {
        Some(capacity) if output > 0.0 => ((throughput / input * output) / capacity).ceil() as u32,
        _ => current.decode,
    };
    Some((
        TierCounts { prefill, decode },
        format!(
            "{queue:.0} prompts queued, {:.0}k tokens projected in {startup:.0}s, drained in {:.0}s",
            backlog / 1e3,
            config.backlog_drain_s
        ),
    ))
}

/// The raw recommendation of one tier and why.
#[allow(clippy::too_many_arguments)]
fn recommend(
    config: &PlannerConfig,
    tier: Tier,
    current: u32,
    ready: u32,
    rate: f64,
    model_ahead_before: bool,
    [modelled, count_down]: [Option<u32>; 2],
    load_per_replica: Option<f64>,
    latency: Option<f64>,
    explained: Option<Explained>,
    model_carries_demand: bool,
) -> (u32, String) {
    let slo = config.slo_s(tier);
    let metric = match tier {
        Tier::Prefill => "TTFT",
        Tier::Decode => "ITL",
    };
    if rate <= 0.0 {
        return (0, "no traffic".to_string());
    }
    // Scaling down goes only as far as the model keeps the p90 under `scale_down_below × SLO`,
    // tighter than the planning target: a hysteresis band between scale-up and scale-down.
    let count_down = count_down.unwrap_or(current);
    let latency = latency.unwrap_or(0.0);
    let observed = format!(
        "{metric} p90 {:.0}ms vs SLO {:.0}ms",
        latency * 1e3,
        slo * 1e3
    );
    let model_says = match (modelled, load_per_replica) {
        (Some(count), Some(load)) => format!("model {count} at {load:.0} tok/s/replica"),
        _ => "no model yet".to_string(),
    };
    match explained {
        Some(Explained::DecodeBackpressure) if latency > slo => {
            return (
                current.max(modelled.unwrap_or(0)),
                format!("{observed}, blamed on saturated decode; {model_says}"),
            );
        }
        // The surge drains the queue; what stays afterwards is what the demand needs.
        Some(Explained::Backlog) => {
            return (
                modelled.unwrap_or(current),
                format!("{observed}, prompts queued; {model_says}"),
            );
        }
        _ => {}
    }
    let saturated = explained == Some(Explained::Saturated);
    // A model that, having learned this interval, asks for more replicas explains the breach.
    let model_explains = modelled.is_some_and(|count| count > current);
    if latency > slo
        && latency <= MILD_BREACH * slo
        && model_carries_demand
        && !model_explains
        && !saturated
    {
        return (
            current,
            format!("{observed}, a first mild breach the model does not explain: confirming; {model_says}"),
        );
    }
    if latency > slo {
        // Far over the SLO, or out of KV (its latency then stops rising with the load, so
        // its size says nothing about how far short the tier is): the largest step.
        let step = if latency > 2.0 * slo || saturated {
            up_step(config, current)
        } else {
            1
        };
        let feedback = if ready >= current {
            current + step
        } else {
            current
        };
        return (
            feedback.max(modelled.unwrap_or(0)),
            format!("{observed} (breach); {model_says}"),
        );
    }
    match modelled {
        // The model alone moves the tier up once it asked twice running, or once the p90 is
        // already over the planning target (the observation confirms it).
        Some(count)
            if count > current
                && (model_ahead_before || latency > config.target_latency_fraction * slo) =>
        {
            (
                count,
                format!("{observed}, over the planning target ahead; {model_says}"),
            )
        }

        Some(_) if latency < config.scale_down_below * slo && count_down < current => (
            count_down,
            format!("{observed}, comfortably under; {model_says}"),
        ),
        _ => (current, format!("{observed}; {model_says}")),
    }
}

/// Stabilization, cooldown and step bound: from the clamped recommendation to the next count.
fn settle(
    config: &PlannerConfig,
    history: &mut TierHistory,
    current: u32,
    recommended: u32,
    now_s: f64,
) -> (u32, String) {
    history.recommendations.push_back((now_s, recommended));
    let horizon = config
        .scale_up_stabilization_s
        .max(config.scale_down_stabilization_s);
    while history
        .recommendations
        .front()
        .is_some_and(|(t, _)| *t < now_s - horizon)
    {
        history.recommendations.pop_front();
    }
    let within = |window: f64| {
        history
            .recommendations
            .iter()
            .filter(move |(t, _)| *t >= now_s - window)
            .map(|(_, count)| *count)
    };
    let stabilized = if recommended > current {
        within(config.scale_up_stabilization_s)
            .min()
            .unwrap_or(current)
            .max(current)
    } else if recommended < current {
        within(config.scale_down_stabilization_s)
            .max()
            .unwrap_or(current)
            .min(current)
    } else {
        current
    };
    if stabilized == current {
        let note = if recommended != current {
            " (held by stabilization window)"
        } else {
            ""
        };
        return (current, note.to_string());
    }
    let going_up = stabilized > current;
    if let Some((last, last_up)) = history.last_change {
        if now_s - last < config.cooldown_s && !(going_up && last_up) {
            return (
                current,
                format!(" (cooldown: changed {:.0}s ago)", now_s - last),
            );
        }
    }
    let next = if going_up {
        stabilized.min(current + up_step(config, current))
    } else {
        stabilized.max(current.saturating_sub(down_step(config, current)))
    };
    let note = if next != stabilized {
        format!(" (step bounded to {})", next.abs_diff(current))
    } else {
        String::new()
    };
    (next, note)
}

fn up_step(config: &PlannerConfig, current: u32) -> u32 {
    ((config.max_step_up_fraction * f64::from(current)).ceil() as u32)
        .max(config.scale_up_min_step)
        .max(1)
}

fn down_step(config: &PlannerConfig, current: u32) -> u32 {
    ((config.max_step_down_fraction * f64::from(current)).ceil() as u32).max(1)
}
