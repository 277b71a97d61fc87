//! The planner's shared vocabulary: the tiers it scales, counts and reasons per tier, what it
//! observes and what it decides. The decision ([`super::decide`]), the seam to the replicas
//! ([`super::target`]) and every target import these; none of them imports another for them.

use std::fmt;

use crate::crd;

/// A scalable tier of a disaggregated deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    Prefill,
    Decode,
}

impl From<Tier> for crd::Tier {
    fn from(tier: Tier) -> crd::Tier {
        match tier {
            Tier::Prefill => crd::Tier::Prefill,
            Tier::Decode => crd::Tier::Decode,
        }
    }
}

impl fmt::Display for Tier {
    /// The tier's one lower-case name (labels, object names, metric labels, the local control
    /// endpoint's paths): the CRD's.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(crd::Tier::from(*self).as_str())
    }
}

/// A replica count per tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierCounts {
    pub prefill: u32,
    pub decode: u32,
}

impl TierCounts {
    pub fn get(&self, tier: Tier) -> u32 {
        match tier {
            Tier::Prefill => self.prefill,
            Tier::Decode => self.decode,
        }
    }

    pub fn set(&mut self, tier: Tier, replicas: u32) {
        match tier {
            Tier::Prefill => self.prefill = replicas,
            Tier::Decode => self.decode = replicas,
        }
    }
}

/// A line per tier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierReasons {
    prefill: String,
    decode: String,
}

impl TierReasons {
    pub(crate) fn set(&mut self, tier: Tier, reason: String) {
        match tier {
            Tier::Prefill => self.prefill = reason,
            Tier::Decode => self.decode = reason,
        }
    }

    pub fn get(&self, tier: Tier) -> &str {
        match tier {
            Tier::Prefill => &self.prefill,
            Tier::Decode => &self.decode,
        }
    }
}

/// What the metrics said about one interval. Any field may be missing (`None`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// When the newest sample behind this observation was taken (seconds, the planner's clock).
    pub timestamp_s: f64,
    pub ttft_p90_s: Option<f64>,
    pub itl_p90_s: Option<f64>,
    /// Requests per second.
    pub request_rate: Option<f64>,
    pub mean_input_tokens: Option<f64>,
    pub mean_output_tokens: Option<f64>,
    /// Requests waiting for a prefill replica (summed over replicas).
    pub prefill_queue_depth: Option<f64>,
    /// Fraction of decode KV blocks in use, 0..=1.
    pub decode_kv_utilization: Option<f64>,
    /// Prompt tokens the prefill tier computed per second (served, not offered: a backlogged
    /// tier serves less than arrives).
    pub prefill_tokens_per_s: Option<f64>,
    /// Tokens the decode tier generated per second (served). The decode model learns from this
    /// when present: while prefill is backlogged, decode sees less than the arrival rate.
    pub decode_tokens_per_s: Option<f64>,
    /// Ready replicas per tier.
    pub ready: TierCounts,
}

/// Why the planner did not act; becomes the status condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// CamelCase reason for the condition ([`reasons::METRICS_MISSING`],
    /// [`reasons::METRICS_STALE`]).
    ///
    /// [`reasons::METRICS_MISSING`]: crate::conditions::reasons::METRICS_MISSING
    /// [`reasons::METRICS_STALE`]: crate::conditions::reasons::METRICS_STALE
    pub reason: &'static str,
    pub message: String,
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Replicas to set per tier (equal to the current counts when nothing changes).
    pub desired: TierCounts,
    /// One line per tier saying why.
    pub reason: String,
    /// Why, per tier (the parts of `reason`), for each tier's status.
    pub tier_reasons: TierReasons,
    /// Set when the planner refused to act.
    pub refusal: Option<Refusal>,
}
