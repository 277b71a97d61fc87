//! The layout-independent KV wire format (docs/architecture.md, "KV transfer"): per
//! layer, K and V for a run of token positions as `[tokens, kv_heads,
//! head_dim]`, dtype-tagged, cut into messages of at most [`MAX_CHUNK_BYTES`]
//! by [`KvSplitter`]. A streamed `Prefill` answer carries these chunks in
//! whatever order the prefill computes them; [`KvAssembler`] puts them back
//! together.

use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;

use super::rpc::TransferError;
use tandem_api::pb;
pub use tandem_api::types::f32_bytes;
use tandem_api::types::{KvDtype, KvExport, KvLayerChunk, KvPieces};

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
        KvDtype::Bf16 => pb::KvDtype::Bf16,
    }
}

/// Sizes that follow from a peer's KV layout (the layout is the contract's `pb::KvLayout`).
pub trait LayoutSizes {
    /// Bytes of K (or of V) for one token in one layer.
    fn row_bytes(&self) -> Result<usize, TransferError>;
    /// Bytes of K and V of all layers for one token.
    fn bytes_per_token(&self) -> Result<usize, TransferError>;
    /// Tokens per chunk so that a chunk's K and V stay within [`MAX_CHUNK_BYTES`].
    fn tokens_per_chunk(&self) -> Result<usize, TransferError>;
}

impl LayoutSizes for pb::KvLayout {
    fn row_bytes(&self) -> Result<usize, TransferError> {
        Ok(self.kv_heads as usize * self.head_dim as usize * dtype_size(self.dtype())?)
    }

    fn bytes_per_token(&self) -> Result<usize, TransferError> {
        Ok(2 * self.num_layers as usize * self.row_bytes()?)
    }

    fn tokens_per_chunk(&self) -> Result<usize, TransferError> {
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
}

/// f32 values as wire bytes of `dtype` (see [`KvDtype::encode`]); f32 goes
/// as it is, without a copy.
pub fn encode(data: Vec<f32>, dtype: KvDtype) -> Bytes {
    match dtype {
        KvDtype::F32 => f32_bytes(data),
        KvDtype::Bf16 => dtype.encode(&data),
    }
}

/// Wire bytes of `dtype` as f32 values (widening is exact).
pub fn decode_to_f32(bytes: &[u8], dtype: pb::KvDtype) -> Result<Vec<f32>, TransferError> {
    let size = dtype_size(dtype)?;
    if !bytes.len().is_multiple_of(size) {
        return Err(TransferError::Protocol(format!(
            "{} bytes are not whole {} values",
            bytes.len(),
            dtype.as_str_name()
        )));
    }
    if dtype == pb::KvDtype::Bf16 {
        // Widening is a shift; on aligned data it vectorises.
        if let Ok(words) = bytemuck::try_cast_slice::<u8, u16>(bytes) {
            return Ok(words
                .iter()
                .map(|&h| f32::from_bits(u32::from(h) << 16))
                .collect());
        }
    }
    let words = bytes.chunks_exact(size);
    Ok(match dtype {
        pb::KvDtype::F32 => words
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        pb::KvDtype::Bf16 => words
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        pb::KvDtype::F16 => words
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        pb::KvDtype::Unspecified => unreachable!("dtype_size refused it"),
    })
}

/// Which positions of each layer a transfer has covered so far.
#[derive(Debug, Clone)]
pub struct Coverage {
    num_tokens: usize,
    /// One flag per (layer, position), layer-major.
    covered: Vec<bool>,
    count: usize,
}

impl Coverage {
    pub fn new(num_layers: usize, num_tokens: usize) -> Self {
        Self {
            num_tokens,
            covered: vec![false; num_layers * num_tokens],
            count: 0,
        }
    }

    /// Marks `positions` of `layer` covered and returns the runs within them
    /// that were not covered before, in position order.
    pub fn cover_new(&mut self, layer: usize, positions: Range<usize>) -> Vec<Range<usize>> {
        let base = layer * self.num_tokens;
        let mut runs: Vec<Range<usize>> = Vec::new();
        for pos in positions {
            let flag = &mut self.covered[base + pos];
            if *flag {
                continue;
            }
            *flag = true;
            self.count += 1;
            match runs.last_mut() {
                Some(run) if run.end == pos => run.end += 1,
                _ => runs.push(pos..pos + 1),
            }
        }
        runs
    }

    /// Whether any of `positions` of `layer` is covered.
    pub fn any_covered(&self, layer: usize, positions: Range<usize>) -> bool {
        let base = layer * self.num_tokens;
        self.covered[base + positions.start..base + positions.end]
            .iter()
            .any(|&c| c)
    }

    /// (layer, position) pairs covered.
    pub fn covered(&self) -> usize {
        self.count
    }

    pub fn total(&self) -> usize {
        self.covered.len()
    }

    pub fn is_complete(&self) -> bool {
        self.count == self.covered.len()
    }

    /// The first (layer, position) not covered yet.
    pub fn first_gap(&self) -> Option<(usize, usize)> {
        let i = self.covered.iter().position(|&c| !c)?;
        Some((i / self.num_tokens, i % self.num_tokens))
    }
}

/// Checks that `layer` and `positions` lie within `layout`, naming what is out.
fn check_bounds(
    layout: &pb::KvLayout,
    layer: usize,
    positions: &Range<usize>,
) -> Result<(), TransferError> {
    if layer >= layout.num_layers as usize {
        return Err(TransferError::Protocol(format!(
            "a chunk for layer {layer}, but the layout has {} layers",
            layout.num_layers
        )));
    }
    let total = layout.num_tokens as usize;
    if positions.is_empty() || positions.end > total {
        return Err(TransferError::Protocol(format!(
            "layer {layer} positions {}..{} are empty or beyond the prompt's {total} tokens",
            positions.start, positions.end
        )));
    }
    Ok(())
}

/// The sending side of the wire: cuts K and V of (layer, position range)
/// pieces into chunks within [`MAX_CHUNK_BYTES`], sending each position of
/// each layer once. A prefill re-sends positions after a preemption (with
/// the same values); those are dropped here so the receiver sees each once.
pub struct KvSplitter {
    layout: pb::KvLayout,
    row_bytes: usize,
    tokens_per_chunk: usize,
    sent: Coverage,
}

impl KvSplitter {
    pub fn new(layout: pb::KvLayout) -> Result<Self, TransferError> {
        Ok(Self {
            row_bytes: layout.row_bytes()?,
            tokens_per_chunk: layout.tokens_per_chunk()?,
            sent: Coverage::new(layout.num_layers as usize, layout.num_tokens as usize),
            layout,
        })
    }

    /// Chunks for K and V of `layer` at positions from `start_pos` (each
    /// `[tokens, kv_heads, head_dim]`); the chunks share `k` and `v`'s memory.
    pub fn chunks(
        &mut self,
        layer: u32,
        start_pos: u32,
        k: &Bytes,
        v: &Bytes,
    ) -> Result<Vec<pb::KvChunk>, TransferError> {
        let row = self.row_bytes;
        if k.len() != v.len() || !k.len().is_multiple_of(row) {
            return Err(TransferError::Protocol(format!(
                "layer {layer} from position {start_pos}: K has {} and V {} bytes, \
                 not the same whole number of {row}-byte rows",
                k.len(),
                v.len()
            )));
        }
        let start = start_pos as usize;
        let positions = start..start + k.len() / row;
        check_bounds(&self.layout, layer as usize, &positions)?;
        let mut chunks = Vec::new();
        for run in self.sent.cover_new(layer as usize, positions) {
            for from in run.clone().step_by(self.tokens_per_chunk) {
                let n = self.tokens_per_chunk.min(run.end - from);
                let bytes = (from - start) * row..(from - start + n) * row;
                chunks.push(pb::KvChunk {
                    layer,
                    start_pos: from as u32,
                    num_tokens: n as u32,
                    k: k.slice(bytes.clone()),
                    v: v.slice(bytes),
                });
            }
        }
        Ok(chunks)
    }
}

/// Rebuilds a prompt's KV from chunks of any (layer, position range) in any
/// order. An identical re-send of an earlier chunk (same range, same bytes)
/// is ignored; any other overlap is refused, so a complete assembly holds
/// exactly one sent value per position. The chunks' bytes are kept as they
/// arrived (no copy, no conversion): the receiving backend installs them.
pub struct KvAssembler {
    layout: pb::KvLayout,
    row_bytes: usize,
    pieces: Vec<KvLayerChunk>,
    coverage: Coverage,
    /// (layer, start, tokens) of every chunk taken, with its index in
    /// `pieces`, to recognise re-sends.
    ranges: HashMap<(usize, usize, usize), usize>,
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
        Ok(Self {
            coverage: Coverage::new(layout.num_layers as usize, layout.num_tokens as usize),
            layout,
            row_bytes,
            pieces: Vec::new(),
            ranges: HashMap::new(),
            received_bytes: 0,
        })
    }

    pub fn layout(&self) -> &pb::KvLayout {
        &self.layout
    }

    /// K and V bytes taken in so far (re-sends not counted).
    pub fn received_bytes(&self) -> usize {
        self.received_bytes
    }

    /// What has arrived, for error messages: "covered of total layer positions".
    pub fn progress(&self) -> String {
        format!(
            "{} of {} layer positions",
            self.coverage.covered(),
            self.coverage.total()
        )
    }

    pub fn is_complete(&self) -> bool {
        self.coverage.is_complete()
    }

    pub fn push(&mut self, chunk: pb::KvChunk) -> Result<(), TransferError> {
        let (layer, start, n) = (
            chunk.layer as usize,
            chunk.start_pos as usize,
            chunk.num_tokens as usize,
        );
        let positions = start..start + n;
        check_bounds(&self.layout, layer, &positions)?;
        let len = n * self.row_bytes;
        if chunk.k.len() != len || chunk.v.len() != len {
            return Err(TransferError::Protocol(format!(
                "layer {layer} chunk of {n} tokens from {start} carries {} K and {} V bytes \
                 (expected {len} each)",
                chunk.k.len(),
                chunk.v.len()
            )));
        }
        if let Some(&i) = self.ranges.get(&(layer, start, n)) {
            let earlier = &self.pieces[i];
            if earlier.k != chunk.k || earlier.v != chunk.v {
                return Err(TransferError::Protocol(format!(
                    "layer {layer} positions {start}..{} re-sent with different values",
                    start + n
                )));
            }
            return Ok(());
        }
        if self.coverage.any_covered(layer, positions.clone()) {
            return Err(TransferError::Protocol(format!(
                "layer {layer} positions {start}..{} overlap an earlier chunk of another extent",
                start + n
            )));
        }
        self.coverage.cover_new(layer, positions);
        self.ranges.insert((layer, start, n), self.pieces.len());
        self.received_bytes += 2 * len;
        self.pieces.push(KvLayerChunk {
            layer,
            start_pos: start,
            num_tokens: n,
            k: chunk.k,
            v: chunk.v,
        });
        Ok(())
    }

    /// The assembled KV as the engine installs it: the pieces as they
    /// arrived, in the wire's dtype (f16, which no pool holds, widened to
    /// f32).
    pub fn into_pieces(self) -> Result<KvPieces, TransferError> {
        if let Some((layer, pos)) = self.coverage.first_gap() {
            return Err(TransferError::Incomplete(format!(
                "{} arrived; layer {layer} position {pos} is missing",
                self.progress()
            )));
        }
        let wire = self.layout.dtype();
        let (dtype, pieces) = match wire {
            pb::KvDtype::F32 => (KvDtype::F32, self.pieces),
            pb::KvDtype::Bf16 => (KvDtype::Bf16, self.pieces),
            _ => {
                let widen = |b: &Bytes| decode_to_f32(b, wire).map(f32_bytes);
                let pieces = self
                    .pieces
                    .into_iter()
                    .map(|p| {
                        Ok(KvLayerChunk {
                            k: widen(&p.k)?,
                            v: widen(&p.v)?,
                            ..p
                        })
                    })
                    .collect::<Result<_, TransferError>>()?;
                (KvDtype::F32, pieces)
            }
        };
        Ok(KvPieces {
            dtype,
            num_layers: self.layout.num_layers as usize,
            num_tokens: self.layout.num_tokens as usize,
            kv_heads: self.layout.kv_heads as usize,
            head_dim: self.layout.head_dim as usize,
            pieces,
        })
    }

    /// The assembled KV as f32 values per layer (widened exactly from the
    /// wire's dtype).
    pub fn into_export(self) -> Result<KvExport, TransferError> {
        Ok(self.into_pieces()?.to_export())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_of(kv: &KvExport) -> pb::KvLayout {
        let mut layout = pb::KvLayout {
            dtype: 0,
            num_layers: kv.num_layers() as u32,
            num_tokens: kv.num_tokens as u32,
            kv_heads: kv.kv_heads as u32,
            head_dim: kv.head_dim as u32,
            cached_tokens: 0,
            cuda_ipc_declined: String::new(),
        };
        layout.set_dtype(wire_dtype(kv.dtype));
        layout
    }

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
        let layout = layout_of(kv);
        let mut splitter = KvSplitter::new(layout.clone()).unwrap();
        let mut chunks = Vec::new();
        for (i, (k, v)) in kv.layers.iter().enumerate() {
            let (k, v) = (f32_bytes(k.clone()), f32_bytes(v.clone()));
            chunks.extend(splitter.chunks(i as u32, 0, &k, &v).unwrap());
        }
        let mut asm = KvAssembler::new(layout).unwrap();
        for c in chunks.clone() {
            asm.push(c).unwrap();
        }
        (chunks, asm.into_export().unwrap())
    }

    /// K and V of `layer` at `positions` of `kv`, as a prefill would send them.
    fn piece(kv: &KvExport, layer: usize, positions: Range<usize>) -> (Bytes, Bytes) {
        let w = kv.kv_heads * kv.head_dim;
        let (k, v) = &kv.layers[layer];
        let r = positions.start * w..positions.end * w;
        (f32_bytes(k[r.clone()].to_vec()), f32_bytes(v[r].to_vec()))
    }

    #[test]
    fn assembled_pieces_are_the_received_bytes_themselves() {
        // bf16 on the wire: the pieces keep the chunks' bytes (no copy, no
        // widening) for the backend to install.
        let kv = export(2, 700, 8, 128);
        let mut layout = layout_of(&kv);
        layout.set_dtype(pb::KvDtype::Bf16);
        let mut splitter = KvSplitter::new(layout.clone()).unwrap();
        let mut asm = KvAssembler::new(layout).unwrap();
        let mut sent = Vec::new();
        for (i, (k, v)) in kv.layers.iter().enumerate() {
            let (k, v) = (KvDtype::Bf16.encode(k), KvDtype::Bf16.encode(v));
            for c in splitter.chunks(i as u32, 0, &k, &v).unwrap() {
                sent.push((c.layer as usize, c.start_pos as usize, c.k.as_ptr()));
                asm.push(c).unwrap();
            }
        }
        let pieces = asm.into_pieces().unwrap();
        assert_eq!(pieces.dtype, KvDtype::Bf16);
        pieces.check().unwrap();
        let kept: Vec<_> = pieces
            .pieces
            .iter()
            .map(|p| (p.layer, p.start_pos, p.k.as_ptr()))
            .collect();
        assert_eq!(kept, sent);
        // Widened, the values are the bf16-rounded originals.
        let widened = pieces.to_export();
        let round = |x: &f32| half::bf16::from_f32(*x).to_f32();
        let want: Vec<f32> = kv.layers[1].1.iter().map(round).collect();
        assert_eq!(widened.layers[1].1, want);
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
        let layout = layout_of(&kv);
        assert_eq!(layout.bytes_per_token().unwrap(), 2 * 2 * 8 * 128 * 4);
    }

    #[test]
    fn the_splitter_sends_a_re_sent_position_once_and_splits_by_tokens() {
        // 600 tokens of 4 KiB per side: the 0..600 piece needs two chunks.
        let kv = export(1, 600, 8, 128);
        let mut splitter = KvSplitter::new(layout_of(&kv)).unwrap();
        let (k, v) = piece(&kv, 0, 100..300);
        let first = splitter.chunks(0, 100, &k, &v).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].start_pos, first[0].num_tokens), (100, 200));
        // After a preemption the engine sends 0..600 again: only 0..100 and
        // 300..600 are new, and 300..600 is cut at 511 tokens per chunk.
        let (k, v) = piece(&kv, 0, 0..600);
        let again = splitter.chunks(0, 0, &k, &v).unwrap();
        let ranges: Vec<_> = again.iter().map(|c| (c.start_pos, c.num_tokens)).collect();
        assert_eq!(ranges, vec![(0, 100), (300, 300)]);
        let mut asm = KvAssembler::new(layout_of(&kv)).unwrap();
        for c in first.into_iter().chain(again) {
            asm.push(c).unwrap();
        }
        assert_eq!(asm.received_bytes(), kv.size_bytes());
        assert_eq!(asm.into_export().unwrap(), kv);

        let (k, v) = piece(&kv, 0, 590..600);
        let err = splitter.chunks(0, 595, &k, &v).unwrap_err().to_string();
        assert!(err.contains("beyond the prompt's 600 tokens"), "{err}");
    }

    #[test]
    fn out_of_order_and_repeated_chunks_assemble_exactly() {
        let kv = export(3, 10, 1, 2);
        let layout = layout_of(&kv);
        let chunk = |layer: usize, positions: Range<usize>| {
            let (k, v) = piece(&kv, layer, positions.clone());
            pb::KvChunk {
                layer: layer as u32,
                start_pos: positions.start as u32,
                num_tokens: positions.len() as u32,
                k,
                v,
            }
        };
        let mut asm = KvAssembler::new(layout).unwrap();
        // Later layers and positions first, gaps filled afterwards, and
        // one range sent twice with the same values.
        let order = [
            (2, 4..10),
            (0, 4..10),
            (1, 0..4),
            (2, 4..10),
            (1, 4..10),
            (0, 0..4),
            (0, 0..4),
        ];
        for (layer, positions) in order {
            assert!(!asm.is_complete());
            asm.push(chunk(layer, positions)).unwrap();
        }
        assert!(!asm.is_complete());
        let err = asm.progress();
        assert_eq!(err, "26 of 30 layer positions");
        asm.push(chunk(2, 0..4)).unwrap();
        assert!(asm.is_complete());
        assert_eq!(asm.received_bytes(), kv.size_bytes());
        assert_eq!(asm.into_export().unwrap(), kv);
    }

    #[test]
    fn inconsistent_short_or_missing_chunks_are_refused_by_name() {
        let kv = export(2, 4, 1, 2);
        let layout = layout_of(&kv);
        let (k, v) = piece(&kv, 0, 0..4);
        let whole = pb::KvChunk {
            layer: 0,
            start_pos: 0,
            num_tokens: 4,
            k,
            v,
        };
        let mut asm = KvAssembler::new(layout).unwrap();
        let mut no_such_layer = whole.clone();
        no_such_layer.layer = 2;
        let err = asm.push(no_such_layer).unwrap_err().to_string();
        assert!(
            err.contains("layer 2, but the layout has 2 layers"),
            "{err}"
        );
        let mut beyond = whole.clone();
        beyond.start_pos = 1;
        let err = asm.push(beyond).unwrap_err().to_string();
        assert!(err.contains("positions 1..5"), "{err}");
        assert!(err.contains("beyond the prompt's 4 tokens"), "{err}");
        let mut short = whole.clone();
        short.v = short.v.slice(1..);
        let err = asm.push(short).unwrap_err().to_string();
        assert!(err.contains("expected 32 each"), "{err}");

        asm.push(whole.clone()).unwrap();
        // The same range again with other values, or an overlapping range of
        // another extent, contradicts what arrived.
        let mut changed = whole.clone();
        changed.k = Bytes::from(vec![0u8; 32]);
        let err = asm.push(changed).unwrap_err().to_string();
        assert!(err.contains("re-sent with different values"), "{err}");
        let mut overlap = whole.clone();
        overlap.num_tokens = 2;
        overlap.start_pos = 1;
        overlap.k = overlap.k.slice(8..24);
        overlap.v = overlap.v.slice(8..24);
        let err = asm.push(overlap).unwrap_err().to_string();
        assert!(err.contains("positions 1..3 overlap"), "{err}");
        assert_eq!(asm.received_bytes(), 2 * 32);

        let err = asm.into_export().unwrap_err().to_string();
        assert!(
            err.contains("4 of 8 layer positions arrived; layer 1 position 0 is missing"),
            "{err}"
        );
    }

    #[test]
    fn bf16_values_ship_in_half_the_bytes_and_come_back_exactly() {
        // Values a bf16 pool holds (exactly representable), with signs,
        // zeros, a subnormal, infinities and large magnitudes.
        let held: Vec<f32> = [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            0.15625,
            3.0e38,
            -1.0e-40,
            f32::INFINITY,
            -f32::INFINITY,
        ]
        .into_iter()
        .chain((0..200).map(|i| ((i as f32) * 0.37 - 30.0).sin() * 10f32.powi(i % 7 - 3)))
        .map(|x| half::bf16::from_f32(x).to_f32())
        .collect();
        let wire = encode(held.clone(), KvDtype::Bf16);
        assert_eq!(wire.len(), 2 * held.len());
        let back = decode_to_f32(&wire, pb::KvDtype::Bf16).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            held.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        // Every other f32 rounds as the `half` crate rounds (to nearest, ties
        // to even; NaN stays NaN).
        for bits in (0..u32::MAX)
            .step_by(65_537)
            .chain([0x7fc0_0000, 0xff80_0001])
        {
            let x = f32::from_bits(bits);
            let want = half::bf16::from_f32(x);
            let got = half::bf16::from_bits(tandem_api::types::bf16_bits(x));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e} ({bits:#x}): {got} vs {want}"
            );
        }
        // Other f32 values round to the nearest bf16, ties to even.
        let tie = f32::from_bits(0x3f80_8000); // halfway between two bf16 values
        let above = f32::from_bits(0x3f80_8001);
        let rounded =
            decode_to_f32(&encode(vec![tie, above], KvDtype::Bf16), pb::KvDtype::Bf16).unwrap();
        assert_eq!(rounded, vec![1.0, f32::from_bits(0x3f81_0000)]);
        // f32 ships as it is.
        assert_eq!(&encode(vec![tie], KvDtype::F32)[..], &tie.to_le_bytes()[..]);
        let err = decode_to_f32(&[1, 2, 3], pb::KvDtype::Bf16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3 bytes are not whole KV_DTYPE_BF16 values"),
            "{err}"
        );
    }

    #[test]
    fn bf16_and_f16_layouts_are_assembled_into_exact_f32() {
        let kv = export(2, 5, 2, 4);
        let held = |v: &Vec<f32>| -> Vec<f32> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x * 0.01).to_f32())
                .collect()
        };
        let kv = KvExport {
            layers: kv.layers.iter().map(|(k, v)| (held(k), held(v))).collect(),
            ..kv
        };
        let mut layout = layout_of(&kv);
        layout.set_dtype(pb::KvDtype::Bf16);
        assert_eq!(layout.row_bytes().unwrap(), 2 * 4 * 2);
        assert_eq!(layout.bytes_per_token().unwrap(), 2 * 2 * 16);
        let mut splitter = KvSplitter::new(layout.clone()).unwrap();
        let mut asm = KvAssembler::new(layout.clone()).unwrap();
        for (i, (k, v)) in kv.layers.iter().enumerate() {
            let (k, v) = (
                encode(k.clone(), KvDtype::Bf16),
                encode(v.clone(), KvDtype::Bf16),
            );
            for c in splitter.chunks(i as u32, 0, &k, &v).unwrap() {
                asm.push(c).unwrap();
            }
        }
        assert_eq!(asm.received_bytes(), kv.size_bytes() / 2);
        assert_eq!(asm.into_export().unwrap(), kv);

        // f16 on the wire widens the same way.
        layout.set_dtype(pb::KvDtype::F16);
        let mut asm = KvAssembler::new(layout.clone()).unwrap();
        let ones: Vec<u8> = (0..5 * 8)
            .flat_map(|_| half::f16::from_f32(1.5).to_le_bytes())
            .collect();
        for layer in 0..2 {
            asm.push(pb::KvChunk {
                layer,
                start_pos: 0,
                num_tokens: 5,
                k: Bytes::from(ones.clone()),
                v: Bytes::from(ones.clone()),
            })
            .unwrap();
        }
        let got = asm.into_export().unwrap();
        assert!(got
            .layers
            .iter()
            .all(|(k, v)| k.len() == 40 && k.iter().chain(v).all(|&x| x == 1.5)));
        layout.set_dtype(pb::KvDtype::Unspecified);
        assert!(KvAssembler::new(layout).is_err());
    }
}
