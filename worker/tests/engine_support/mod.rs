//! Shared by the engine tests: random tiny models, a naive reference forward,
//! and test backends ([`null_backend`], [`wrapped`]).
#![allow(dead_code)]

pub mod null_backend;
pub mod wrapped;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_model::config::Llama3RopeScaling;
use tandem_model::{Architecture, LayerWeights, ModelConfig, Tensor, Weights};

/// Which variant of the Llama family a tiny test model exercises.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub attention_bias: bool,
    pub tied: bool,
    pub llama3_rope: bool,
}

pub const GQA: Variant = Variant {
    num_heads: 4,
    num_kv_heads: 2,
    attention_bias: false,
    tied: true,
    llama3_rope: false,
};

pub fn tiny_config(v: Variant) -> ModelConfig {
    ModelConfig {
        architecture: if v.attention_bias {
            Architecture::Qwen2
        } else {
            Architecture::Llama
        },
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: v.num_heads,
        num_kv_heads: v.num_kv_heads,
        head_dim: 16,
        rope_theta: 10000.0,
        rope_scaling: v.llama3_rope.then_some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }),
        rms_norm_eps: 1e-5,
        max_position_embeddings: 256,
        tie_word_embeddings: v.tied,
        attention_bias: v.attention_bias,
    }
}

fn uniform(rng: &mut StdRng, shape: Vec<usize>, scale: f32, offset: f32) -> Tensor {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Tensor::new(shape, data)
}

/// Random weights of `cfg`'s shape, scaled so activations stay O(1) and the
/// logits are not flat (greedy decoding then depends on every layer).
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    let h = cfg.hidden_size;
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let f = cfg.intermediate_size;
    let lin = |rng: &mut StdRng, out: usize, inp: usize| {
        uniform(rng, vec![out, inp], 1.7 / (inp as f32).sqrt(), 0.0)
    };
    let layers = (0..cfg.num_layers)
        .map(|_| LayerWeights {
            attn_norm: uniform(&mut rng, vec![h], 0.2, 1.0),
            wq: lin(&mut rng, q, h),
            wk: lin(&mut rng, kv, h),
            wv: lin(&mut rng, kv, h),
            bq: cfg
                .attention_bias
                .then(|| uniform(&mut rng, vec![q], 0.5, 0.0)),
            bk: cfg
                .attention_bias
                .then(|| uniform(&mut rng, vec![kv], 0.5, 0.0)),
            bv: cfg
                .attention_bias
                .then(|| uniform(&mut rng, vec![kv], 0.5, 0.0)),
            wo: lin(&mut rng, h, q),
            ffn_norm: uniform(&mut rng, vec![h], 0.2, 1.0),
            w_gate: lin(&mut rng, f, h),
            w_up: lin(&mut rng, f, h),
            w_down: lin(&mut rng, h, f),
        })
        .collect();
    Weights {
        embed_tokens: uniform(&mut rng, vec![cfg.vocab_size, h], 1.0, 0.0),
        layers,
        final_norm: uniform(&mut rng, vec![h], 0.2, 1.0),
        lm_head: (!cfg.tie_word_embeddings).then(|| lin(&mut rng, cfg.vocab_size, h)),
    }
}

fn matvec(w: &Tensor, x: &[f32]) -> Vec<f32> {
    (0..w.shape[0])
        .map(|r| w.row(r).iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(x, w)| x * inv * w).collect()
}

/// RoPE frequencies written straight from the HF formula, in f64.
fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim as f64;
    (0..cfg.head_dim / 2)
        .map(|i| {
            let base = 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / d);
            match cfg.rope_scaling {
                None => base,
                Some(s) => {
                    let wavelen = 2.0 * std::f64::consts::PI / base;
                    let orig = s.original_max_position_embeddings as f64;
                    if wavelen < orig / s.high_freq_factor as f64 {
                        base
                    } else if wavelen > orig / s.low_freq_factor as f64 {
                        base / s.factor as f64
                    } else {
                        let smooth = (orig / wavelen - s.low_freq_factor as f64)
                            / (s.high_freq_factor - s.low_freq_factor) as f64;
                        (1.0 - smooth) * base / s.factor as f64 + smooth * base
                    }
                }
            }
        })
        .collect()
}

fn rope(v: &mut [f32], head_dim: usize, pos: usize, freqs: &[f64]) {
    let half = head_dim / 2;
    for head in v.chunks_mut(head_dim) {
        for i in 0..half {
            let angle = pos as f64 * freqs[i];
            let (s, c) = (angle.sin() as f32, angle.cos() as f32);
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = a * s + b * c;
        }
    }
}

/// Logits after every position of `tokens`, computed one position at a time
/// with plain loops: no paging, no batching, K and V of every earlier position
/// kept in plain vectors.
pub fn reference_logits(cfg: &ModelConfig, w: &Weights, tokens: &[u32]) -> Vec<Vec<f32>> {
    let hd = cfg.head_dim;
    let group = cfg.num_heads / cfg.num_kv_heads;
    let freqs = inv_freq(cfg);
    let mut keys: Vec<Vec<Vec<f32>>> = vec![Vec::new(); cfg.num_layers];
    let mut values: Vec<Vec<Vec<f32>>> = vec![Vec::new(); cfg.num_layers];
    let mut all = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        let mut x = w.embed_tokens.row(tok as usize).to_vec();
        for (l, lw) in w.layers.iter().enumerate() {
            let xn = rms_norm(&x, &lw.attn_norm.data, cfg.rms_norm_eps);
            let mut q = matvec(&lw.wq, &xn);
            let mut k = matvec(&lw.wk, &xn);
            let mut v = matvec(&lw.wv, &xn);
            if let (Some(bq), Some(bk), Some(bv)) = (&lw.bq, &lw.bk, &lw.bv) {
                q.iter_mut().zip(&bq.data).for_each(|(a, b)| *a += b);
                k.iter_mut().zip(&bk.data).for_each(|(a, b)| *a += b);
                v.iter_mut().zip(&bv.data).for_each(|(a, b)| *a += b);
            }
            rope(&mut q, hd, pos, &freqs);
            rope(&mut k, hd, pos, &freqs);
            keys[l].push(k);
            values[l].push(v);
            let mut attn = vec![0.0f32; cfg.num_heads * hd];
            for head in 0..cfg.num_heads {
                let kvh = head / group;
                let qh = &q[head * hd..(head + 1) * hd];
                let scores: Vec<f32> = keys[l]
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                for (e, v) in exps.iter().zip(&values[l]) {
                    for d in 0..hd {
                        attn[head * hd + d] += e / sum * v[kvh * hd + d];
                    }
                }
            }
            let o = matvec(&lw.wo, &attn);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = rms_norm(&x, &lw.ffn_norm.data, cfg.rms_norm_eps);
            let g = matvec(&lw.w_gate, &xn);
            let u = matvec(&lw.w_up, &xn);
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(&lw.w_down, &act);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        let xn = rms_norm(&x, &w.final_norm.data, cfg.rms_norm_eps);
        all.push(matvec(w.output(), &xn));
    }
    all
}

/// Largest absolute difference relative to the largest reference magnitude.
pub fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0.0, f32::max).max(1e-6);
    diff / scale
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Rounds every 2-D matrix to a Q4_1-style grid (per block of 32 along a row:
/// `min + level * (max - min) / 15`), the way weights dequantized from a GGUF
/// Q4_1 file look.
pub fn q4_rounded(w: &Weights) -> Weights {
    let round = |t: &Tensor| {
        let mut data = t.data.clone();
        for block in data.chunks_mut(32) {
            let min = block.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = block.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let scale = (max - min) / 15.0;
            for v in block.iter_mut() {
                let level = if scale > 0.0 {
                    ((*v - min) / scale).round()
                } else {
                    0.0
                };
                *v = scale * level + min;
            }
        }
        Tensor::new(t.shape.clone(), data)
    };
    w.map_matrices(round)
}
