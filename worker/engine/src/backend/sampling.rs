//! Sampling a token where the logits are: the rule a backend applies when it
//! picks tokens itself ([`super::ComputeBackend::forward_sampled`]), so the
//! logits of a step never travel to the host.
//!
//! It is the CPU sampler's rule (`engine/sampler.rs`: temperature, then
//! top-k, then top-p over what top-k kept, then a draw with the request's own
//! uniform number), computed so that a GPU block of threads gets the very
//! same answer without sorting: thresholds are found on order-preserving
//! keys of the scaled logits (ties at a threshold are all kept, where the
//! CPU sampler keeps the lowest ids), and probability mass is counted in
//! 32.32 fixed point (`exp(x - max) * 2^32`, integer sums, exact in any
//! order). [`sample_row`] is the host version; `sample_rows` in
//! `kernels/sample.cu` the device one.

/// How one sequence's next token is picked, with the draw's uniform number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSampling {
    /// `<= 0`: greedy (the largest logit, lowest id on ties).
    pub temperature: f32,
    /// Keep only the `top_k` largest logits; 0 (or at least the vocabulary)
    /// keeps all, 1 is greedy.
    pub top_k: u32,
    /// Keep the smallest best-first set holding this much of the mass; 1
    /// keeps all.
    pub top_p: f32,
    /// The draw's uniform number in `[0, 1)` (from the request's seeded RNG).
    pub uniform: f64,
}

impl DeviceSampling {
    pub const GREEDY: DeviceSampling = DeviceSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        uniform: 0.0,
    };

    /// Whether the rule reduces to the largest logit.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.temperature.is_nan() || self.top_k == 1
    }

    /// The five 32-bit words the device kernel reads per row: temperature
    /// (f32 bits), top_k, top_p (f32 bits), uniform (f64 bits, low word first).
    pub fn to_words(&self) -> [i32; 5] {
        let u = self.uniform.to_bits();
        [
            self.temperature.to_bits() as i32,
            self.top_k.min(i32::MAX as u32) as i32,
            self.top_p.to_bits() as i32,
            u as u32 as i32,
            (u >> 32) as u32 as i32,
        ]
    }
}

/// A float's bits as an unsigned key with the same order.
fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// `exp(x - max)` in 32.32 fixed point (truncated).
fn fixed_mass(x: f32, max: f32) -> u64 {
    ((x - max).exp() * 4_294_967_296.0f32) as u64
}

/// Index of the largest value; the lowest index wins ties.
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The key `t` with `weight(key > t) < need <= weight(key >= t)` over
/// `(key, weight)` pairs (`1 <= need <= total weight`).
fn threshold(mut items: Vec<(u32, u64)>, need: u64) -> u32 {
    items.sort_unstable_by_key(|x| std::cmp::Reverse(x.0));
    let mut cum = 0u64;
    for &(key, w) in &items {
        cum += w;
        if cum >= need {
            return key;
        }
    }
    items.last().map_or(0, |x| x.0)
}

/// The token the rule picks from one row of logits.
pub fn sample_row(row: &[f32], s: &DeviceSampling) -> u32 {
    let best = argmax(row);
    if s.is_greedy() || row.is_empty() {
        return best;
    }
    let inv_t = 1.0 / s.temperature;
    let max = row[best as usize] * inv_t;
    let scaled = |i: usize| row[i] * inv_t;
    let vocab = row.len();
    let mut floor = 0u32;
    let k = s.top_k as usize;
    if k > 1 && k < vocab {
        floor = threshold(
            (0..vocab).map(|i| (order_key(scaled(i)), 1)).collect(),
            k as u64,
        );
    }
    let kept_mass = |floor: u32| -> u64 {
        (0..vocab)
            .map(&scaled)
            .filter(|&x| order_key(x) >= floor)
            .map(|x| fixed_mass(x, max))
            .sum()
    };
    let mut kept = kept_mass(floor);
    if s.top_p < 1.0 {
        let need = ((s.top_p as f64) * kept as f64).ceil() as u64;
        let need = need.clamp(1, kept);
        floor = threshold(
            (0..vocab)
                .map(&scaled)
                .filter(|&x| order_key(x) >= floor)
                .map(|x| (order_key(x), fixed_mass(x, max)))
                .collect(),
            need,
        );
        kept = kept_mass(floor);
    }
    let target = ((s.uniform * kept as f64) as u64).min(kept.saturating_sub(1));
    let mut cum = 0u64;
    for i in 0..vocab {
        let x = scaled(i);
        if order_key(x) >= floor {
            cum += fixed_mass(x, max);
            if cum > target {
                return i as u32;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Sampler;
    use tandem_api::types::SamplingParams;

    fn params(temperature: f32, top_k: u32, top_p: f32) -> DeviceSampling {
        DeviceSampling {
            temperature,
            top_k,
            top_p,
            uniform: 0.0,
        }
    }

    /// Frequencies of the rule over `n` evenly spaced uniforms: the rule's
    /// exact distribution up to 1/n.
    fn rule_distribution(row: &[f32], s: DeviceSampling, n: usize) -> Vec<f64> {
        let mut freq = vec![0f64; row.len()];
        for i in 0..n {
            let u = (i as f64 + 0.5) / n as f64;
            freq[sample_row(row, &DeviceSampling { uniform: u, ..s }) as usize] += 1.0 / n as f64;
        }
        freq
    }

    /// The CPU sampler's empirical distribution over `n` seeded draws.
    fn cpu_distribution(row: &[f32], s: DeviceSampling, n: usize) -> Vec<f64> {
        let mut sampler = Sampler::new(SamplingParams {
            temperature: s.temperature,
            top_k: (s.top_k > 0).then_some(s.top_k as usize),
            top_p: s.top_p,
            seed: Some(5),
            ..SamplingParams::default()
        });
        let mut freq = vec![0f64; row.len()];
        for _ in 0..n {
            freq[sampler.sample(&mut row.to_vec()).unwrap().id as usize] += 1.0 / n as f64;
        }
        freq
    }

    fn total_variation(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0
    }

    fn test_row() -> Vec<f32> {
        // Distinct logits with a long tail, a tie among the best few.
        let mut row: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 64) as f32 * 0.11 - 3.0)
            .collect();
        row[5] = row[7];
        row
    }

    #[test]
    fn greedy_rules_take_the_largest_logit_lowest_id_on_ties() {
        let row = [0.5, 2.0, -1.0, 2.0];
        for s in [
            params(0.0, 0, 1.0),
            params(-1.0, 5, 0.5),
            params(2.0, 1, 1.0),
        ] {
            for u in [0.0, 0.5, 0.999] {
                assert_eq!(sample_row(&row, &DeviceSampling { uniform: u, ..s }), 1);
            }
        }
    }

    #[test]
    fn temperature_alone_follows_the_softmax() {
        let row = [(3.0f32).ln(), (1.0f32).ln(), f32::NEG_INFINITY];
        let freq = rule_distribution(&row, params(1.0, 0, 1.0), 1000);
        assert!((freq[0] - 0.75).abs() < 0.002, "{freq:?}");
        assert_eq!(freq[2], 0.0, "a -inf logit is never drawn");
    }

    #[test]
    fn top_k_and_top_p_keep_what_the_cpu_sampler_keeps() {
        // probabilities ≈ 0.64, 0.24, 0.09, 0.03
        let row = [3.0f32, 2.0, 1.0, 0.0];
        let nucleus = rule_distribution(&row, params(1.0, 0, 0.8), 1000);
        assert_eq!(nucleus[2] + nucleus[3], 0.0, "{nucleus:?}");
        assert!((nucleus[0] - 0.73).abs() < 0.01, "{nucleus:?}");
        let top2 = rule_distribution(&row, params(1.0, 2, 1.0), 1000);
        assert_eq!(top2[2] + top2[3], 0.0, "{top2:?}");
        let top3_p = rule_distribution(&row, params(1.0, 3, 0.7), 1000);
        // top-3 renormalised: 0.665, 0.245, 0.09 -> 0.7 needs the first two.
        assert_eq!(top3_p[2] + top3_p[3], 0.0, "{top3_p:?}");
        assert!(top3_p[1] > 0.2, "{top3_p:?}");
    }

    /// The rule's distribution equals the CPU sampler's (total variation of
    /// 20 000 seeded CPU draws against the rule's exact frequencies).
    #[test]
    fn distributions_match_the_cpu_sampler() {
        let row = test_row();
        for s in [
            params(1.0, 0, 1.0),
            params(0.7, 0, 1.0),
            params(1.3, 10, 1.0),
            params(1.0, 0, 0.9),
            params(0.8, 20, 0.85),
        ] {
            let rule = rule_distribution(&row, s, 20_000);
            let cpu = cpu_distribution(&row, s, 20_000);
            let tv = total_variation(&rule, &cpu);
            assert!(tv < 0.03, "{s:?}: total variation {tv}");
        }
    }

    /// With temperature alone both walk the ids in order, so the same seed
    /// gives the same tokens (up to rounding at a boundary).
    #[test]
    fn same_seed_same_tokens_as_the_cpu_sampler_for_plain_temperature() {
        let row = test_row();
        let sp = SamplingParams {
            temperature: 0.9,
            seed: Some(77),
            ..SamplingParams::default()
        };
        let mut cpu = Sampler::new(sp.clone());
        let mut dev = Sampler::new(sp);
        let n = 2000;
        let same = (0..n)
            .filter(|_| {
                let want = cpu.sample(&mut row.clone()).unwrap().id;
                let got = sample_row(&row, &dev.device_sampling());
                want == got
            })
            .count();
        assert!(same >= n - 2, "{same} of {n} equal");
    }

    #[test]
    fn words_carry_every_parameter() {
        let s = DeviceSampling {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            uniform: 0.123456789,
        };
        let w = s.to_words();
        assert_eq!(f32::from_bits(w[0] as u32), 0.7);
        assert_eq!(w[1], 40);
        assert_eq!(f32::from_bits(w[2] as u32), 0.9);
        let u = (w[3] as u32 as u64) | ((w[4] as u32 as u64) << 32);
        assert_eq!(f64::from_bits(u), 0.123456789);
    }
}
