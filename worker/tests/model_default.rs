//! The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) loads to the
//! expected config, tokenizes like its HF tokenizer, renders ChatML, and —
//! through a plain forward pass written here — answers sensibly, which can
//! only happen if dequantization and the Q/K un-permutation are right.

use std::sync::OnceLock;

use tandem_model::{self as model, ChatMessage, LoadedModel, ModelConfig, Tensor};

fn default_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        // Resolving by name never downloads when the file is cached.
        let path = model::resolve(Some(model::DEFAULT_MODEL)).expect("default model is cached");
        model::load(&path).expect("default model loads")
    })
}

#[test]
fn default_model_has_the_published_shape() {
    let m = default_model();
    let c = &m.config;
    assert_eq!(c.architecture, model::Architecture::Llama);
    assert_eq!(
        (c.num_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 100_000.0);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings && !c.attention_bias);
    assert!(c.rope_scaling.is_none());
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);

    assert_eq!(m.name, "SmolLM2-135M-Instruct");
    assert_eq!(m.info.format, "gguf");
    assert_eq!(m.info.quantization, "Q4_1");
    assert_eq!(m.info.parameters, c.num_parameters());
    assert!(m.info.has_chat_template);
    assert!(m.weights.lm_head.is_none());
    assert_eq!(m.weights.layers.len(), 30);
    assert_eq!(m.weights.embed_tokens.shape, vec![49152, 576]);
    assert_eq!(m.weights.layers[0].wk.shape, vec![192, 576]);
    assert_eq!(m.weights.layers[29].w_down.shape, vec![576, 1536]);
}

#[test]
fn tokenizer_matches_the_hf_tokenizer() {
    let t = &default_model().tokenizer;
    assert_eq!(t.bos_token_id(), Some(1));
    assert_eq!(t.eos_token_ids(), &[2]);
    assert!(!t.add_bos_token());
    assert_eq!(t.vocab_size(), 49152);
    // Known ids from SmolLM2's tokenizer.json.
    assert_eq!(t.encode("Hello world").unwrap(), vec![19556, 905]);
    // Digits are split one by one (the "smollm" pre-tokenizer).
    assert_eq!(t.encode("2024").unwrap().len(), 4);
    // Control tokens written in text are one id each, never split.
    let ids = t.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(ids.iter().filter(|&&i| i <= 2).count(), 2);
    assert_eq!(t.decode(&ids, true), "user\nHi");
    assert_eq!(t.decode(&ids, false), "<|im_start|>user\nHi<|im_end|>");
}

#[test]
fn tokenizer_round_trips_unicode() {
    let t = &default_model().tokenizer;
    for text in [
        "naïve café, señor — déjà vu",
        "東京は日本の首都です。",
        "emoji 🦀🚀 and flags 🇫🇷 and zwj 👩‍💻",
        "line one\nline two\r\n\ttabbed   spaced\n\n",
        "  leading and trailing  ",
        "mixed: Ωμέγα, Привет, مرحبا, 1234567890",
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids, false), text, "ids {ids:?}");
        // Streaming decode gives the same text as decoding at once.
        let mut inc = t.incremental();
        let mut streamed: String = ids.iter().map(|&i| inc.push(i)).collect();
        streamed.push_str(&inc.flush());
        assert_eq!(streamed, text);
    }
}

#[test]
fn chat_template_renders_chatml() {
    let m = default_model();
    let tmpl = m.chat_template.as_ref().expect("template");
    let text = tmpl
        .render(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = m.tokenizer.encode(&text).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
}

// ---- a plain forward pass: no cache, no batching, one token at a time ----

fn matvec(w: &Tensor, x: &[f32]) -> Vec<f32> {
    (0..w.shape[0])
        .map(|r| w.row(r).iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f32], w: &Tensor, eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(&w.data).map(|(v, g)| v * s * g).collect()
}

/// Half-split RoPE (HF `rotate_half`): dims i and i + d/2 rotate together.
fn rope(v: &mut [f32], pos: usize, cfg: &ModelConfig) {
    let d = cfg.head_dim;
    for head in v.chunks_mut(d) {
        for i in 0..d / 2 {
            let freq = cfg.rope_theta.powf(-((2 * i) as f32) / d as f32);
            let (sin, cos) = (pos as f32 * freq).sin_cos();
            let (a, b) = (head[i], head[i + d / 2]);
            head[i] = a * cos - b * sin;
            head[i + d / 2] = b * cos + a * sin;
        }
    }
}

/// A plain incremental forward pass: a growing list of K and V per layer.
struct Reference<'a> {
    m: &'a LoadedModel,
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
}

impl<'a> Reference<'a> {
    fn new(m: &'a LoadedModel) -> Self {
        let n = m.config.num_layers;
        Self {
            m,
            keys: vec![Vec::new(); n],
            values: vec![Vec::new(); n],
        }
    }

    /// Feeds one token; returns the next-token logits.
    fn step(&mut self, id: u32) -> Vec<f32> {
        let cfg = &self.m.config;
        let w = &self.m.weights;
        let (d, group) = (cfg.head_dim, cfg.num_heads / cfg.num_kv_heads);
        let pos = self.keys[0].len();
        let mut x = w.embed_tokens.row(id as usize).to_vec();
        for (l, lw) in w.layers.iter().enumerate() {
            let h = rms_norm(&x, &lw.attn_norm, cfg.rms_norm_eps);
            let mut q = matvec(&lw.wq, &h);
            let mut k = matvec(&lw.wk, &h);
            let v = matvec(&lw.wv, &h);
            rope(&mut q, pos, cfg);
            rope(&mut k, pos, cfg);
            self.keys[l].push(k);
            self.values[l].push(v);
            let mut attn = vec![0f32; cfg.num_heads * d];
            for head in 0..cfg.num_heads {
                let kv = head / group;
                let qh = &q[head * d..(head + 1) * d];
                let scores: Vec<f32> = self.keys[l]
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[kv * d..(kv + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f32 = exps.iter().sum();
                for (p, e) in exps.iter().enumerate() {
                    for j in 0..d {
                        attn[head * d + j] += e / total * self.values[l][p][kv * d + j];
                    }
                }
            }
            let o = matvec(&lw.wo, &attn);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms_norm(&x, &lw.ffn_norm, cfg.rms_norm_eps);
            let gate = matvec(&lw.w_gate, &h);
            let up = matvec(&lw.w_up, &h);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(&lw.w_down, &act);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        let h = rms_norm(&x, &w.final_norm, cfg.rms_norm_eps);
        matvec(w.output(), &h)
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

#[test]
fn plain_forward_completes_paris() {
    // Raw text, no chat template: six tokens keep this plain forward quick.
    let m = default_model();
    let ids = m.tokenizer.encode("The capital of France is").unwrap();
    let mut reference = Reference::new(m);
    let mut logits = Vec::new();
    for &id in &ids {
        logits = reference.step(id);
    }
    let next = argmax(&logits);
    assert_eq!(m.tokenizer.decode(&[next], true), " Paris");
}

/// ggml's default RoPE for llama: adjacent dims (2i, 2i+1) rotate together.
fn rope_interleaved(v: &mut [f32], pos: usize, cfg: &ModelConfig) {
    let d = cfg.head_dim;
    for head in v.chunks_mut(d) {
        for i in 0..d / 2 {
            let freq = cfg.rope_theta.powf(-((2 * i) as f32) / d as f32);
            let (sin, cos) = (pos as f32 * freq).sin_cos();
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * cos - b * sin;
            head[2 * i + 1] = b * cos + a * sin;
        }
    }
}

/// Attention scores of every query head against its kv head, q at `pq`, k at `pk`.
fn scores(q: &[f32], k: &[f32], cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let group = cfg.num_heads / cfg.num_kv_heads;
    (0..cfg.num_heads)
        .map(|h| {
            let kv = h / group;
            q[h * d..(h + 1) * d]
                .iter()
                .zip(&k[kv * d..(kv + 1) * d])
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

#[test]
fn unpermuted_qk_with_half_split_rope_equals_llama_cpp_interleaved_rope() {
    // llama.cpp runs the file's Q/K as stored with interleaved RoPE; we run the
    // un-permuted weights with HF's half-split RoPE. Attention scores must agree.
    let m = default_model();
    let cfg = &m.config;
    let f = tandem_model::gguf::GgufFile::open(&m.path).unwrap();
    let h: Vec<f32> = (0..cfg.hidden_size)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    for layer in [0, 17, 29] {
        let raw = |name: &str| {
            let (shape, data) = f.tensor_f32(&format!("blk.{layer}.{name}")).unwrap();
            Tensor::new(shape, data)
        };
        let lw = &m.weights.layers[layer];
        for (pq, pk) in [(5, 2), (300, 41), (7000, 6999)] {
            let mut q_gguf = matvec(&raw("attn_q.weight"), &h);
            let mut k_gguf = matvec(&raw("attn_k.weight"), &h);
            rope_interleaved(&mut q_gguf, pq, cfg);
            rope_interleaved(&mut k_gguf, pk, cfg);
            let mut q_hf = matvec(&lw.wq, &h);
            let mut k_hf = matvec(&lw.wk, &h);
            rope(&mut q_hf, pq, cfg);
            rope(&mut k_hf, pk, cfg);
            let a = scores(&q_gguf, &k_gguf, cfg);
            let b = scores(&q_hf, &k_hf, cfg);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-3 * x.abs().max(1.0),
                    "layer {layer} positions {pq},{pk}: {a:?} vs {b:?}"
                );
            }
        }
    }
}
