//! Named model shapes for `--load-format dummy`: the config of a well-known
//! model, so a backend can generate random weights of that shape (on the GPU,
//! without downloading anything) for benchmarks.

use super::config::Llama3RopeScaling;
use super::{Architecture, ModelConfig};

#[derive(Debug, thiserror::Error)]
pub enum DummyError {
    #[error("unknown dummy model shape {name:?}; known shapes: {known}")]
    UnknownShape { name: String, known: String },
}

/// Every shape name [`config`] knows.
pub const SHAPES: &[&str] = &["smollm2-135m", "llama3-8b", "llama3-70b", "qwen2-7b"];

fn llama3_rope() -> Option<Llama3RopeScaling> {
    Some(Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    })
}

/// The config of the named shape (`smollm2-135m`, `llama3-8b`, `llama3-70b`,
/// `qwen2-7b`), as in the models' published config.json.
pub fn config(name: &str) -> Result<ModelConfig, DummyError> {
    let base = |vocab, hidden, inter, layers, heads, kv_heads| ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        rope_theta: 500_000.0,
        rope_scaling: llama3_rope(),
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        attention_bias: false,
    };
    Ok(match name {
        "smollm2-135m" => ModelConfig {
            rope_theta: 100_000.0,
            rope_scaling: None,
            tie_word_embeddings: true,
            ..base(49152, 576, 1536, 30, 9, 3)
        },
        "llama3-8b" => base(128_256, 4096, 14336, 32, 32, 8),
        "llama3-70b" => base(128_256, 8192, 28672, 80, 64, 8),
        "qwen2-7b" => ModelConfig {
            architecture: Architecture::Qwen2,
            rope_theta: 1_000_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 32768,
            attention_bias: true,
            ..base(152_064, 3584, 18944, 28, 28, 4)
        },
        _ => {
            return Err(DummyError::UnknownShape {
                name: name.to_string(),
                known: SHAPES.join(", "),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_published_parameter_counts() {
        // Published sizes: 134.5M, 8.03B, 70.6B, 7.62B parameters.
        let billions = |n: &str| config(n).unwrap().num_parameters() as f64 / 1e9;
        assert!((billions("smollm2-135m") - 0.1345).abs() < 0.001);
        assert!((billions("llama3-8b") - 8.03).abs() < 0.01);
        assert!((billions("llama3-70b") - 70.55).abs() < 0.1);
        assert!((billions("qwen2-7b") - 7.62).abs() < 0.01);
    }

    #[test]
    fn unknown_shapes_name_the_known_ones() {
        let err = config("llama3-9b").unwrap_err().to_string();
        assert!(
            err.contains("llama3-9b") && err.contains("llama3-8b"),
            "{err}"
        );
    }
}
