//! The forward pass of a planned step, enqueued on the stream: the
//! embedding, then per layer the attention block (norm, QKV projection,
//! RoPE and KV write, attention, output projection onto the residual) and
//! the MLP block (norm, gate/up projection, SiLU·mul, down projection onto
//! the residual), then the output head and the sampler. Steps of 1, 2 or 4
//! tokens run the fused projections (`gemv_*`), others cuBLAS GEMMs and the
//! separate kernels; under tensor parallelism each projection onto the
//! residual is followed by an all-reduce.

use super::device::{alloc, alloc_array, bf16, Dev, DeviceBuffer, Gpu, Matrix, PinnedBuffer};
use super::launch::{
    DecodeAttention, GateUp, GemvInput, GemvLaunch, GemvOut, GemvQkv, GemvSilu, Heads, PagedKv,
    PrefillAttention, PrefillKernel, PrefillSource, PrefillTiles, RmsNorm, RopeKvWrite, SampleRows,
    SplitScratch,
};
use super::nccl::RankComm;
use super::plan::{InputLayout, StepPlan};
use super::weights::DeviceWeights;
use super::{CudaBackend, CudaError, CudaOptions, KvPool, Profiler};
use crate::backend::{BackendError, KvLayerSink};
use tandem_model::ModelConfig;

/// Fixed device buffers of one step, sized for the largest step planned.
pub(super) struct Workspace {
    /// The residual stream, `[tokens, hidden]`.
    pub x: DeviceBuffer<f32>,
    pub normed: DeviceBuffer<bf16>,
    pub qkv: DeviceBuffer<f32>,
    /// Attention output; on wgmma prefill steps first the bf16 query.
    pub attn: DeviceBuffer<bf16>,
    /// Gate/up products: f32 when the GEMM writes f32
    /// ([`super::CudaTuning::f32_gate_up`]), else bf16.
    pub gate_up: DeviceBuffer,
    pub act: DeviceBuffer<bf16>,
    pub kv_out: DeviceBuffer<f32>,
    /// The step's RoPE (cos, sin) per token and frequency (`rope_table`).
    pub rope_cs: DeviceBuffer<[f32; 2]>,
    pub part_max: DeviceBuffer<f32>,
    pub part_sum: DeviceBuffer<f32>,
    pub part_out: DeviceBuffer<f32>,
    /// Finished decode-attention splits per (sequence, KV head); zero
    /// between steps (the last split resets its counter).
    pub split_counters: DeviceBuffer<i32>,
    pub logits: DeviceBuffer<f32>,
    pub next_tokens: DeviceBuffer<i32>,
    /// Allowed-token bitsets of a step's constrained rows
    /// (`[max_num_seqs, vocab.div_ceil(32)]`).
    pub token_masks: DeviceBuffer<u32>,
}

impl Workspace {
    /// Buffers for steps of `opts`' sizes, with `part_rows` rows of decode
    /// attention's partial results.
    pub fn alloc(
        cfg: &ModelConfig,
        opts: &CudaOptions,
        part_rows: usize,
        f32_gate_up: bool,
    ) -> Result<Self, CudaError> {
        let (m, s) = (opts.max_batch_tokens, opts.max_num_seqs);
        let heads = Heads::of(cfg);
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim, f) = (heads.q_dim(), heads.kv_dim(), cfg.intermediate_size);
        Ok(Self {
            x: alloc_array(m * h)?,
            normed: alloc_array(m * h)?,
            qkv: alloc_array(m * (q_dim + 2 * kv_dim))?,
            attn: alloc_array(m * q_dim)?,
            gate_up: alloc(m * 2 * f * if f32_gate_up { 4 } else { 2 })?,
            act: alloc_array(m * f)?,
            kv_out: alloc_array(m * 2 * kv_dim)?,
            rope_cs: alloc_array(m * hd / 2)?,
            part_max: alloc_array(part_rows)?,
            part_sum: alloc_array(part_rows)?,
            part_out: alloc_array(part_rows * hd)?,
            split_counters: alloc_array(s * heads.kv)?,
            logits: alloc_array(s * cfg.vocab_size)?,
            next_tokens: alloc_array(s)?,
            token_masks: alloc_array(s * cfg.vocab_size.div_ceil(32))?,
        })
    }

    fn split_scratch(&self) -> SplitScratch {
        SplitScratch {
            part_max: self.part_max.dev(),
            part_sum: self.part_sum.dev(),
            part_out: self.part_out.dev(),
            counters: self.split_counters.dev(),
        }
    }
}

/// Device addresses of the step inputs ([`InputLayout`]'s sections).
#[derive(Clone, Copy)]
pub(super) struct StepInputs {
    pub tokens: Dev<i32>,
    pub positions: Dev<i32>,
    pub slots: Dev<i32>,
    pub logit_rows: Dev<i32>,
    pub tiles: PrefillTiles,
    pub sampling: Dev<i32>,
    pub block_tables: Dev<i32>,
}

impl StepInputs {
    pub fn new(inputs: Dev<i32>, layout: &InputLayout, tiles: usize) -> Self {
        Self {
            tokens: inputs.offset(layout.tokens()),
            positions: inputs.offset(layout.positions()),
            slots: inputs.offset(layout.slots()),
            logit_rows: inputs.offset(layout.logit_rows()),
            tiles: PrefillTiles {
                seq: inputs.offset(layout.tile_seq()),
                row0: inputs.offset(layout.tile_row0()),
                rows: inputs.offset(layout.tile_rows()),
                count: tiles,
            },
            sampling: inputs.offset(layout.sampling()),
            block_tables: inputs.offset(layout.block_tables()),
        }
    }
}

/// One step's forward pass: what it reads and which kernels it runs.
struct Forward<'a> {
    gpu: &'a Gpu,
    cfg: &'a ModelConfig,
    heads: Heads,
    plan: &'a StepPlan,
    ws: &'a Workspace,
    weights: &'a DeviceWeights,
    pool: &'a KvPool,
    inv_freq: Dev<f32>,
    inputs: StepInputs,
    profiler: Option<&'a mut Profiler>,
    /// The fused projections' kernel index for the step's rows, when they
    /// run ([`CudaBackend::gemv_for`]).
    gemv: Option<usize>,
    gemv_launch: GemvLaunch,
    prefill: PrefillKernel,
    /// A prefill step on the wgmma attention: `rope_kv_write` stores the
    /// rotated query scaled and in bf16 where the attention writes its output
    /// (each block reads its rows' query before it writes the same rows'
    /// output; no block reads another's), which is what that kernel reads. So
    /// those steps run `rope_kv_write`, never the fused QKV projection (which
    /// leaves an f32 query).
    wgmma_step: bool,
    /// Copy each layer's new K and V out (`rope_kv_write`'s `kv_out`).
    streaming: bool,
    pdl: bool,
    f32_gate_up: bool,
    tp: Option<RankComm>,
}

impl Forward<'_> {
    /// Records a profiling mark named `name` after the operations enqueued so far.
    fn mark(&mut self, name: &'static str) -> Result<(), CudaError> {
        if let Some(p) = self.profiler.as_deref_mut() {
            p.mark(name, self.gpu)?;
        }
        Ok(())
    }

    fn rows(&self) -> usize {
        self.plan.tokens
    }

    fn eps(&self) -> f32 {
        self.cfg.rms_norm_eps
    }

    /// Attention's softmax scale, `1 / sqrt(head_dim)`.
    fn scale(&self) -> f32 {
        1.0 / (self.cfg.head_dim as f32).sqrt()
    }

    /// This layer's K and V cache and the step's block tables.
    fn paged_kv(&self, layer: usize) -> PagedKv {
        let (k_cache, v_cache) = self.pool.layer_cache(self.cfg, layer);
        PagedKv {
            k_cache,
            v_cache,
            block_tables: self.inputs.block_tables,
            block_size: self.pool.block_size,
            max_blocks: self.pool.layout.max_blocks,
        }
    }

    /// The token embeddings into the residual stream, and the step's RoPE
    /// table where the unfused path needs it.
    fn embed(&mut self) -> Result<(), CudaError> {
        self.gpu.embed_gather(
            self.ws.x.dev(),
            self.weights.embed.dev(),
            self.inputs.tokens,
            self.rows(),
            self.cfg.hidden_size,
        )?;
        self.mark("embed")?;
        if self.gemv.is_none() {
            // The step's rotations, for every layer's rope_kv_write.
            self.gpu.rope_table(
                self.ws.rope_cs.dev(),
                self.inv_freq,
                self.inputs.positions,
                self.rows(),
                self.cfg.head_dim,
            )?;
            self.mark("rope_table")?;
        }
        Ok(())
    }

    /// Layer `li`'s attention block: norm, QKV, RoPE and KV write, attention
    /// and the output projection onto the residual.
    fn attention(&mut self, li: usize) -> Result<(), CudaError> {
        self.qkv(li)?;
        self.attend(li)?;
        let layer = &self.weights.layers[li];
        let (w, k) = (layer.wo.dev(), self.heads.q_dim());
        self.add_projection(w, self.ws.attn.dev(), k, ("o_gemv", "o_gemm"))
    }

    /// Layer `li`'s MLP block: norm, gate/up, SiLU·mul and the down
    /// projection onto the residual.
    fn mlp(&mut self, li: usize) -> Result<(), CudaError> {
        let layer = &self.weights.layers[li];
        let (x, act, hidden, f) = (
            self.ws.x.dev(),
            self.ws.act.dev(),
            self.cfg.hidden_size,
            self.cfg.intermediate_size,
        );
        if self.gemv.is_some() {
            // act = silu(norm(x) · w_gate^T) * (norm(x) · w_up^T)
            self.gpu.gemv_silu(
                &self.gemv_launch,
                &GemvSilu {
                    act,
                    w: layer.w_gate_up.dev(),
                    x,
                    norm: layer.ffn_norm.dev(),
                    eps: self.eps(),
                    hidden,
                    f,
                    rows: self.rows(),
                },
            )?;
            self.mark("norm_gate_up_silu_gemv")?;
        } else {
            self.gpu.rms_norm(&RmsNorm {
                out: self.ws.normed.dev(),
                x,
                weight: layer.ffn_norm.dev(),
                gather: None,
                rows: self.rows(),
                hidden,
                eps: self.eps(),
            })?;
            self.mark("norm")?;
            let gu = self.ws.gate_up.ptr();
            let gate_up = if self.f32_gate_up {
                GateUp::F32(Dev::at(gu))
            } else {
                GateUp::Bf16(Dev::at(gu))
            };
            let gate_up_out = match gate_up {
                GateUp::F32(d) => Matrix::from(d),
                GateUp::Bf16(d) => Matrix::from(d),
            };
            self.gpu.gemm(
                (self.rows(), 2 * f, hidden),
                self.ws.normed.dev().into(),
                layer.w_gate_up.dev(),
                gate_up_out,
                0.0,
            )?;
            self.mark("gate_up_gemm")?;
            self.gpu.silu_mul(act, gate_up, self.rows(), f)?;
            self.mark("silu")?;
        }
        self.add_projection(layer.w_down.dev(), act, f, ("down_gemv", "down_gemm"))
    }

    /// The QKV projection with its norm, bias, RoPE and KV-cache write.
    fn qkv(&mut self, li: usize) -> Result<(), CudaError> {
        let layer = &self.weights.layers[li];
        let (k_cache, v_cache) = self.pool.layer_cache(self.cfg, li);
        let bias = layer.bqkv.as_ref().map(DeviceBuffer::dev);
        let (qkv, hidden) = (self.ws.qkv.dev(), self.cfg.hidden_size);
        if self.gemv.is_some() {
            // RMSNorm, QKV, bias, RoPE and the KV write in one kernel.
            self.gpu.gemv_qkv(
                &self.gemv_launch,
                &GemvQkv {
                    qkv,
                    k_cache,
                    v_cache,
                    w: layer.wqkv.dev(),
                    bias,
                    x: self.ws.x.dev(),
                    norm: layer.attn_norm.dev(),
                    eps: self.eps(),
                    inv_freq: self.inv_freq,
                    positions: self.inputs.positions,
                    slots: self.inputs.slots,
                    hidden,
                    heads: self.heads,
                    rows: self.rows(),
                },
            )?;
            return self.mark("norm_qkv_rope_gemv");
        }
        let normed = self.ws.normed.dev();
        self.gpu.rms_norm(&RmsNorm {
            out: normed,
            x: self.ws.x.dev(),
            weight: layer.attn_norm.dev(),
            gather: None,
            rows: self.rows(),
            hidden,
            eps: self.eps(),
        })?;
        self.mark("norm")?;
        let qkv_dim = self.heads.q_dim() + 2 * self.heads.kv_dim();
        self.gpu.gemm(
            (self.rows(), qkv_dim, hidden),
            normed.into(),
            layer.wqkv.dev(),
            qkv.into(),
            0.0,
        )?;
        self.mark("qkv_gemm")?;
        self.gpu.rope_kv_write(&RopeKvWrite {
            qkv,
            bias,
            rope_cs: self.ws.rope_cs.dev(),
            slots: self.inputs.slots,
            k_cache,
            v_cache,
            kv_out: self.streaming.then(|| self.ws.kv_out.dev()),
            q_out: self.wgmma_step.then(|| self.ws.attn.dev()),
            q_scale: self.scale(),
            heads: self.heads,
            rows: self.rows(),
        })?;
        self.mark("rope_kv_write")
    }

    /// Attention over the paged cache into the attention output: decode
    /// attention for decode steps, else the step's prefill kernel.
    fn attend(&mut self, li: usize) -> Result<(), CudaError> {
        let kv = self.paged_kv(li);
        let out = self.ws.attn.dev();
        if self.plan.decode {
            self.gpu.decode_attention(
                self.pdl,
                &DecodeAttention {
                    qkv: self.ws.qkv.dev(),
                    kv,
                    positions: self.inputs.positions,
                    scratch: self.ws.split_scratch(),
                    out,
                    heads: self.heads,
                    seqs: self.plan.seqs,
                    splits: self.plan.splits,
                    scale: self.scale(),
                },
            )?;
        } else {
            let source = match (self.prefill, self.pool.tma.as_ref()) {
                // The wgmma kernel reads K and V through the pool's TMA map,
                // from this layer's rows, and the query as rope_kv_write left
                // it (`q_out`).
                (PrefillKernel::Wgmma, Some(map)) => {
                    let slots = self.pool.num_blocks * self.pool.block_size;
                    let k_row0 = (2 * li * slots) as i32;
                    PrefillSource::Tma {
                        q16: out,
                        map,
                        k_row0,
                        v_row0: k_row0 + slots as i32,
                    }
                }
                (PrefillKernel::Wgmma, None) => {
                    unreachable!("init_kv_cache picks wgmma only with the pool's TMA map")
                }
                _ => PrefillSource::Pointers {
                    qkv: self.ws.qkv.dev(),
                    scale: self.scale(),
                },
            };
            self.gpu.prefill_attention(
                self.prefill,
                &PrefillAttention {
                    out,
                    source,
                    kv,
                    positions: self.inputs.positions,
                    tiles: self.inputs.tiles,
                    heads: self.heads,
                },
            )?;
        }
        self.mark("attention")
    }

    /// `x += input · w^T` (`k` inputs a row), then the all-reduce of the
    /// residual under tensor parallelism. Under tensor parallelism only rank
    /// 0 adds its projections onto the residual; the others write their
    /// partial sums, and the all-reduce makes the residual whole on every
    /// rank. `marks`: the fused and the GEMM path's profiling names.
    fn add_projection(
        &mut self,
        w: Dev<bf16>,
        input: Dev<bf16>,
        k: usize,
        marks: (&'static str, &'static str),
    ) -> Result<(), CudaError> {
        let adds_residual = self.tp.is_none_or(|c| c.rank == 0);
        let (x, hidden) = (self.ws.x.dev(), self.cfg.hidden_size);
        if self.gemv.is_some() {
            self.gpu.gemv_out(
                &self.gemv_launch,
                &GemvOut {
                    out: x,
                    w,
                    input: GemvInput::Bf16(input),
                    eps: self.eps(),
                    k,
                    n: hidden,
                    accumulate: adds_residual,
                    rows: self.rows(),
                },
            )?;
            self.mark(marks.0)?;
        } else {
            let beta = if adds_residual { 1.0 } else { 0.0 };
            self.gpu
                .gemm((self.rows(), hidden, k), input.into(), w, x.into(), beta)?;
            self.mark(marks.1)?;
        }
        if let Some(comm) = self.tp {
            comm.all_reduce_sum_f32(x.addr(), self.rows() * hidden, self.gpu.cu_stream())?;
            self.mark("all_reduce")?;
        }
        Ok(())
    }

    /// The final norm of the rows wanting logits, the output head and the
    /// sampler over `head_rows` rows; `head_gemv`: whether they run the fused
    /// projection.
    fn head(&mut self, head_rows: usize, head_gemv: bool) -> Result<(), CudaError> {
        if head_rows == 0 {
            return Ok(());
        }
        let (x, logits) = (self.ws.x.dev(), self.ws.logits.dev());
        let output = self.weights.output().dev();
        let final_norm = self.weights.final_norm.dev();
        let (hidden, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        if head_gemv {
            // Final norm of the gathered rows and the output head in one kernel.
            self.gpu.gemv_out(
                &self.gemv_launch,
                &GemvOut {
                    out: logits,
                    w: output,
                    input: GemvInput::Normed {
                        x,
                        norm: final_norm,
                        gather: self.inputs.logit_rows,
                    },
                    eps: self.eps(),
                    k: hidden,
                    n: vocab,
                    accumulate: false,
                    rows: head_rows,
                },
            )?;
        } else {
            let normed = self.ws.normed.dev();
            self.gpu.rms_norm(&RmsNorm {
                out: normed,
                x,
                weight: final_norm,
                gather: Some(self.inputs.logit_rows),
                rows: head_rows,
                hidden,
                eps: self.eps(),
            })?;
            self.gpu.gemm(
                (head_rows, vocab, hidden),
                normed.into(),
                output,
                logits.into(),
                0.0,
            )?;
        }
        self.gpu.sample_rows(
            self.pdl,
            &SampleRows {
                next: self.ws.next_tokens.dev(),
                logits,
                params: self.inputs.sampling,
                masks: None,
                rows: head_rows,
                vocab,
            },
        )?;
        self.mark("output_head")
    }
}

impl CudaBackend {
    /// Enqueues the whole forward pass of a planned step on the stream. With
    /// a sink, each layer's new K and V are copied to pinned memory and
    /// handed over while the next layer computes.
    pub(super) fn enqueue(
        &mut self,
        plan: &StepPlan,
        head_rows: usize,
        mut sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError> {
        let pool = self
            .kv
            .as_ref()
            .ok_or(BackendError::KvCacheNotInitialised)?;
        let wgmma_step = !plan.decode && self.prefill == PrefillKernel::Wgmma;
        // Other steps of 1, 2 or 4 tokens that stream no KV run the fused
        // projections.
        let gemv = if sink.is_none() && !wgmma_step {
            self.gemv_for(plan.tokens)
        } else {
            None
        };
        let head_gemv = self.gemv_for(head_rows).is_some();
        let gemv_launch = GemvLaunch {
            early: self.tuning.pdl,
            max_blocks: self.tuning.gemv_max_blocks,
            smem_floor: self.gemv_floor(),
        };
        let mut fwd = Forward {
            gpu: &self.gpu,
            cfg: &self.cfg,
            heads: Heads::of(&self.cfg),
            plan,
            ws: &self.ws,
            weights: &self.weights,
            pool,
            inv_freq: self.inv_freq.dev(),
            inputs: StepInputs::new(pool.inputs.dev(), &pool.layout, plan.tiles),
            profiler: self.profiler.as_mut(),
            gemv,
            gemv_launch,
            prefill: self.prefill,
            wgmma_step,
            streaming: sink.is_some(),
            pdl: self.tuning.pdl,
            f32_gate_up: self.tuning.f32_gate_up,
            tp: self.tp,
        };
        fwd.mark("start")?;
        fwd.embed()?;
        let kv_dim = fwd.heads.kv_dim();
        let mut pending: Option<(usize, cudarc::driver::CudaEvent)> = None;
        for li in 0..self.weights.layers.len() {
            fwd.attention(li)?;
            fwd.mlp(li)?;
            if let Some(sink) = sink.as_deref_mut() {
                // Copy this layer's K|V rows out, then hand the previous
                // layer's to the sink while this one's copy runs.
                let host: &mut [f32] = self.host_kv[li % 2].as_mut_slice(plan.tokens * 2 * kv_dim);
                fwd.gpu.copy_from(fwd.ws.kv_out.dev(), host)?;
                let event = fwd.gpu.stream.record_event(None).map_err(CudaError::from)?;
                if let Some((prev, ev)) = pending.take() {
                    ev.synchronize().map_err(CudaError::from)?;
                    deliver(&self.host_kv[prev % 2], prev, plan, kv_dim, sink);
                }
                pending = Some((li, event));
            }
        }
        if let (Some(sink), Some((prev, ev))) = (sink, pending.take()) {
            ev.synchronize().map_err(CudaError::from)?;
            deliver(&self.host_kv[prev % 2], prev, plan, kv_dim, sink);
        }
        fwd.head(head_rows, head_gemv)?;
        Ok(())
    }
}

/// Hands one layer's K and V rows (staged as `[rows, K | V]`) to the sink,
/// per sequence.
fn deliver(
    staged: &PinnedBuffer,
    layer: usize,
    plan: &StepPlan,
    kv_dim: usize,
    sink: &mut dyn KvLayerSink,
) {
    let rows: &[f32] = staged.as_slice(plan.tokens * 2 * kv_dim);
    for (si, &(start, n)) in plan.seq_rows.iter().enumerate() {
        // The sink splits K from V itself, in the same pass as it encodes.
        let seq_rows = &rows[start * 2 * kv_dim..(start + n) * 2 * kv_dim];
        sink.layer_rows_computed(layer, si, seq_rows, kv_dim);
    }
}
