//! Which tensors a model of a [`ModelConfig`] is made of, their shapes, and
//! how they become [`Weights`]: the part every format shares. A format only
//! names each tensor and decodes one ([`TensorSource`]); [`assemble`] checks
//! that every tensor is there before decoding any, loads the blocks in
//! parallel, leaves out the biases a model without them lacks, and ties the
//! output head to the embedding when the config says so.

use rayon::prelude::*;

use super::{LayerWeights, ModelConfig, ModelError, Tensor, Weights};

/// A tensor of one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerPart {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl LayerPart {
    /// Every part, in the order llama.cpp writes a block.
    pub const ALL: [LayerPart; 12] = [
        LayerPart::AttnNorm,
        LayerPart::Q,
        LayerPart::K,
        LayerPart::V,
        LayerPart::QBias,
        LayerPart::KBias,
        LayerPart::VBias,
        LayerPart::O,
        LayerPart::FfnNorm,
        LayerPart::Gate,
        LayerPart::Up,
        LayerPart::Down,
    ];

    /// Whether a model has this part: the biases only with `attention_bias`.
    pub fn present(self, cfg: &ModelConfig) -> bool {
        match self {
            LayerPart::QBias | LayerPart::KBias | LayerPart::VBias => cfg.attention_bias,
            _ => true,
        }
    }

    /// The heads whose rows RoPE rotates, for the Q and K projections and
    /// their biases (a format that reorders those rows per head needs it);
    /// `None` for every other part.
    pub fn rope_heads(self, cfg: &ModelConfig) -> Option<usize> {
        match self {
            LayerPart::Q | LayerPart::QBias => Some(cfg.num_heads),
            LayerPart::K | LayerPart::KBias => Some(cfg.num_kv_heads),
            _ => None,
        }
    }
}

/// One tensor of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightId {
    /// `[vocab, hidden]`.
    Embed,
    Layer(usize, LayerPart),
    /// `[hidden]`.
    FinalNorm,
    /// `[vocab, hidden]`, absent when tied to the embedding.
    Output,
}

impl WeightId {
    /// The shape `cfg` implies (HF layout: a linear layer is `[out, in]`).
    pub fn shape(self, cfg: &ModelConfig) -> Vec<usize> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_heads * cfg.head_dim;
        let kv_out = cfg.num_kv_heads * cfg.head_dim;
        let ff = cfg.intermediate_size;
        match self {
            WeightId::Embed | WeightId::Output => vec![cfg.vocab_size, h],
            WeightId::FinalNorm => vec![h],
            WeightId::Layer(_, part) => match part {
                LayerPart::AttnNorm | LayerPart::FfnNorm => vec![h],
                LayerPart::Q => vec![q_out, h],
                LayerPart::K | LayerPart::V => vec![kv_out, h],
                LayerPart::QBias => vec![q_out],
                LayerPart::KBias | LayerPart::VBias => vec![kv_out],
                LayerPart::O => vec![h, q_out],
                LayerPart::Gate | LayerPart::Up => vec![ff, h],
                LayerPart::Down => vec![h, ff],
            },
        }
    }
}

/// Every tensor a model of `cfg` has, in the order llama.cpp writes them.
pub fn weight_ids(cfg: &ModelConfig) -> Vec<WeightId> {
    let mut ids = vec![WeightId::Embed];
    for i in 0..cfg.num_layers {
        ids.extend(
            LayerPart::ALL
                .into_iter()
                .filter(|p| p.present(cfg))
                .map(|p| WeightId::Layer(i, p)),
        );
    }
    ids.push(WeightId::FinalNorm);
    if !cfg.tie_word_embeddings {
        ids.push(WeightId::Output);
    }
    ids
}

/// What a format calls each tensor.
#[derive(Debug)]
pub struct Names {
    pub embed: &'static str,
    pub final_norm: &'static str,
    pub output: &'static str,
    /// Block `i`'s tensors are called `{layer_prefix}{i}.{suffix}`.
    pub layer_prefix: &'static str,
    /// The suffixes, in [`LayerPart::ALL`] order.
    pub layer: [&'static str; LayerPart::ALL.len()],
}

impl Names {
    pub fn name(&self, id: WeightId) -> String {
        match id {
            WeightId::Embed => self.embed.to_string(),
            WeightId::FinalNorm => self.final_norm.to_string(),
            WeightId::Output => self.output.to_string(),
            WeightId::Layer(i, part) => {
                let suffix = self.layer[LayerPart::ALL
                    .iter()
                    .position(|&p| p == part)
                    .expect("every part is in ALL")];
                format!("{}{i}.{suffix}", self.layer_prefix)
            }
        }
    }

    /// The names of every tensor a model of `cfg` has, in [`weight_ids`] order.
    pub fn all(&self, cfg: &ModelConfig) -> Vec<String> {
        weight_ids(cfg)
            .into_iter()
            .map(|id| self.name(id))
            .collect()
    }
}

/// Where a loader's tensors come from: one file format.
pub trait TensorSource: Sync {
    /// What the format calls each tensor.
    const NAMES: &'static Names;

    /// Refuses a tensor that cannot be loaded (missing, a type the format
    /// reader does not decode), without decoding it.
    fn check(&self, name: &str) -> Result<(), ModelError>;

    /// Decodes one tensor, checking it has `shape`, to f32 in HF layout.
    fn load(&self, id: WeightId, name: &str, shape: &[usize]) -> Result<Tensor, ModelError>;
}

/// Every tensor of a model of `cfg` from `source`, as [`Weights`]. Every
/// tensor is checked before any is decoded, so a missing or unsupported one
/// is named up front; blocks load in parallel. `on_tensor` is called once per
/// tensor loaded (for progress).
pub fn assemble<S: TensorSource>(
    cfg: &ModelConfig,
    source: &S,
    on_tensor: &(dyn Fn() + Sync),
) -> Result<Weights, ModelError> {
    for name in S::NAMES.all(cfg) {
        source.check(&name)?;
    }
    let load = |id: WeightId| {
        let t = source.load(id, &S::NAMES.name(id), &id.shape(cfg));
        on_tensor();
        t
    };
    let layers = (0..cfg.num_layers)
        .into_par_iter()
        .map(|i| {
            let part = |p: LayerPart| load(WeightId::Layer(i, p));
            let bias = |p: LayerPart| p.present(cfg).then(|| part(p)).transpose();
            Ok(LayerWeights {
                attn_norm: part(LayerPart::AttnNorm)?,
                wq: part(LayerPart::Q)?,
                wk: part(LayerPart::K)?,
                wv: part(LayerPart::V)?,
                bq: bias(LayerPart::QBias)?,
                bk: bias(LayerPart::KBias)?,
                bv: bias(LayerPart::VBias)?,
                wo: part(LayerPart::O)?,
                ffn_norm: part(LayerPart::FfnNorm)?,
                w_gate: part(LayerPart::Gate)?,
                w_up: part(LayerPart::Up)?,
                w_down: part(LayerPart::Down)?,
            })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    Ok(Weights {
        embed_tokens: load(WeightId::Embed)?,
        layers,
        final_norm: load(WeightId::FinalNorm)?,
        lm_head: if cfg.tie_word_embeddings {
            None
        } else {
            Some(load(WeightId::Output)?)
        },
    })
}

impl LayerWeights {
    /// One tensor of the block; `None` for a bias the block does not have.
    pub fn part(&self, part: LayerPart) -> Option<&Tensor> {
        match part {
            LayerPart::AttnNorm => Some(&self.attn_norm),
            LayerPart::Q => Some(&self.wq),
            LayerPart::K => Some(&self.wk),
            LayerPart::V => Some(&self.wv),
            LayerPart::QBias => self.bq.as_ref(),
            LayerPart::KBias => self.bk.as_ref(),
            LayerPart::VBias => self.bv.as_ref(),
            LayerPart::O => Some(&self.wo),
            LayerPart::FfnNorm => Some(&self.ffn_norm),
            LayerPart::Gate => Some(&self.w_gate),
            LayerPart::Up => Some(&self.w_up),
            LayerPart::Down => Some(&self.w_down),
        }
    }
}

impl Weights {
    /// Every tensor these weights hold, in the order of [`weight_ids`] (for
    /// writing them in a format).
    pub fn tensors(&self) -> Vec<(WeightId, &Tensor)> {
        let mut out = vec![(WeightId::Embed, &self.embed_tokens)];
        for (i, layer) in self.layers.iter().enumerate() {
            out.extend(
                LayerPart::ALL
                    .into_iter()
                    .filter_map(|p| layer.part(p).map(|t| (WeightId::Layer(i, p), t))),
            );
        }
        out.push((WeightId::FinalNorm, &self.final_norm));
        if let Some(head) = &self.lm_head {
            out.push((WeightId::Output, head));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_weights, tiny_config};
    use crate::Architecture;

    #[test]
    fn weights_hold_exactly_the_tensors_the_config_names_in_their_shapes() {
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            for tied in [false, true] {
                let cfg = ModelConfig {
                    tie_word_embeddings: tied,
                    ..tiny_config(arch)
                };
                let w = random_weights(&cfg, 1);
                let held: Vec<WeightId> = w.tensors().iter().map(|(id, _)| *id).collect();
                assert_eq!(held, weight_ids(&cfg), "{arch:?} tied={tied}");
                for (id, t) in w.tensors() {
                    assert_eq!(t.shape, id.shape(&cfg), "{id:?}");
                }
                let params: usize = w.tensors().iter().map(|(_, t)| t.numel()).sum();
                assert_eq!(params, cfg.num_parameters());
            }
        }
    }
}
