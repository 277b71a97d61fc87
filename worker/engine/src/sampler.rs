//! Picks the next token from a row of logits, per request.
//!
//! Order: the grammar's mask (forbidden tokens to `-inf`) → `logit_bias` →
//! the repetition penalty (over the prompt and the output) and the
//! presence/frequency penalties (over the output, as OpenAI and vLLM do) →
//! logprobs, reported as the log-softmax of those logits *before*
//! temperature, top-k, top-p and min-p (so they describe the model under
//! the request's hard rules, not its sampling knobs) → greedy if temperature
//! is 0, else temperature, min-p, top-k, top-p and a draw from the request's
//! own RNG (seeded by `seed` when given, so a seeded request is reproducible
//! whatever else runs in the same batch).

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::backend::DeviceSampling;
use super::types::{SamplingParams, TokenOutput};
use tandem_guide::Constraint;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was generated so far (for the penalties).
    counts: HashMap<u32, u32>,
    /// Every token of the prompt and the output, when the repetition
    /// penalty is on.
    seen: HashSet<u32>,
    /// The request's grammar state, when it has one.
    constraint: Option<Constraint>,
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
            seen: HashSet::new(),
            constraint: None,
            candidates: Vec::new(),
        }
    }

    /// The sampler of a request with this prompt and (compiled) grammar. The
    /// prompt's last `output_prefix` tokens are the request's own earlier
    /// output: they count toward the penalties and walk the grammar.
    pub fn for_request(
        params: SamplingParams,
        prompt: &[u32],
        constraint: Option<Constraint>,
    ) -> Result<Self, String> {
        let prefix = params.output_prefix.min(prompt.len());
        let mut sampler = Self::new(params);
        sampler.constraint = constraint;
        let (prompt, output) = prompt.split_at(prompt.len() - prefix);
        if sampler.params.repetition_penalty != 1.0 {
            sampler.seen.extend(prompt);
        }
        for &token in output {
            sampler.record_drawn_elsewhere(token)?;
        }
        Ok(sampler)
    }

    /// [`Sampler::record`] for a token another sampler picked (a prefill
    /// worker's first token, a migrated request's earlier output): also
    /// takes the random number its draw used there, so a seeded request
    /// draws the numbers it would have drawn had one sampler picked every
    /// token.
    pub fn record_drawn_elsewhere(&mut self, token: u32) -> Result<(), String> {
        if self.params.temperature > 0.0 {
            let _ = self.rng.random::<f64>();
        }
        self.record(token)
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Counts a generated token toward the penalties and moves the grammar
    /// past it; `Err` when the grammar does not allow it (a peer sampled it
    /// without the grammar).
    pub fn record(&mut self, token: u32) -> Result<(), String> {
        *self.counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        match &mut self.constraint {
            Some(c) => c.advance(token).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Whether the next token can be picked where the logits are
    /// ([`DeviceSampling`]): nothing to report or apply but temperature,
    /// top-k, top-p and a grammar's mask (which the backend applies,
    /// [`crate::backend::ComputeBackend::forward_sampled_masked`]).
    pub fn device_eligible(&self) -> bool {
        let p = &self.params;
        p.logprobs.is_none()
            && p.prompt_logprobs.is_none()
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && p.repetition_penalty == 1.0
            && p.min_p == 0.0
            && p.logit_bias.is_empty()
    }

    /// Takes the grammar state out (to prepare its mask on another thread);
    /// give it back with [`Sampler::put_constraint`].
    pub fn take_constraint(&mut self) -> Option<Constraint> {
        self.constraint.take()
    }

    pub fn put_constraint(&mut self, c: Constraint) {
        self.constraint = Some(c);
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

    /// Samples one token; `logits` is modified in place (mask, bias and
    /// penalties applied). `Err` when the grammar failed.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<TokenOutput, String> {
        if let Some(c) = &mut self.constraint {
            c.apply(logits).map_err(|e| e.to_string())?;
        }
        let p = &self.params;
        for &(token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let r = p.repetition_penalty;
            for &tok in &self.seen {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
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
        Ok(match self.params.logprobs {
            None => TokenOutput {
                id,
                logprob: None,
                top_logprobs: Vec::new(),
            },
            Some(n) => token_logprobs(logits, id, n),
        })
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
        if p.min_p > 0.0 {
            // Keep tokens at least min_p times as likely as the best one.
            let best = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
            let floor = best + p.min_p.ln();
            c.retain(|x| x.1 >= floor);
        }
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

/// `id`'s log-probability under `logits` and the `n` most likely
/// alternatives, best first.
pub fn token_logprobs(logits: &[f32], id: u32, n: usize) -> TokenOutput {
    let lse = log_sum_exp(logits);
    let mut top = top_n(logits, n);
    for (_, l) in &mut top {
        *l -= lse;
    }
    TokenOutput {
        id,
        logprob: Some(logits[id as usize] - lse),
        top_logprobs: top,
    }
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

    /// A seeded request continued by another sampler (a decode worker after
    /// a prefill worker's first token, or after migration) picks the tokens
    /// one sampler would have picked.
    #[test]
    fn a_seeded_request_continued_elsewhere_draws_what_it_would_have_drawn() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let seeded = SamplingParams {
            seed: Some(7),
            ..params(1.0)
        };
        let mut one = Sampler::new(seeded.clone());
        let whole: Vec<u32> = (0..6)
            .map(|_| one.sample(&mut logits.clone()).unwrap().id)
            .collect();
        let mut first = Sampler::new(seeded.clone());
        assert_eq!(first.sample(&mut logits.clone()).unwrap().id, whole[0]);
        let mut rest = Sampler::new(seeded.clone());
        rest.record_drawn_elsewhere(whole[0]).unwrap();
        let continued: Vec<u32> = (1..6)
            .map(|_| rest.sample(&mut logits.clone()).unwrap().id)
            .collect();
        assert_eq!(continued, whole[1..]);
        // Migrated after three tokens: the prompt ends with them.
        let migrated = SamplingParams {
            output_prefix: 3,
            ..seeded
        };
        let prompt = [9, 9, whole[0], whole[1], whole[2]];
        let mut moved = Sampler::for_request(migrated, &prompt, None).unwrap();
        let after: Vec<u32> = (3..6)
            .map(|_| moved.sample(&mut logits.clone()).unwrap().id)
            .collect();
        assert_eq!(after, whole[3..]);
    }

    #[test]
    fn greedy_takes_the_largest_logit_and_lowest_id_on_ties() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9]).unwrap().id, 1);
        assert_eq!(s.sample(&mut [1.0, 5.0, 5.0]).unwrap().id, 1);
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_top_alternatives() {
        let mut s = Sampler::new(SamplingParams {
            logprobs: Some(2),
            ..params(0.0)
        });
        let out = s
            .sample(&mut [(2.0f32).ln(), (1.0f32).ln(), (1.0f32).ln()])
            .unwrap();
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
        assert_eq!(s.sample(&mut logits.clone()).unwrap().id, 0);
        s.record(0).unwrap();
        // 2.0 - 0.5 - 1.0 = 0.5 < 1.0
        assert_eq!(s.sample(&mut logits.clone()).unwrap().id, 1);
        s.record(1).unwrap();
        s.record(0).unwrap();
        // token 0: 2 - 0.5 - 2 = -0.5, token 1: 1 - 1.5 = -0.5, token 2: 0
        assert_eq!(s.sample(&mut logits.clone()).unwrap().id, 2);
    }

    #[test]
    fn top_k_one_is_greedy_even_when_hot() {
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            seed: Some(1),
            ..params(5.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.3, 0.1]).unwrap().id, 1);
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
            seen[s.sample(&mut logits.clone()).unwrap().id as usize] += 1;
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
            .filter(|_| s.sample(&mut logits.clone()).unwrap().id == 0)
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
                .map(|i| s.sample(&mut [0.0, 0.5, 1.0, (i % 3) as f32]).unwrap().id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn logit_bias_forces_and_bans() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(2, 100.0)],
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [5.0, 9.0, -3.0]).unwrap().id, 2);
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(1, -100.0), (7, 5.0)],
            ..params(0.0)
        });
        assert_eq!(
            s.sample(&mut [5.0, 9.0, -3.0]).unwrap().id,
            0,
            "id 7 is outside the row"
        );
    }

    #[test]
    fn repetition_penalty_covers_prompt_and_output_and_both_signs() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        };
        // Token 0 is in the prompt: 4 / 2 = 2 < 3.
        let mut s = Sampler::for_request(p.clone(), &[0], None).unwrap();
        assert_eq!(s.sample(&mut [4.0, 3.0, -1.0]).unwrap().id, 1);
        s.record(1).unwrap();
        // 0 → 2, 1 → 1.5, token 2 untouched.
        assert_eq!(s.sample(&mut [4.0, 3.0, 2.5]).unwrap().id, 2);
        // A negative logit is pushed further down: -1 * 2 = -2 < -1.5.
        let mut s = Sampler::for_request(p, &[0], None).unwrap();
        assert_eq!(s.sample(&mut [-1.0, -1.5]).unwrap().id, 1);
    }

    #[test]
    fn output_prefix_counts_as_generated() {
        let p = SamplingParams {
            frequency_penalty: 2.0,
            output_prefix: 1,
            ..params(0.0)
        };
        // Token 0 was generated before the request moved: penalised.
        let mut s = Sampler::for_request(p, &[5, 0], None).unwrap();
        assert_eq!(s.sample(&mut [3.0, 2.0]).unwrap().id, 1);
    }

    #[test]
    fn min_p_one_keeps_only_the_best_token_even_when_hot() {
        let mut s = Sampler::new(SamplingParams {
            min_p: 1.0,
            seed: Some(5),
            ..params(2.0)
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [1.0, 1.2, 0.9]).unwrap().id, 1);
        }
        // min_p 0.5 at temperature 1: p(0) / p(1) = e^-1 < 0.5, so only 1 and 2 stay.
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            seed: Some(5),
            ..params(1.0)
        });
        let mut seen = [0; 3];
        for _ in 0..500 {
            seen[s.sample(&mut [0.0, 1.0, 0.8]).unwrap().id as usize] += 1;
        }
        assert_eq!(seen[0], 0, "{seen:?}");
        assert!(seen[2] > 100, "{seen:?}");
    }

    #[test]
    fn only_plain_rules_sample_on_the_device() {
        assert!(Sampler::new(params(1.0)).device_eligible());
        for p in [
            SamplingParams {
                min_p: 0.1,
                ..params(1.0)
            },
            SamplingParams {
                repetition_penalty: 1.1,
                ..params(1.0)
            },
            SamplingParams {
                logit_bias: vec![(0, 1.0)],
                ..params(1.0)
            },
            SamplingParams {
                prompt_logprobs: Some(0),
                ..params(1.0)
            },
        ] {
            assert!(!Sampler::new(p).device_eligible());
        }
    }
}
