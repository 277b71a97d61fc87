//! Model weights on the device: matrices bf16 (Q, K, V fused into one matrix,
//! gate and up into another, so each layer runs four GEMMs), norms and biases
//! f32 (they are tiny and f32 keeps the CPU backend's numerics there).

use half::bf16;

use super::device::{alloc_array, DeviceBuffer, Gpu};
use super::CudaError;
use tandem_model::{ModelConfig, Weights};

pub(super) struct DeviceLayer {
    pub attn_norm: DeviceBuffer<f32>,
    /// `[q_dim + 2 * kv_dim, hidden]`.
    pub wqkv: DeviceBuffer<bf16>,
    /// `[q_dim + 2 * kv_dim]`.
    pub bqkv: Option<DeviceBuffer<f32>>,
    /// `[hidden, q_dim]`.
    pub wo: DeviceBuffer<bf16>,
    pub ffn_norm: DeviceBuffer<f32>,
    /// `[2 * intermediate, hidden]`: gate rows, then up rows.
    pub w_gate_up: DeviceBuffer<bf16>,
    /// `[hidden, intermediate]`.
    pub w_down: DeviceBuffer<bf16>,
}

pub(super) struct DeviceWeights {
    pub embed: DeviceBuffer<bf16>,
    pub lm_head: Option<DeviceBuffer<bf16>>,
    pub final_norm: DeviceBuffer<f32>,
    pub layers: Vec<DeviceLayer>,
}

/// f32 values rounded to bf16 (round to nearest even), concatenated, as the
/// bit patterns the device reads.
fn to_bf16_bits(parts: &[&[f32]]) -> Vec<u16> {
    parts
        .iter()
        .flat_map(|p| p.iter().map(|&v| bf16::from_f32(v).to_bits()))
        .collect()
}

impl DeviceWeights {
    /// Converts host weights (validated) to bf16 and copies them to the device.
    pub fn upload(gpu: &Gpu, cfg: &ModelConfig, w: &Weights) -> Result<Self, CudaError> {
        let matrix = |parts: &[&[f32]]| -> Result<DeviceBuffer<bf16>, CudaError> {
            Ok(gpu.upload(&to_bf16_bits(parts))?.cast())
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in &w.layers {
            let bqkv = match (&l.bq, &l.bk, &l.bv) {
                (Some(q), Some(k), Some(v)) => {
                    Some(gpu.upload(&[&q.data[..], &k.data, &v.data].concat())?)
                }
                _ => None,
            };
            layers.push(DeviceLayer {
                attn_norm: gpu.upload(&l.attn_norm.data)?,
                wqkv: matrix(&[&l.wq.data, &l.wk.data, &l.wv.data])?,
                bqkv,
                wo: matrix(&[&l.wo.data])?,
                ffn_norm: gpu.upload(&l.ffn_norm.data)?,
                w_gate_up: matrix(&[&l.w_gate.data, &l.w_up.data])?,
                w_down: matrix(&[&l.w_down.data])?,
            });
        }
        Ok(Self {
            embed: matrix(&[&w.embed_tokens.data])?,
            lm_head: w.lm_head.as_ref().map(|t| matrix(&[&t.data])).transpose()?,
            final_norm: gpu.upload(&w.final_norm.data)?,
            layers,
        })
    }

    /// Random weights of `cfg`'s shape, generated on the device: matrices
    /// uniform with variance 1 / fan_in (so activations keep their scale
    /// through the layers), the embedding uniform in [-1, 1], norms 1, biases
    /// small.
    pub fn random(gpu: &Gpu, cfg: &ModelConfig, seed: u64) -> Result<Self, CudaError> {
        let h = cfg.hidden_size;
        let q_dim = cfg.num_heads * cfg.head_dim;
        let kv_dim = cfg.num_kv_heads * cfg.head_dim;
        let f = cfg.intermediate_size;
        let mut stream_id = 0u64;
        let mut matrix =
            |rows: usize, cols: usize, scale: f32| -> Result<DeviceBuffer<bf16>, CudaError> {
                let buf = alloc_array(rows * cols)?;
                stream_id += 1;
                let sub_seed = seed ^ stream_id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                gpu.fill_uniform(buf.dev(), rows * cols, sub_seed, scale)?;
                Ok(buf)
            };
        let linear = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let ones = |n: usize| -> Result<DeviceBuffer<f32>, CudaError> {
            let buf = alloc_array(n)?;
            gpu.fill_f32(buf.dev(), n, 1.0)?;
            Ok(buf)
        };
        for _ in 0..cfg.num_layers {
            let bqkv = if cfg.attention_bias {
                let buf = alloc_array(q_dim + 2 * kv_dim)?;
                gpu.fill_f32(buf.dev(), q_dim + 2 * kv_dim, 0.01)?;
                Some(buf)
            } else {
                None
            };
            layers.push(DeviceLayer {
                attn_norm: ones(h)?,
                wqkv: matrix(q_dim + 2 * kv_dim, h, linear(h))?,
                bqkv,
                wo: matrix(h, q_dim, linear(q_dim))?,
                ffn_norm: ones(h)?,
                w_gate_up: matrix(2 * f, h, linear(h))?,
                w_down: matrix(h, f, linear(f))?,
            });
        }
        let embed = matrix(cfg.vocab_size, h, 1.0)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(matrix(cfg.vocab_size, h, linear(h))?)
        };
        let final_norm = ones(h)?;
        gpu.synchronize()?;
        Ok(Self {
            embed,
            lm_head,
            final_norm,
            layers,
        })
    }

    pub fn output(&self) -> &DeviceBuffer<bf16> {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.bytes()
                    + l.wqkv.bytes()
                    + l.bqkv.as_ref().map_or(0, |b| b.bytes())
                    + l.wo.bytes()
                    + l.ffn_norm.bytes()
                    + l.w_gate_up.bytes()
                    + l.w_down.bytes()
            })
            .sum();
        layers
            + self.embed.bytes()
            + self.lm_head.as_ref().map_or(0, |b| b.bytes())
            + self.final_norm.bytes()
    }
}
