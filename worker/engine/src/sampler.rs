//! Picks the next token from a row of logits, per request.
//!
//! Order: presence/frequency penalties (over the tokens this request has
//! generated, as OpenAI and vLLM do) → logprobs, reported as the log-softmax
//! of the penalised logits *before* temperature, top-k and top-p (so they
//! describe the model, not the sampling knobs) → greedy if temperature is 0,
//! else temperature, top-k, top-p and a draw from the request's own RNG (seeded
//! by `seed` when given, so a seeded request is reproducible whatever else
//! runs in the same batch).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::backend::DeviceSampling;
use super::types::{SamplingParams, TokenOutput};

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was generated so far (for the penalties).
    counts: HashMap<u32, u32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            counts: HashMap::new(),
            candidates: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Counts a generated token toward the penalties.
    pub fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Whether the next token can be picked where the logits are
    /// ([`DeviceSampling`]): no logprobs to report and no penalties to apply.
    pub fn device_eligible(&self) -> bool {
        let p = &self.params;
        p.logprobs.is_none() && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0
    }

    /// The next draw's rule and uniform number, for a backend that samples
    /// itself. Takes one number from the request's RNG unless greedy, as
    /// [`Sampler::sample`] does, so a seeded request draws the same numbers
    /// whichever side samples.
    pub fn device_sampling(&mut self) -> DeviceSampling {
        let p = &self.params;
        let mut s = DeviceSampling {
            temperature: p.temperature,
            top_k: p.top_k.map_or(0, |k| k.min(u32::MAX as usize) as u32),
            top_p: p.top_p,
            uniform: 0.0,
        };
        if p.temperature > 0.0 {
            s.uniform = self.rng.random::<f64>();
        }
        s
    }

    /// Samples one token; `logits` is modified in place (penalties applied).
    pub fn sample(&mut self, logits: &mut [f32]) -> TokenOutput {
        let p = &self.params;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&tok, &count) in &self.counts {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
        let id = if p.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let (logprob, top_logprobs) = match self.params.logprobs {
            None => (None, Vec::new()),
            Some(n) => {
                let lse = log_sum_exp(logits);
                let mut top = top_n(logits, n);
                for (_, l) in &mut top {
                    *l -= lse;
                }
                (Some(logits[id as usize] - lse), top)
            }
        };
        TokenOutput {
            id,
            logprob,
            top_logprobs,
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, l)| (i as u32, l * inv_t)),
        );
        // Best first, ties by id, so a seeded draw depends only on the logits.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if let Some(k) = p.top_k.filter(|&k| k > 0 && k < c.len()) {
            c.select_nth_unstable_by(k - 1, order);
            c.truncate(k);
        }
        let filter_top_p = p.top_p < 1.0;
        if filter_top_p {
            c.sort_unstable_by(order);
        }
        let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp();
            total += x.1 as f64;
        }
        if filter_top_p {
            let mut cum = 0.0f64;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                cum += x.1 as f64 / total;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|x| x.1 as f64).sum();
        }
        let mut u = self.rng.random::<f64>() * total;
        for x in c.iter() {
            u -= x.1 as f64;
            if u < 0.0 {
                return x.0;
            }
        }
        c.last().map(|x| x.0).unwrap_or(0)
    }
}

/// Index of the largest logit; the lowest id wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `n` largest `(id, logit)`, best first.
fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, *l))
        .collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let n = n.min(all.len());
    if n == 0 {
        return Vec::new();
    }
    all.select_nth_unstable_by(n - 1, order);
    all.truncate(n);
    all.sort_unstable_by(order);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit_and_lowest_id_on_ties() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9]).id, 1);
        assert_eq!(s.sample(&mut [1.0, 5.0, 5.0]).id, 1);
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_top_alternatives() {
        let mut s = Sampler::new(SamplingParams {
            logprobs: Some(2),
            ..params(0.0)
        });
        let out = s.sample(&mut [(2.0f32).ln(), (1.0f32).ln(), (1.0f32).ln()]);
        // probabilities 0.5, 0.25, 0.25
        assert_eq!(out.id, 0);
        assert!((out.logprob.unwrap() - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(out.top_logprobs.len(), 2);
        assert_eq!(out.top_logprobs[0].0, 0);
        assert_eq!(out.top_logprobs[1].0, 1, "ties ordered by id");
        assert!((out.top_logprobs[1].1 - 0.25f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn penalties_lower_generated_tokens() {
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 1.0,
            presence_penalty: 0.5,
            ..params(0.0)
        });
        let logits = [2.0, 1.0, 0.0];
        assert_eq!(s.sample(&mut logits.clone()).id, 0);
        s.record(0);
        // 2.0 - 0.5 - 1.0 = 0.5 < 1.0
        assert_eq!(s.sample(&mut logits.clone()).id, 1);
        s.record(1);
        s.record(0);
        // token 0: 2 - 0.5 - 2 = -0.5, token 1: 1 - 1.5 = -0.5, token 2: 0
        assert_eq!(s.sample(&mut logits.clone()).id, 2);
    }

    #[test]
    fn top_k_one_is_greedy_even_when_hot() {
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            seed: Some(1),
            ..params(5.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.3, 0.1]).id, 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ≈ 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps ids 0 and 1.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.8,
            seed: Some(3),
            ..params(1.0)
        });
        let mut seen = [0; 4];
        for _ in 0..2000 {
            seen[s.sample(&mut logits.clone()).id as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[0] > seen[1] && seen[1] > 300, "{seen:?}");
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let logits = [(3.0f32).ln(), (1.0f32).ln()];
        let mut s = Sampler::new(SamplingParams {
            seed: Some(11),
            ..params(1.0)
        });
        let n = 4000;
        let zeros = (0..n)
            .filter(|_| s.sample(&mut logits.clone()).id == 0)
            .count();
        let frac = zeros as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.03, "p(0) = {frac}");
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(1.0)
            });
            (0..32)
                .map(|i| s.sample(&mut [0.0, 0.5, 1.0, (i % 3) as f32]).id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }
}
