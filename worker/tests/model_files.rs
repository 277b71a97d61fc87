//! Loading tiny random models from GGUF files and HF directories: exact round
//! trips, the same weights through both formats, and refusals that name the problem.

use std::path::Path;

use tandem_model::gguf::{write_gguf, GgufFile, MetadataValue, TensorData};
use tandem_model::gguf_model::permute_qk;
use tandem_model::quant::GgmlType;
use tandem_model::testing::{
    random_weights, save_gguf, save_gguf_as, save_hf_dir, tiny_config, TokenizerSource,
};
use tandem_model::{self as model, Architecture, ModelConfig, Weights};

fn variants() -> Vec<(&'static str, ModelConfig)> {
    let llama = tiny_config(Architecture::Llama);
    let tied = ModelConfig {
        tie_word_embeddings: true,
        ..llama.clone()
    };
    let mha = ModelConfig {
        num_kv_heads: 4,
        ..llama.clone()
    };
    let qwen2 = tiny_config(Architecture::Qwen2);
    let qwen2_tied = ModelConfig {
        tie_word_embeddings: true,
        ..qwen2.clone()
    };
    vec![
        ("llama gqa", llama),
        ("llama tied", tied),
        ("llama mha", mha),
        ("qwen2 bias", qwen2),
        ("qwen2 tied", qwen2_tied),
    ]
}

#[test]
fn gguf_f32_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, cfg)) in variants().into_iter().enumerate() {
        let w = random_weights(&cfg, i as u64);
        let path = dir.path().join(format!("m{i}.gguf"));
        save_gguf(&path, &cfg, &w, TokenizerSource::Tiny).unwrap();
        let m = model::load(&path).unwrap();
        assert_eq!(m.config, cfg, "{what}");
        assert!(
            m.weights == w,
            "{what}: weights differ after GGUF round trip"
        );
        assert_eq!(m.info.format, "gguf");
        assert_eq!(m.info.quantization, "F32");
        assert_eq!(m.info.parameters, cfg.num_parameters(), "{what}");
        assert!(m.chat_template.is_some());
    }
}

#[test]
fn gguf_stores_q_and_k_permuted_like_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 7);
    let path = dir.path().join("m.gguf");
    save_gguf(&path, &cfg, &w, TokenizerSource::Tiny).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let (_, q) = f.tensor_f32("blk.0.attn_q.weight").unwrap();
    let (_, k) = f.tensor_f32("blk.1.attn_k.weight").unwrap();
    assert_eq!(q, permute_qk(&w.layers[0].wq.data, 4, 16, 64));
    assert_eq!(k, permute_qk(&w.layers[1].wk.data, 2, 16, 64));
    assert_ne!(q, w.layers[0].wq.data);
    // V is never permuted.
    assert_eq!(
        f.tensor_f32("blk.0.attn_v.weight").unwrap().1,
        w.layers[0].wv.data
    );
}

fn max_rel_err(a: &Weights, b: &Weights) -> f32 {
    let pairs = |w: &Weights| {
        let mut v = vec![w.embed_tokens.clone(), w.final_norm.clone()];
        for l in &w.layers {
            v.extend([
                l.attn_norm.clone(),
                l.wq.clone(),
                l.wk.clone(),
                l.wv.clone(),
                l.wo.clone(),
                l.ffn_norm.clone(),
                l.w_gate.clone(),
                l.w_up.clone(),
                l.w_down.clone(),
            ]);
        }
        v
    };
    let mut worst = 0f32;
    for (x, y) in pairs(a).iter().zip(pairs(b).iter()) {
        assert_eq!(x.shape, y.shape);
        for (p, q) in x.data.iter().zip(&y.data) {
            worst = worst.max((p - q).abs() / p.abs().max(1e-3));
        }
    }
    worst
}

#[test]
fn gguf_f16_round_trip_is_within_half_precision() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 3);
    let path = dir.path().join("f16.gguf");
    save_gguf_as(&path, &cfg, &w, TokenizerSource::Tiny, GgmlType::F16).unwrap();
    let m = model::load(&path).unwrap();
    assert_eq!(m.info.quantization, "F16");
    let err = max_rel_err(&w, &m.weights);
    // f16 has an 11-bit significand: relative rounding error ≤ 2^-11 (values
    // below 1e-3 are compared absolutely, where f16 subnormals are coarser).
    assert!(err <= 1.0 / 2048.0 + 1e-6, "max relative error {err}");
    assert!(err > 0.0, "f16 storage should round something");
}

#[test]
fn quantized_gguf_loads_within_each_types_step() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 5);
    // Values are within ±1/sqrt(64) = 0.125; a 4-bit step over that range is ~0.017.
    for (ty, label, tol) in [
        (GgmlType::Q8_0, "Q8_0", 0.125 / 127.0),
        (GgmlType::Q4_0, "Q4_0", 0.125 / 8.0 + 1e-3),
        (GgmlType::Q4_1, "Q4_1", 0.25 / 15.0),
        (GgmlType::BF16, "BF16", 0.125 / 256.0),
    ] {
        let path = dir.path().join(format!("{label}.gguf"));
        save_gguf_as(&path, &cfg, &w, TokenizerSource::Tiny, ty).unwrap();
        let m = model::load(&path).unwrap();
        assert_eq!(m.info.quantization, label);
        assert!(model::inspect(&path).unwrap().file_bytes > 0);
        let a = &w.layers[1].wq.data;
        let b = &m.weights.layers[1].wq.data;
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "{label}: max error {worst} > {tol}");
        // Norms stay exact (stored F32, as llama.cpp does).
        assert_eq!(m.weights.final_norm, w.final_norm);
    }
}

#[test]
fn safetensors_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mistral = tiny_config(Architecture::Mistral);
    for (i, (what, cfg)) in variants()
        .into_iter()
        .chain([("mistral", mistral)])
        .enumerate()
    {
        let w = random_weights(&cfg, 100 + i as u64);
        let path = dir.path().join(format!("hf{i}"));
        save_hf_dir(&path, &cfg, &w).unwrap();
        let m = model::load(&path).unwrap();
        assert_eq!(m.config, cfg, "{what}");
        assert!(
            m.weights == w,
            "{what}: weights differ after safetensors round trip"
        );
        assert_eq!(m.info.format, "safetensors");
        assert_eq!(m.info.quantization, "F32");
        assert_eq!(m.info.parameters, cfg.num_parameters(), "{what}");
        assert!(m.info.has_chat_template);
    }
}

#[test]
fn gguf_and_hf_of_the_same_model_load_identically() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, cfg)) in variants().into_iter().enumerate() {
        let w = random_weights(&cfg, 200 + i as u64);
        let gguf = dir.path().join(format!("m{i}.gguf"));
        let hf = dir.path().join(format!("hf{i}"));
        save_gguf(&gguf, &cfg, &w, TokenizerSource::Tiny).unwrap();
        save_hf_dir(&hf, &cfg, &w).unwrap();
        let a = model::load(&gguf).unwrap();
        let b = model::load(&hf).unwrap();
        assert_eq!(a.config, b.config, "{what}");
        assert!(a.weights == b.weights, "{what}: GGUF and HF weights differ");
        for text in [
            "the heat in the thin tin",
            "<|im_start|>user\nhé 🦀<|im_end|>",
        ] {
            assert_eq!(
                a.tokenizer.encode(text).unwrap(),
                b.tokenizer.encode(text).unwrap(),
                "{what}: {text}"
            );
        }
        assert_eq!(a.tokenizer.eos_token_ids(), b.tokenizer.eos_token_ids());
        assert_eq!(a.tokenizer.bos_token_id(), b.tokenizer.bos_token_id());
    }
}

#[test]
fn tiny_tokenizer_uses_merges_and_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let path = dir.path().join("m.gguf");
    save_gguf(&path, &cfg, &random_weights(&cfg, 1), TokenizerSource::Tiny).unwrap();
    let t = model::load(&path).unwrap().tokenizer;
    assert_eq!(t.eos_token_ids(), &[2]);
    // " the" is one token via the merges Ġ+t, h+e, Ġt+he.
    let ids = t.encode("a the").unwrap();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(t.id_to_token(ids[1]).as_deref(), Some("Ġthe"));
    let ids = t.encode("<|im_start|>x<|im_end|>").unwrap();
    assert_eq!(ids, vec![1, t.token_to_id("x").unwrap(), 2]);
    for text in ["héllo wörld", "日本語 🦀\n\t end"] {
        assert_eq!(t.decode(&t.encode(text).unwrap(), false), text);
    }
}

/// Rewrites a GGUF file, letting `edit` change metadata and tensors.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, MetadataValue)>, &mut Vec<TensorData>),
) {
    let f = GgufFile::open(src).unwrap();
    let mut meta: Vec<_> = f.metadata.clone().into_iter().collect();
    let mut tensors: Vec<TensorData> = f
        .tensors
        .iter()
        .map(|t| TensorData {
            name: t.name.clone(),
            shape: t.shape(),
            ggml_type: t.ggml_type,
            bytes: f.tensor_bytes(t).unwrap().to_vec(),
        })
        .collect();
    edit(&mut meta, &mut tensors);
    write_gguf(dst, &meta, &tensors).unwrap();
}

fn load_err(path: &Path) -> String {
    model::load(path).unwrap_err().to_string()
}

#[test]
fn bad_gguf_files_are_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let good = dir.path().join("good.gguf");
    save_gguf(&good, &cfg, &random_weights(&cfg, 9), TokenizerSource::Tiny).unwrap();
    let bad = dir.path().join("bad.gguf");

    std::fs::write(&bad, b"this is not a model").unwrap();
    let err = load_err(&bad);
    assert!(err.contains("not a GGUF file"), "{err}");

    rewrite(&good, &bad, |m, _| {
        m.retain(|(k, _)| k != "general.architecture");
        m.push((
            "general.architecture".into(),
            MetadataValue::String("gemma".into()),
        ));
    });
    let err = load_err(&bad);
    assert!(
        err.contains("\"gemma\"") && err.contains("not supported"),
        "{err}"
    );

    rewrite(&good, &bad, |_, t| {
        t.retain(|t| t.name != "blk.1.ffn_up.weight")
    });
    let err = load_err(&bad);
    assert!(
        err.contains("blk.1.ffn_up.weight") && err.contains("missing"),
        "{err}"
    );

    // A Q4_K tensor (ggml type 12): 256 elements in one 144-byte block.
    let mut k_cfg = cfg.clone();
    k_cfg.hidden_size = 256;
    k_cfg.num_heads = 16;
    k_cfg.num_kv_heads = 8;
    let k_good = dir.path().join("k.gguf");
    save_gguf(
        &k_good,
        &k_cfg,
        &random_weights(&k_cfg, 9),
        TokenizerSource::Tiny,
    )
    .unwrap();
    rewrite(&k_good, &bad, |_, tensors| {
        let t = tensors
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_v.weight")
            .unwrap();
        t.ggml_type = GgmlType(12);
        t.bytes = vec![0; t.shape[0] * 144];
    });
    let err = load_err(&bad);
    assert!(
        err.contains("blk.0.attn_v.weight")
            && err.contains("Q4_K")
            && err.contains("not supported"),
        "{err}"
    );

    rewrite(&good, &bad, |m, _| {
        for (k, v) in m.iter_mut() {
            if k == "tokenizer.ggml.model" {
                *v = MetadataValue::String("rwkv".into());
            }
        }
    });
    let err = load_err(&bad);
    assert!(
        err.contains("\"rwkv\"") && err.contains("not supported"),
        "{err}"
    );

    // A SentencePiece vocabulary without its scores.
    rewrite(&good, &bad, |m, _| {
        for (k, v) in m.iter_mut() {
            if k == "tokenizer.ggml.model" {
                *v = MetadataValue::String("llama".into());
            }
        }
    });
    let err = load_err(&bad);
    assert!(err.contains("tokenizer.ggml.scores"), "{err}");

    rewrite(&good, &bad, |m, _| {
        m.retain(|(k, _)| k != "llama.block_count")
    });
    let err = load_err(&bad);
    assert!(err.contains("llama.block_count"), "{err}");

    rewrite(&good, &bad, |m, _| {
        m.push((
            "llama.rope.scaling.type".into(),
            MetadataValue::String("yarn".into()),
        ))
    });
    let err = load_err(&bad);
    assert!(err.contains("yarn"), "{err}");
}

#[test]
fn bad_hf_directories_are_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let hf = dir.path().join("hf");
    save_hf_dir(&hf, &cfg, &random_weights(&cfg, 4)).unwrap();
    let config_path = hf.join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();

    std::fs::write(&config_path, original.replace("\"llama\"", "\"gpt_neox\"")).unwrap();
    let err = load_err(&hf);
    assert!(
        err.contains("gpt_neox") && err.contains("not supported"),
        "{err}"
    );

    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
    std::fs::write(&config_path, v.to_string()).unwrap();
    let err = load_err(&hf);
    assert!(err.contains("yarn"), "{err}");

    // llama3 RoPE scaling is understood.
    v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192});
    std::fs::write(&config_path, v.to_string()).unwrap();
    let m = model::load(&hf).unwrap();
    assert_eq!(m.config.rope_scaling.unwrap().factor, 8.0);

    // A sliding window shorter than the context caps the context (the engine
    // attends to everything, which equals windowed attention only that far).
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["sliding_window"] = serde_json::json!(100);
    std::fs::write(&config_path, v.to_string()).unwrap();
    assert_eq!(model::inspect(&hf).unwrap().context_length, 100);
    v["use_sliding_window"] = serde_json::json!(false);
    std::fs::write(&config_path, v.to_string()).unwrap();
    assert_eq!(model::inspect(&hf).unwrap().context_length, 256);

    std::fs::write(&config_path, &original).unwrap();
    // Drop one tensor and make another an unsupported dtype.
    let st_path = hf.join("model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .collect();
    let missing = dir.path().join("missing.safetensors");
    safetensors::serialize_to_file(kept.clone(), None, &missing).unwrap();
    std::fs::copy(&missing, &st_path).unwrap();
    let err = load_err(&hf);
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );

    let as_int: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let dtype = if n == "model.norm.weight" {
                safetensors::Dtype::I32
            } else {
                t.dtype()
            };
            (
                n,
                safetensors::tensor::TensorView::new(dtype, t.shape().to_vec(), t.data()).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(as_int, None, &st_path).unwrap();
    let err = load_err(&hf);
    assert!(
        err.contains("model.norm.weight") && err.contains("I32"),
        "{err}"
    );

    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let err = load_err(&hf);
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn half_precision_safetensors_load() {
    // BF16 and F16 checkpoints (the usual HF dtypes) decode to f32.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Qwen2);
    let w = random_weights(&cfg, 11);
    let hf = dir.path().join("hf");
    save_hf_dir(&hf, &cfg, &w).unwrap();
    let st_path = hf.join("model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (dtype, tol) in [
        (safetensors::Dtype::BF16, 1.0 / 256.0),
        (safetensors::Dtype::F16, 1.0 / 2048.0),
    ] {
        let converted: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| {
                let f: &[f32] = bytemuck::cast_slice(t.data());
                let out: Vec<u8> = match dtype {
                    safetensors::Dtype::BF16 => f
                        .iter()
                        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                        .collect(),
                    _ => f
                        .iter()
                        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                        .collect(),
                };
                (n, t.shape().to_vec(), out)
            })
            .collect();
        let views: Vec<_> = converted
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &st_path).unwrap();
        let m = model::load(&hf).unwrap();
        assert_eq!(m.info.quantization, format!("{dtype:?}"));
        let a = &w.layers[0].bq.as_ref().unwrap().data;
        let b = &m.weights.layers[0].bq.as_ref().unwrap().data;
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= x.abs() * tol + 1e-6,
                "{dtype:?}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn sharded_safetensors_with_an_index_load_like_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let w = random_weights(&cfg, 21);
    let hf = dir.path().join("hf");
    save_hf_dir(&hf, &cfg, &w).unwrap();
    let single = hf.join("model.safetensors");
    let bytes = std::fs::read(&single).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (first, second): (Vec<_>, Vec<_>) = st
        .tensors()
        .into_iter()
        .partition(|(n, _)| n.contains("layers.0.") || n.contains("embed"));
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", &first),
        ("model-00002-of-00002.safetensors", &second),
    ] {
        safetensors::serialize_to_file(part.clone(), None, &hf.join(file)).unwrap();
        for (n, _) in part {
            weight_map.insert(n.clone(), file.into());
        }
    }
    std::fs::remove_file(&single).unwrap();
    std::fs::write(
        hf.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let m = model::load(&hf).unwrap();
    assert!(m.weights == w);
    assert_eq!(m.info.parameters, cfg.num_parameters());
}

#[test]
fn hf_special_tokens_come_from_tokenizer_and_generation_configs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama);
    let hf = dir.path().join("hf");
    save_hf_dir(&hf, &cfg, &random_weights(&cfg, 22)).unwrap();

    // Llama 3 style: no add_bos_token flag, BOS added by the post-processor,
    // several end-of-turn ids in generation_config.json, template in a file.
    let tok_json = hf.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_json).unwrap()).unwrap();
    tok["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}
    });
    std::fs::write(&tok_json, tok.to_string()).unwrap();
    std::fs::write(
        hf.join("tokenizer_config.json"),
        serde_json::json!({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
            .to_string(),
    )
    .unwrap();
    std::fs::write(
        hf.join("generation_config.json"),
        r#"{"eos_token_id": [2, 0]}"#,
    )
    .unwrap();
    std::fs::write(
        hf.join("chat_template.jinja"),
        "{{ messages[0]['content'] }}!",
    )
    .unwrap();

    let m = model::load(&hf).unwrap();
    let t = &m.tokenizer;
    assert_eq!(t.bos_token_id(), Some(1));
    assert_eq!(t.eos_token_ids(), &[2, 0]);
    assert!(t.add_bos_token());
    // BOS is added exactly once, by us, not by the post-processor as well.
    let ids = t.encode("x").unwrap();
    assert_eq!(ids, vec![1, t.token_to_id("x").unwrap()]);
    let rendered = m
        .chat_template
        .unwrap()
        .render(&[model::ChatMessage::new("user", "hey")], false)
        .unwrap();
    assert_eq!(rendered, "hey!");
}

#[test]
fn llama3_rope_scaling_survives_gguf_and_hf() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        rope_scaling: Some(tandem_model::config::Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }),
        ..tiny_config(Architecture::Llama)
    };
    let w = random_weights(&cfg, 31);
    let gguf = dir.path().join("m.gguf");
    let hf = dir.path().join("hf");
    save_gguf(&gguf, &cfg, &w, TokenizerSource::Tiny).unwrap();
    save_hf_dir(&hf, &cfg, &w).unwrap();
    let from_hf = model::load(&hf).unwrap();
    assert_eq!(from_hf.config, cfg);
    // GGUF keeps only the per-frequency factors; the parameters recovered
    // from them are the same up to f32 rounding.
    let from_gguf = model::load(&gguf).unwrap();
    let got = from_gguf.config.rope_scaling.unwrap();
    let want = cfg.rope_scaling.unwrap();
    assert_eq!(got.factor, want.factor);
    assert_eq!(got.low_freq_factor, want.low_freq_factor);
    assert_eq!(got.original_max_position_embeddings, 64);
    assert!(
        (got.high_freq_factor - want.high_freq_factor).abs() < 1e-3,
        "{got:?}"
    );
    assert!(from_gguf.weights == w);
    assert_eq!(from_gguf.info.parameters, cfg.num_parameters());
}
