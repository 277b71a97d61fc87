//! The paged, batched CPU backend against the naive reference forward, on
//! random tiny models of every supported variant.

mod engine_support;

use engine_support::*;
use tandem_engine::backend::cpu::dequantized_weights;
use tandem_engine::backend::{ComputeBackend, CpuBackend, KvLayerSink, SeqInput, WeightStorage};

const VARIANTS: [(&str, Variant); 5] = [
    ("gqa tied", GQA),
    (
        "mha untied",
        Variant {
            num_heads: 4,
            num_kv_heads: 4,
            attention_bias: false,
            tied: false,
            llama3_rope: false,
        },
    ),
    (
        "qkv bias (qwen2)",
        Variant {
            num_heads: 4,
            num_kv_heads: 2,
            attention_bias: true,
            tied: false,
            llama3_rope: false,
        },
    ),
    (
        "llama3 rope scaling",
        Variant {
            num_heads: 4,
            num_kv_heads: 1,
            attention_bias: false,
            tied: true,
            llama3_rope: true,
        },
    ),
    (
        "everything",
        Variant {
            num_heads: 4,
            num_kv_heads: 2,
            attention_bias: true,
            tied: true,
            llama3_rope: true,
        },
    ),
];

fn tokens(seed: u32, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % vocab as u32)
        .collect()
}

/// Three sequences of different lengths, run in chunks of different sizes in
/// the same steps, over scattered (non-contiguous, interleaved) blocks.
fn check_variant(name: &str, v: Variant, storage: WeightStorage) {
    let cfg = tiny_config(v);
    let mut weights = random_weights(&cfg, 7);
    if storage == WeightStorage::Compact {
        weights = q4_rounded(&weights);
    }
    let reference_weights = dequantized_weights(&weights, storage);
    let mut backend = CpuBackend::new(cfg.clone(), &weights, storage).unwrap();
    if storage == WeightStorage::Compact {
        // Every matrix: 4 per layer, the embedding, and lm_head when untied.
        let matrices = 4 * cfg.num_layers + 1 + usize::from(!cfg.tie_word_embeddings);
        assert_eq!(
            backend.storage_summary(),
            format!("q4 x {matrices}"),
            "{name}"
        );
        assert!(
            relative_error(
                &reference_weights.layers[0].w_down.data,
                &weights.layers[0].w_down.data
            ) < 1e-6,
            "Q4 packing of Q4-grid weights is lossless"
        );
    }
    let block_size = 4;
    backend.init_kv_cache(block_size, 64).unwrap();

    let seqs: Vec<Vec<u32>> = vec![
        tokens(1, 23, cfg.vocab_size),
        tokens(2, 5, cfg.vocab_size),
        tokens(3, 40, cfg.vocab_size),
    ];
    let chunk_sizes = [7usize, 1, 16];
    // Interleaved block ids so paging bugs cannot hide behind contiguity.
    let tables: Vec<Vec<u32>> = (0..3u32)
        .map(|s| (0..12u32).map(|b| 63 - (b * 3 + s)).collect())
        .collect();
    let want: Vec<Vec<Vec<f32>>> = seqs
        .iter()
        .map(|t| reference_logits(&cfg, &reference_weights, t))
        .collect();

    let mut done = [0usize; 3];
    let mut logits = Vec::new();
    while done.iter().zip(&seqs).any(|(d, s)| d < &s.len()) {
        let mut batch = Vec::new();
        let mut ends = Vec::new();
        for s in 0..3 {
            if done[s] == seqs[s].len() {
                continue;
            }
            let end = (done[s] + chunk_sizes[s]).min(seqs[s].len());
            batch.push(SeqInput {
                tokens: &seqs[s][done[s]..end],
                start_pos: done[s],
                block_table: &tables[s],
                need_logits: true,
            });
            ends.push((s, end));
        }
        backend.forward(&batch, &mut logits, None).unwrap();
        for (row, &(s, end)) in ends.iter().enumerate() {
            let got = &logits[row * cfg.vocab_size..(row + 1) * cfg.vocab_size];
            let err = relative_error(got, &want[s][end - 1]);
            assert!(
                err < 1e-4,
                "{name} ({storage:?}): seq {s} position {}: relative error {err}",
                end - 1
            );
            done[s] = end;
        }
    }
}

#[test]
fn paged_batched_logits_match_reference_for_every_variant_f32() {
    for (name, v) in VARIANTS {
        check_variant(name, v, WeightStorage::F32);
    }
}

#[test]
fn q8_storage_matches_reference_over_the_same_dequantized_weights() {
    for (name, v) in VARIANTS {
        check_variant(name, v, WeightStorage::Q8);
    }
}

#[test]
fn q4_storage_of_gguf_q4_like_weights_matches_reference() {
    for (name, v) in VARIANTS {
        check_variant(name, v, WeightStorage::Compact);
    }
}

#[test]
fn q8_storage_stays_close_to_exact_weights() {
    // Q8 is lossy: logits move, but only slightly (this bounds the loss a user
    // sees from the default storage).
    let cfg = tiny_config(GQA);
    let weights = random_weights(&cfg, 3);
    let mut backend = CpuBackend::new(cfg.clone(), &weights, WeightStorage::Q8).unwrap();
    backend.init_kv_cache(16, 4).unwrap();
    let prompt = tokens(9, 20, cfg.vocab_size);
    let mut logits = Vec::new();
    backend
        .forward(
            &[SeqInput {
                tokens: &prompt,
                start_pos: 0,
                block_table: &[0, 1],
                need_logits: true,
            }],
            &mut logits,
            None,
        )
        .unwrap();
    let exact = reference_logits(&cfg, &weights, &prompt);
    let err = relative_error(&logits, exact.last().unwrap());
    assert!(err < 0.03, "Q8 moved logits by {err} relative");
}

struct Collect(Vec<(usize, usize, Vec<f32>, Vec<f32>)>);
impl KvLayerSink for Collect {
    fn layer_computed(&mut self, layer: usize, seq: usize, k: &[f32], v: &[f32]) {
        self.0.push((layer, seq, k.to_vec(), v.to_vec()));
    }
}

#[test]
fn kv_read_write_round_trip_and_layer_sink_agree() {
    let cfg = tiny_config(GQA);
    let weights = random_weights(&cfg, 5);
    let mut a = CpuBackend::new(cfg.clone(), &weights, WeightStorage::F32).unwrap();
    a.init_kv_cache(4, 16).unwrap();
    let prompt = tokens(4, 10, cfg.vocab_size);
    let table_a = [5u32, 2, 9];
    let mut sink = Collect(Vec::new());
    let mut logits = Vec::new();
    a.forward(
        &[SeqInput {
            tokens: &prompt,
            start_pos: 0,
            block_table: &table_a,
            need_logits: true,
        }],
        &mut logits,
        Some(&mut sink),
    )
    .unwrap();
    let export = a.read_kv(&table_a, prompt.len()).unwrap();
    assert_eq!(export.num_tokens, 10);
    assert_eq!(sink.0.len(), cfg.num_layers);
    for (layer, seq, k, v) in &sink.0 {
        assert_eq!(*seq, 0);
        assert_eq!(k, &export.layers[*layer].0, "layer {layer} K from the sink");
        assert_eq!(v, &export.layers[*layer].1, "layer {layer} V from the sink");
    }

    // Import into a pool with another block size and continue: same logits as
    // continuing in place.
    let mut b = CpuBackend::new(cfg.clone(), &weights, WeightStorage::F32).unwrap();
    b.init_kv_cache(8, 4).unwrap();
    let table_b = [3u32, 1];
    b.write_kv(&table_b, &export).unwrap();
    let next = [17u32];
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    a.forward(
        &[SeqInput {
            tokens: &next,
            start_pos: 10,
            block_table: &table_a,
            need_logits: true,
        }],
        &mut la,
        None,
    )
    .unwrap();
    b.forward(
        &[SeqInput {
            tokens: &next,
            start_pos: 10,
            block_table: &table_b,
            need_logits: true,
        }],
        &mut lb,
        None,
    )
    .unwrap();
    assert_eq!(la, lb);

    // copy_block duplicates every layer's K and V of a block.
    b.copy_block(3, 2).unwrap();
    let copied = b.read_kv(&[2], 8).unwrap();
    let original = b.read_kv(&[3], 8).unwrap();
    assert_eq!(copied, original);
    assert!(
        b.copy_block(3, 4).is_err(),
        "block 4 is outside a 4-block pool"
    );
}

#[test]
fn bad_inputs_are_refused_with_named_errors() {
    let cfg = tiny_config(GQA);
    let weights = random_weights(&cfg, 5);
    let mut backend = CpuBackend::new(cfg.clone(), &weights, WeightStorage::F32).unwrap();
    let mut logits = Vec::new();
    let input = |tokens: &'static [u32], table: &'static [u32]| SeqInput {
        tokens,
        start_pos: 0,
        block_table: table,
        need_logits: true,
    };
    let err = backend
        .forward(&[input(&[1], &[0])], &mut logits, None)
        .unwrap_err();
    assert!(err.to_string().contains("not initialised"), "{err}");
    backend.init_kv_cache(4, 2).unwrap();
    let err = backend
        .forward(&[input(&[500], &[0])], &mut logits, None)
        .unwrap_err();
    assert!(err.to_string().contains("token id 500"), "{err}");
    let err = backend
        .forward(&[input(&[1, 2, 3, 4, 5], &[0])], &mut logits, None)
        .unwrap_err();
    assert!(err.to_string().contains("cannot hold 5 tokens"), "{err}");
    let err = backend
        .forward(&[input(&[1], &[7])], &mut logits, None)
        .unwrap_err();
    assert!(err.to_string().contains("block id 7"), "{err}");

    let mut bad = weights.clone();
    bad.layers[1].wk = tandem_model::Tensor::zeros(vec![3, 3]);
    let err = CpuBackend::new(cfg, &bad, WeightStorage::F32)
        .err()
        .unwrap();
    assert!(err.to_string().contains("layer 1 wk"), "{err}");
}
