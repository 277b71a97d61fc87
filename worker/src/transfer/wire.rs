//! The layout-independent KV wire format (DESIGN.md "KV transfer"): per
//! layer, K and V for a run of token positions as `[tokens, kv_heads,
//! head_dim]`, dtype-tagged, cut into messages of at most [`MAX_CHUNK_BYTES`].
//! Transports move these chunks; [`KvAssembler`] puts them back together.

use bytes::Bytes;

use super::pb;
use super::TransferError;
use crate::engine::types::{KvDtype, KvExport};

// Chunks carry the host's bytes; the format says little-endian.
#[cfg(target_endian = "big")]
compile_error!("the KV wire format is little-endian; big-endian hosts would need a byte swap");

/// Largest encoded chunk message. gRPC's default message limit is 4 MiB; the
/// K and V payload leaves room for the chunk's other fields.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;
const CHUNK_OVERHEAD: usize = 64;

pub fn dtype_size(dtype: pb::KvDtype) -> Result<usize, TransferError> {
    match dtype {
        pb::KvDtype::F32 => Ok(4),
        pb::KvDtype::Bf16 | pb::KvDtype::F16 => Ok(2),
        pb::KvDtype::Unspecified => Err(TransferError::Protocol(
            "the KV layout names no dtype".into(),
        )),
    }
}

pub fn wire_dtype(dtype: KvDtype) -> pb::KvDtype {
    match dtype {
        KvDtype::F32 => pb::KvDtype::F32,
    }
}

impl pb::KvLayout {
    /// Bytes of K (or of V) for one token in one layer.
    pub fn row_bytes(&self) -> Result<usize, TransferError> {
        Ok(self.kv_heads as usize * self.head_dim as usize * dtype_size(self.dtype())?)
    }

    /// Bytes of K and V of all layers for one token.
    pub fn bytes_per_token(&self) -> Result<usize, TransferError> {
        Ok(2 * self.num_layers as usize * self.row_bytes()?)
    }

    /// Tokens per chunk so that a chunk's K and V stay within [`MAX_CHUNK_BYTES`].
    pub fn tokens_per_chunk(&self) -> Result<usize, TransferError> {
        let row = self.row_bytes()?;
        if row == 0 {
            return Err(TransferError::Protocol(
                "the KV layout has zero kv_heads or head_dim".into(),
            ));
        }
        let tokens = (MAX_CHUNK_BYTES - CHUNK_OVERHEAD) / (2 * row);
        if tokens == 0 {
            return Err(TransferError::Protocol(format!(
                "one token's K and V ({} bytes) exceed a {MAX_CHUNK_BYTES}-byte chunk",
                2 * row
            )));
        }
        Ok(tokens)
    }

    /// The layout of an engine export (cached tokens as given).
    pub fn of_export(kv: &KvExport, cached_tokens: usize) -> Self {
        let mut layout = Self {
            dtype: 0,
            num_layers: kv.num_layers() as u32,
            num_tokens: kv.num_tokens as u32,
            kv_heads: kv.kv_heads as u32,
            head_dim: kv.head_dim as u32,
            cached_tokens: cached_tokens as u32,
        };
        layout.set_dtype(wire_dtype(kv.dtype));
        layout
    }
}

/// Owns f32 data and lends it as bytes, so an export's layers go on the wire
/// without a copy.
struct F32Bytes(Vec<f32>);
impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

pub fn f32_bytes(data: Vec<f32>) -> Bytes {
    Bytes::from_owner(F32Bytes(data))
}

/// Cuts one layer's K and V (each `[num_tokens, kv_heads, head_dim]`) into
/// wire chunks; the chunks share `k` and `v`'s memory.
pub fn layer_chunks(
    layout: &pb::KvLayout,
    layer: u32,
    k: &Bytes,
    v: &Bytes,
) -> Result<Vec<pb::KvChunk>, TransferError> {
    let row = layout.row_bytes()?;
    let tokens = layout.num_tokens as usize;
    if k.len() != tokens * row || v.len() != tokens * row {
        return Err(TransferError::Protocol(format!(
            "layer {layer}: K has {} and V {} bytes; {tokens} tokens need {} each",
            k.len(),
            v.len(),
            tokens * row
        )));
    }
    let step = layout.tokens_per_chunk()?;
    Ok((0..tokens)
        .step_by(step)
        .map(|start| {
            let n = step.min(tokens - start);
            let bytes = start * row..(start + n) * row;
            pb::KvChunk {
                layer,
                token_offset: start as u32,
                num_tokens: n as u32,
                k: k.slice(bytes.clone()),
                v: v.slice(bytes),
            }
        })
        .collect())
}

/// Rebuilds a prompt's KV from chunks arriving in stream order (layers in
/// order, each layer's positions contiguous from 0), refusing anything else,
/// so a complete assembly is exactly what was sent.
pub struct KvAssembler {
    layout: pb::KvLayout,
    row_bytes: usize,
    /// Per layer, K and V, filled through a byte view; f32 storage so an f32
    /// layout becomes a `KvExport` without a copy (other dtypes use the bytes).
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    next_layer: usize,
    next_token: usize,
    received_bytes: usize,
}

impl KvAssembler {
    pub fn new(layout: pb::KvLayout) -> Result<Self, TransferError> {
        let row_bytes = layout.row_bytes()?;
        if layout.num_layers == 0 || layout.num_tokens == 0 {
            return Err(TransferError::Protocol(format!(
                "the KV layout has {} layers and {} tokens",
                layout.num_layers, layout.num_tokens
            )));
        }
        let words = (layout.num_tokens as usize * row_bytes).div_ceil(4);
        let layers = (0..layout.num_layers)
            .map(|_| (vec![0f32; words], vec![0f32; words]))
            .collect();
        Ok(Self {
            layout,
            row_bytes,
            layers,
            next_layer: 0,
            next_token: 0,
            received_bytes: 0,
        })
    }

    pub fn layout(&self) -> &pb::KvLayout {
        &self.layout
    }

    /// K and V bytes taken in so far.
    pub fn received_bytes(&self) -> usize {
        self.received_bytes
    }

    /// Layers fully received so far.
    pub fn layers_done(&self) -> usize {
        self.next_layer
    }

    pub fn is_complete(&self) -> bool {
        self.next_layer == self.layout.num_layers as usize
    }

    pub fn push(&mut self, chunk: pb::KvChunk) -> Result<(), TransferError> {
        let (layer, offset, n) = (
            chunk.layer as usize,
            chunk.token_offset as usize,
            chunk.num_tokens as usize,
        );
        if self.is_complete() {
            return Err(TransferError::Protocol(format!(
                "chunk for layer {layer} after all {} layers arrived",
                self.layout.num_layers
            )));
        }
        if layer != self.next_layer || offset != self.next_token {
            return Err(TransferError::Protocol(format!(
                "expected layer {} from token {}, got layer {layer} from token {offset}",
                self.next_layer, self.next_token
            )));
        }
        let len = n * self.row_bytes;
        let total = self.layout.num_tokens as usize;
        if n == 0 || offset + n > total || chunk.k.len() != len || chunk.v.len() != len {
            return Err(TransferError::Protocol(format!(
                "layer {layer} chunk of {n} tokens from {offset} carries {} K and {} V bytes \
                 (expected {len} each, within {total} tokens)",
                chunk.k.len(),
                chunk.v.len()
            )));
        }
        let at = offset * self.row_bytes;
        let (k, v) = &mut self.layers[layer];
        bytemuck::cast_slice_mut::<f32, u8>(k)[at..at + len].copy_from_slice(&chunk.k);
        bytemuck::cast_slice_mut::<f32, u8>(v)[at..at + len].copy_from_slice(&chunk.v);
        self.received_bytes += 2 * len;
        self.next_token += n;
        if self.next_token == total {
            self.next_layer += 1;
            self.next_token = 0;
        }
        Ok(())
    }

    /// The assembled KV as the engine takes it (f32 only, for now).
    pub fn into_export(self) -> Result<KvExport, TransferError> {
        if !self.is_complete() {
            return Err(TransferError::Incomplete(format!(
                "{} of {} layers arrived (layer {} stopped at token {})",
                self.next_layer, self.layout.num_layers, self.next_layer, self.next_token
            )));
        }
        let dtype = match self.layout.dtype() {
            pb::KvDtype::F32 => KvDtype::F32,
            other => {
                return Err(TransferError::Protocol(format!(
                    "the engine installs f32 KV; received {}",
                    other.as_str_name()
                )))
            }
        };
        Ok(KvExport {
            dtype,
            num_tokens: self.layout.num_tokens as usize,
            kv_heads: self.layout.kv_heads as usize,
            head_dim: self.layout.head_dim as usize,
            layers: self.layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(layers: usize, tokens: usize, kv_heads: usize, head_dim: usize) -> KvExport {
        let n = tokens * kv_heads * head_dim;
        KvExport {
            dtype: KvDtype::F32,
            num_tokens: tokens,
            kv_heads,
            head_dim,
            layers: (0..layers)
                .map(|l| {
                    let k = (0..n).map(|i| (l * 1000 + i) as f32).collect();
                    let v = (0..n).map(|i| -((l * 1000 + i) as f32)).collect();
                    (k, v)
                })
                .collect(),
        }
    }

    fn round_trip(kv: &KvExport) -> (Vec<pb::KvChunk>, KvExport) {
        let layout = pb::KvLayout::of_export(kv, 0);
        let mut chunks = Vec::new();
        for (i, (k, v)) in kv.layers.iter().enumerate() {
            let (k, v) = (f32_bytes(k.clone()), f32_bytes(v.clone()));
            chunks.extend(layer_chunks(&layout, i as u32, &k, &v).unwrap());
        }
        let mut asm = KvAssembler::new(layout).unwrap();
        for c in chunks.clone() {
            asm.push(c).unwrap();
        }
        (chunks, asm.into_export().unwrap())
    }

    #[test]
    fn chunks_stay_within_4_mib_and_reassemble_exactly() {
        // 8 kv heads x 128 x f32 = 4 KiB per token per side: 511 tokens per chunk.
        let kv = export(2, 1500, 8, 128);
        let (chunks, back) = round_trip(&kv);
        assert_eq!(back, kv);
        assert_eq!(chunks.len(), 2 * 3);
        for c in &chunks {
            assert!(c.k.len() + c.v.len() + CHUNK_OVERHEAD <= MAX_CHUNK_BYTES);
            use prost::Message;
            assert!(c.encoded_len() <= MAX_CHUNK_BYTES);
        }
        let layout = pb::KvLayout::of_export(&kv, 0);
        assert_eq!(layout.bytes_per_token().unwrap(), 2 * 2 * 8 * 128 * 4);
    }

    #[test]
    fn out_of_order_short_or_missing_chunks_are_refused() {
        let kv = export(2, 4, 1, 2);
        let layout = pb::KvLayout::of_export(&kv, 0);
        let k = f32_bytes(kv.layers[0].0.clone());
        let v = f32_bytes(kv.layers[0].1.clone());
        let chunks = layer_chunks(&layout, 0, &k, &v).unwrap();

        let mut asm = KvAssembler::new(layout).unwrap();
        let mut wrong_layer = chunks[0].clone();
        wrong_layer.layer = 1;
        assert!(asm
            .push(wrong_layer)
            .unwrap_err()
            .to_string()
            .contains("expected layer 0"));
        let mut short = chunks[0].clone();
        short.v = short.v.slice(1..);
        assert!(asm.push(short).is_err());
        asm.push(chunks[0].clone()).unwrap();
        let err = asm.into_export().unwrap_err().to_string();
        assert!(err.contains("1 of 2 layers"), "{err}");
    }

    #[test]
    fn bf16_layouts_size_rows_by_dtype_and_are_not_installed_as_f32() {
        let mut layout = pb::KvLayout {
            num_layers: 1,
            num_tokens: 3,
            kv_heads: 2,
            head_dim: 4,
            ..pb::KvLayout::default()
        };
        layout.set_dtype(pb::KvDtype::Bf16);
        assert_eq!(layout.row_bytes().unwrap(), 2 * 4 * 2);
        assert_eq!(layout.bytes_per_token().unwrap(), 2 * 16);
        let side = Bytes::from(vec![3u8; 3 * 16]);
        let mut asm = KvAssembler::new(layout).unwrap();
        for c in layer_chunks(&layout, 0, &side, &side).unwrap() {
            asm.push(c).unwrap();
        }
        assert!(asm.is_complete());
        assert_eq!(asm.received_bytes(), 2 * 3 * 16);
        let err = asm.into_export().unwrap_err().to_string();
        assert!(err.contains("KV_DTYPE_BF16"), "{err}");
        layout.set_dtype(pb::KvDtype::Unspecified);
        assert!(KvAssembler::new(layout).is_err());
    }
}
