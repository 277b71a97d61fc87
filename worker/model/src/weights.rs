//! Model weights in one canonical form: f32, row-major, Hugging Face layout.
//!
//! Every loader (GGUF, safetensors) produces this; every backend consumes it and
//! converts to the storage it computes with. Q and K projections use the
//! half-split RoPE convention of HF checkpoints (GGUF's interleaved-pair
//! permutation is undone by the GGUF loader).

/// A dense f32 tensor, row-major. A linear layer's weight is `[out_features, in_features]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor data does not match shape {shape:?}"
        );
        Self { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Row `i` of a 2-D tensor.
    pub fn row(&self, i: usize) -> &[f32] {
        let cols = self.shape[1];
        &self.data[i * cols..(i + 1) * cols]
    }
}

/// One transformer block.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// RMSNorm before attention, `[hidden]`.
    pub attn_norm: Tensor,
    /// `[num_heads * head_dim, hidden]`.
    pub wq: Tensor,
    /// `[num_kv_heads * head_dim, hidden]`.
    pub wk: Tensor,
    /// `[num_kv_heads * head_dim, hidden]`.
    pub wv: Tensor,
    /// Biases, present iff `ModelConfig::attention_bias`.
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    /// `[hidden, num_heads * head_dim]`.
    pub wo: Tensor,
    /// RMSNorm before the MLP, `[hidden]`.
    pub ffn_norm: Tensor,
    /// `[intermediate, hidden]`.
    pub w_gate: Tensor,
    /// `[intermediate, hidden]`.
    pub w_up: Tensor,
    /// `[hidden, intermediate]`.
    pub w_down: Tensor,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm, `[hidden]`.
    pub final_norm: Tensor,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
}

impl Weights {
    /// The output projection, tied or not.
    pub fn output(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// A copy with every weight matrix (embedding, projections, MLP, untied
    /// output head) replaced by `f` of it; norms and biases are kept as they are.
    /// For modelling how a backend stores matrices (quantization round trips).
    pub fn map_matrices(&self, mut f: impl FnMut(&Tensor) -> Tensor) -> Weights {
        let mut out = self.clone();
        out.embed_tokens = f(&self.embed_tokens);
        out.lm_head = self.lm_head.as_ref().map(&mut f);
        for (dst, src) in out.layers.iter_mut().zip(&self.layers) {
            dst.wq = f(&src.wq);
            dst.wk = f(&src.wk);
            dst.wv = f(&src.wv);
            dst.wo = f(&src.wo);
            dst.w_gate = f(&src.w_gate);
            dst.w_up = f(&src.w_up);
            dst.w_down = f(&src.w_down);
        }
        out
    }
}
