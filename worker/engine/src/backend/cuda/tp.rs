//! Tensor parallelism inside one worker (`--tensor-parallel-size N`),
//! Megatron-style: rank `r` of `N` GPUs holds the query heads, KV heads and
//! FFN slice `r` of every layer (Q/K/V and gate/up split by rows, the output
//! and down projections by columns), so attention and the MLP need no
//! communication until the output and down projections, whose partial sums
//! an NCCL all-reduce adds up (two per layer). The embedding, the norms and
//! the output head stay whole on every rank: the residual stream is the same
//! on all of them, and rank 0's logits and sampled tokens are the step's.
//!
//! One process drives the group: rank 0 runs on the caller's (engine) thread,
//! every other rank on a thread of its own that owns that GPU's
//! [`CudaBackend`] (own context and stream); each step is handed to all ranks
//! at once and they meet in the all-reduces on the GPUs. CUDA graphs capture
//! the all-reduces like any other kernel. Every rank validates the same
//! inputs the same way, so an invalid step fails on all of them before any
//! collective is enqueued.
//!
//! The KV pool is sharded by KV head: each rank's pool holds its heads of
//! every block (the block ids are shared). Exports and imports (gRPC
//! transfer, prefix streaming) carry whole heads: a rank reads and writes its
//! slice, and the slices are merged here, so the wire format does not depend
//! on the group size. For cuda-ipc a group exports one pool handle per rank;
//! a prefill group of the same size opens them and rank `r` copies its heads
//! into the decode group's rank `r` (GPU to GPU, no merging); groups of
//! different sizes are refused with both sizes named, and the transfer goes
//! over gRPC.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use super::ipc::{check_ranks, KvPoolExport, PeerKvTarget, PeerWrite};
use super::nccl::NcclGroup;
use super::{CudaBackend, CudaOptions};
use crate::backend::{
    check_kv_layer, check_sampling_rows, check_weights, logit_rows, BackendError, ComputeBackend,
    DeviceSampling, KvLayerSink, SeqInput, WeightsSource,
};
use tandem_api::types::{KvDtype, KvExport};
use tandem_model::{LayerWeights, ModelConfig, Tensor, Weights};

#[derive(Debug, thiserror::Error)]
pub enum TpError {
    #[error("--tensor-parallel-size must be at least 1")]
    ZeroSize,
    #[error(
        "tensor parallelism runs on CUDA GPUs: --tensor-parallel-size {0} needs --device cuda \
         (or cuda:K), not cpu"
    )]
    NotOnCpu(usize),
    #[error(
        "--tensor-parallel-size {size} does not divide the model's {what} ({count}); \
         each GPU must hold a whole share"
    )]
    NotDivisible {
        size: usize,
        what: &'static str,
        count: usize,
    },
    #[error("tensor-parallel rank {0} stopped (its thread panicked); the worker must restart")]
    RankGone(usize),
    /// cuda-ipc with a peer whose pool is split another way.
    #[error("{0}")]
    PeerGroup(String),
}

/// The config of one rank's shard: `1/size` of the query heads, KV heads and
/// FFN width; everything else whole.
pub fn shard_config(cfg: &ModelConfig, size: usize) -> Result<ModelConfig, TpError> {
    if size == 0 {
        return Err(TpError::ZeroSize);
    }
    for (what, count) in [
        ("attention heads", cfg.num_heads),
        ("KV heads", cfg.num_kv_heads),
        ("intermediate size", cfg.intermediate_size),
    ] {
        if !count.is_multiple_of(size) {
            return Err(TpError::NotDivisible { size, what, count });
        }
    }
    Ok(ModelConfig {
        num_heads: cfg.num_heads / size,
        num_kv_heads: cfg.num_kv_heads / size,
        intermediate_size: cfg.intermediate_size / size,
        ..cfg.clone()
    })
}

/// Rows `start .. start + count` of a `[rows, cols]` matrix (or of a vector).
fn rows(t: &Tensor, start: usize, count: usize) -> Tensor {
    let cols: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = count;
    Tensor::new(shape, t.data[start * cols..(start + count) * cols].to_vec())
}

/// Columns `start .. start + count` of a `[rows, cols]` matrix.
fn columns(t: &Tensor, start: usize, count: usize) -> Tensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut data = Vec::with_capacity(r * count);
    for i in 0..r {
        data.extend_from_slice(&t.data[i * c + start..i * c + start + count]);
    }
    Tensor::new(vec![r, count], data)
}

/// Rank `rank`'s share of validated full-model weights (`cfg` is the full
/// model's): its rows of Q, K, V (and their biases), gate and up; its
/// columns of the output and down projections; the rest copied whole.
pub fn shard_weights(cfg: &ModelConfig, w: &Weights, size: usize, rank: usize) -> Weights {
    let q = cfg.num_heads / size * cfg.head_dim;
    let kv = cfg.num_kv_heads / size * cfg.head_dim;
    let f = cfg.intermediate_size / size;
    let layers = w
        .layers
        .iter()
        .map(|l| LayerWeights {
            attn_norm: l.attn_norm.clone(),
            wq: rows(&l.wq, rank * q, q),
            wk: rows(&l.wk, rank * kv, kv),
            wv: rows(&l.wv, rank * kv, kv),
            bq: l.bq.as_ref().map(|b| rows(b, rank * q, q)),
            bk: l.bk.as_ref().map(|b| rows(b, rank * kv, kv)),
            bv: l.bv.as_ref().map(|b| rows(b, rank * kv, kv)),
            wo: columns(&l.wo, rank * q, q),
            ffn_norm: l.ffn_norm.clone(),
            w_gate: rows(&l.w_gate, rank * f, f),
            w_up: rows(&l.w_up, rank * f, f),
            w_down: columns(&l.w_down, rank * f, f),
        })
        .collect();
    Weights {
        embed_tokens: w.embed_tokens.clone(),
        layers,
        final_norm: w.final_norm.clone(),
        lm_head: w.lm_head.clone(),
    }
}

/// Rank `rank`'s KV heads of whole-head rows (`[tokens, kv_heads * head_dim]`,
/// `row_width` values a row) split `size` ways.
pub fn split_heads(data: &[f32], row_width: usize, size: usize, rank: usize) -> Vec<f32> {
    let part = row_width / size;
    data.chunks_exact(row_width)
        .flat_map(|row| &row[rank * part..(rank + 1) * part])
        .copied()
        .collect()
}

/// Whole-head rows from every rank's slice of `width` values per row (rank
/// order), the inverse of [`split_heads`].
pub fn merge_head_rows(parts: &[&[f32]], width: usize) -> Vec<f32> {
    let tokens = parts.first().map_or(0, |p| p.len() / width.max(1));
    let mut out = Vec::with_capacity(tokens * width * parts.len());
    for t in 0..tokens {
        for p in parts {
            out.extend_from_slice(&p[t * width..(t + 1) * width]);
        }
    }
    out
}

/// A step's batch copied out of the caller's borrows, for the rank threads.
struct OwnedSeq {
    tokens: Vec<u32>,
    start_pos: usize,
    block_table: Vec<u32>,
    need_logits: bool,
}

fn owned(batch: &[SeqInput<'_>]) -> Arc<Vec<OwnedSeq>> {
    Arc::new(
        batch
            .iter()
            .map(|s| OwnedSeq {
                tokens: s.tokens.to_vec(),
                start_pos: s.start_pos,
                block_table: s.block_table.to_vec(),
                need_logits: s.need_logits,
            })
            .collect(),
    )
}

fn inputs(seqs: &[OwnedSeq]) -> Vec<SeqInput<'_>> {
    seqs.iter()
        .map(|s| SeqInput {
            tokens: &s.tokens,
            start_pos: s.start_pos,
            block_table: &s.block_table,
            need_logits: s.need_logits,
        })
        .collect()
}

/// One rank's streamed KV, in the order the backend produced it.
#[derive(Default)]
struct LayerCollector {
    layers: Vec<(usize, usize, Vec<f32>, Vec<f32>)>,
}

impl KvLayerSink for LayerCollector {
    fn layer_computed(&mut self, layer: usize, seq_index: usize, k: &[f32], v: &[f32]) {
        self.layers.push((layer, seq_index, k.to_vec(), v.to_vec()));
    }
}

type Job = Box<dyn FnOnce(&mut CudaBackend) + Send>;

/// Work handed to every rank: called with the rank's backend and its rank.
type RankJob<R> = Arc<dyn Fn(&mut CudaBackend, usize) -> R + Send + Sync>;

/// A rank other than 0: the thread owning its backend, fed jobs in order.
struct RankThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl RankThread {
    fn spawn(rank: usize, mut backend: CudaBackend) -> Result<Self, BackendError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(format!("tandem-tp-rank-{rank}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut backend);
                }
            })
            .map_err(|e| {
                BackendError::Cuda(super::CudaError::Driver(format!(
                    "starting the thread of tensor-parallel rank {rank}: {e}"
                )))
            })?;
        Ok(Self {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for RankThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop; its backend goes with it.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A model sharded over `size` GPUs (see the module's documentation): the
/// engine's [`ComputeBackend`] for `--tensor-parallel-size` > 1.
pub struct TensorParallelBackend {
    cfg: ModelConfig,
    size: usize,
    // Field order is drop order: every rank's backend goes before the
    // communicators they use.
    lead: CudaBackend,
    ranks: Vec<RankThread>,
    _group: NcclGroup,
    /// The smallest rank's KV budget: every rank's pool has as many blocks.
    kv_budget: usize,
    /// Device bytes of one rank's weights (rank 0's; the others' are equal).
    rank_weight_bytes: usize,
}

impl TensorParallelBackend {
    /// Opens GPUs `first .. first + size`, creates the group's NCCL
    /// communicators and loads each rank's shard of `weights` (host weights
    /// are split here; dummy weights are generated per rank in the shard's
    /// shape).
    pub fn new(
        first: usize,
        size: usize,
        cfg: ModelConfig,
        weights: WeightsSource<'_>,
        opts: CudaOptions,
    ) -> Result<Self, BackendError> {
        let shard = shard_config(&cfg, size)?;
        if let WeightsSource::Host(w) = weights {
            check_weights(&cfg, w)?;
        }
        super::device::check_gpus(first, size)?;
        let ordinals: Vec<usize> = (first..first + size).collect();
        let group = NcclGroup::new(&ordinals)?;
        let mut backends = Vec::with_capacity(size);
        for (rank, &ordinal) in ordinals.iter().enumerate() {
            let mut b = match weights {
                WeightsSource::Host(w) => {
                    let part = shard_weights(&cfg, w, size, rank);
                    CudaBackend::new(ordinal, shard.clone(), &part, opts.clone())?
                }
                WeightsSource::Dummy { seed } => {
                    CudaBackend::new_dummy(ordinal, shard.clone(), seed, opts.clone())?
                }
            };
            b.join_tensor_parallel_group(group.rank(rank));
            backends.push(b);
        }
        let kv_budget = backends
            .iter()
            .map(|b| b.kv_budget_bytes())
            .min()
            .unwrap_or(0);
        let mut backends = backends.into_iter();
        let lead = backends.next().expect("size >= 1");
        let rank_weight_bytes = lead.weight_bytes();
        let ranks = backends
            .enumerate()
            .map(|(i, b)| RankThread::spawn(i + 1, b))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(
            size,
            first_gpu = first,
            rank_weights_mib = rank_weight_bytes >> 20,
            "tensor-parallel backend ready"
        );
        Ok(Self {
            cfg,
            size,
            lead,
            ranks,
            _group: group,
            kv_budget,
            rank_weight_bytes,
        })
    }

    /// GPUs the model is sharded over.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The first GPU's name.
    pub fn device_name(&self) -> &str {
        self.lead.device_name()
    }

    /// Device bytes of one rank's weights.
    pub fn rank_weight_bytes(&self) -> usize {
        self.rank_weight_bytes
    }

    /// Hands `job` to every rank but 0; their results come through the
    /// returned receivers, in rank order.
    fn dispatch<R: Send + 'static>(
        &self,
        job: &RankJob<R>,
    ) -> Result<Vec<mpsc::Receiver<R>>, BackendError> {
        let mut replies = Vec::with_capacity(self.ranks.len());
        for (i, r) in self.ranks.iter().enumerate() {
            let rank = i + 1;
            let (tx, rx) = mpsc::sync_channel(1);
            let job = job.clone();
            let sent = r.jobs.as_ref().is_some_and(|q| {
                q.send(Box::new(move |b: &mut CudaBackend| {
                    let _ = tx.send(job(b, rank));
                }))
                .is_ok()
            });
            if !sent {
                return Err(TpError::RankGone(rank).into());
            }
            replies.push(rx);
        }
        Ok(replies)
    }

    /// Rank 0's result followed by the other ranks' (waiting for them).
    fn gather<R>(lead: R, replies: Vec<mpsc::Receiver<R>>) -> Result<Vec<R>, BackendError> {
        let mut out = Vec::with_capacity(replies.len() + 1);
        out.push(lead);
        for (i, rx) in replies.into_iter().enumerate() {
            out.push(rx.recv().map_err(|_| TpError::RankGone(i + 1))?);
        }
        Ok(out)
    }

    /// Runs `job` on every rank at once (rank 0 on this thread) and returns
    /// the results in rank order.
    fn on_every_rank<R: Send + 'static>(
        &mut self,
        job: impl Fn(&mut CudaBackend, usize) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>, BackendError> {
        let job: RankJob<R> = Arc::new(job);
        let replies = self.dispatch(&job)?;
        let lead = job(&mut self.lead, 0);
        Self::gather(lead, replies)
    }

    /// Rank 0's result, after checking every rank's.
    fn lead_result<T>(results: Vec<Result<T, BackendError>>) -> Result<T, BackendError> {
        let mut results = results.into_iter();
        let lead = results.next().expect("rank 0");
        for r in results {
            r?;
        }
        lead
    }

    /// Turns decode CUDA graphs on or off on every rank.
    pub fn set_cuda_graphs(&mut self, on: bool) -> Result<(), BackendError> {
        self.on_every_rank(move |b, _| b.set_cuda_graphs(on))?;
        Ok(())
    }

    /// Starts per-operation profiling on every rank (eager steps).
    pub fn start_profile(&mut self) -> Result<(), BackendError> {
        self.on_every_rank(|b, _| b.start_profile())?;
        Ok(())
    }

    /// Stops profiling; rank 0's GPU milliseconds per step of each operation
    /// (`all_reduce` is the time in the all-reduces, waiting for the slowest
    /// rank included).
    pub fn take_profile(&mut self) -> Result<Vec<(String, f64)>, BackendError> {
        let mut all = self.on_every_rank(|b, _| b.take_profile())?;
        Ok(all.swap_remove(0))
    }

    /// Like [`CudaBackend::forward_greedy`].
    pub fn forward_greedy(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<u32>, BackendError> {
        let seqs = owned(batch);
        let results = self.on_every_rank(move |b, _| b.forward_greedy(&inputs(&seqs)))?;
        Self::lead_result(results)
    }

    /// Runs one step on every rank; rank 0 fills `out` (logits or sampled
    /// tokens), the others only sample (greedy) so nothing big comes back.
    /// With `sink`, each rank's KV heads are collected and merged into
    /// whole-head rows once the step is done.
    fn step(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: Option<Vec<DeviceSampling>>,
        logits: Option<&mut Vec<f32>>,
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        let seqs = owned(batch);
        let streaming = sink.is_some();
        let want_logits = logits.is_some();
        let rows = logit_rows(batch);
        let results = self.on_every_rank(move |b, rank| {
            let inputs = inputs(&seqs);
            let mut collect = streaming.then(LayerCollector::default);
            let sink = collect.as_mut().map(|c| c as &mut dyn KvLayerSink);
            let mut l = Vec::new();
            let tokens = if rank == 0 && want_logits {
                b.forward(&inputs, &mut l, sink).map(|()| Vec::new())
            } else {
                let rules = match &sampling {
                    Some(s) if rank == 0 => s.clone(),
                    _ => vec![DeviceSampling::GREEDY; rows],
                };
                b.forward_sampled(&inputs, &rules, sink)
            };
            tokens.map(|t| (t, l, collect))
        })?;
        let mut parts = Vec::with_capacity(self.size);
        for r in results {
            parts.push(r?);
        }
        if let Some(out) = logits {
            *out = std::mem::take(&mut parts[0].1);
        }
        if let Some(sink) = sink {
            let width = self.cfg.num_kv_heads / self.size * self.cfg.head_dim;
            let collected: Vec<LayerCollector> = parts
                .iter_mut()
                .map(|p| p.2.take().unwrap_or_default())
                .collect();
            for (i, &(layer, seq, _, _)) in collected[0].layers.iter().enumerate() {
                let ks: Vec<&[f32]> = collected.iter().map(|c| &c.layers[i].2[..]).collect();
                let vs: Vec<&[f32]> = collected.iter().map(|c| &c.layers[i].3[..]).collect();
                sink.layer_computed(
                    layer,
                    seq,
                    &merge_head_rows(&ks, width),
                    &merge_head_rows(&vs, width),
                );
            }
        }
        Ok(std::mem::take(&mut parts[0].0))
    }
}

impl ComputeBackend for TensorParallelBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of one rank's pool per token: the engine sizes the pool (in
    /// blocks, the same on every rank) from this and the per-rank budget.
    fn kv_bytes_per_token(&self) -> usize {
        self.lead.kv_bytes_per_token()
    }

    fn kv_dtype(&self) -> KvDtype {
        self.lead.kv_dtype()
    }

    fn kv_cache_budget_bytes(&self) -> Option<usize> {
        Some(self.kv_budget)
    }

    fn init_kv_cache(&mut self, block_size: usize, num_blocks: usize) -> Result<(), BackendError> {
        let results = self.on_every_rank(move |b, _| b.init_kv_cache(block_size, num_blocks))?;
        Self::lead_result(results)
    }

    fn forward(
        &mut self,
        batch: &[SeqInput<'_>],
        logits: &mut Vec<f32>,
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError> {
        self.step(batch, None, Some(logits), sink).map(|_| ())
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn forward_sampled(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        check_sampling_rows(batch, sampling)?;
        self.step(batch, Some(sampling.to_vec()), None, sink)
    }

    fn read_kv(&self, block_ids: &[u32], num_tokens: usize) -> Result<KvExport, BackendError> {
        let ids = Arc::new(block_ids.to_vec());
        let job: RankJob<_> = Arc::new(move |b: &mut CudaBackend, _| b.read_kv(&ids, num_tokens));
        let replies = self.dispatch(&job)?;
        let parts = Self::gather(self.lead.read_kv(block_ids, num_tokens), replies)?;
        let parts = parts.into_iter().collect::<Result<Vec<_>, _>>()?;
        let width = self.cfg.num_kv_heads / self.size * self.cfg.head_dim;
        let layers = (0..self.cfg.num_layers)
            .map(|l| {
                let ks: Vec<&[f32]> = parts.iter().map(|p| &p.layers[l].0[..]).collect();
                let vs: Vec<&[f32]> = parts.iter().map(|p| &p.layers[l].1[..]).collect();
                (merge_head_rows(&ks, width), merge_head_rows(&vs, width))
            })
            .collect();
        Ok(KvExport {
            dtype: KvDtype::F32,
            num_tokens,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            layers,
        })
    }

    fn write_kv_layer(
        &mut self,
        block_ids: &[u32],
        start_pos: usize,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), BackendError> {
        let w = check_kv_layer(&self.cfg, layer, k, v)?;
        let size = self.size;
        let slices: Arc<Vec<(Vec<f32>, Vec<f32>)>> = Arc::new(
            (0..size)
                .map(|r| (split_heads(k, w, size, r), split_heads(v, w, size, r)))
                .collect(),
        );
        let ids = Arc::new(block_ids.to_vec());
        let results = self.on_every_rank(move |b, rank| {
            let (k, v) = &slices[rank];
            b.write_kv_layer(&ids, start_pos, layer, k, v)
        })?;
        Self::lead_result(results)
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        let results = self.on_every_rank(move |b, _| b.copy_block(src, dst))?;
        Self::lead_result(results)
    }

    /// Every rank's pool, one IPC handle each (rank order): a decode group's
    /// pool as a prefill group of the same size writes into it, rank by rank.
    fn kv_pool_export(&self) -> Result<Option<KvPoolExport>, BackendError> {
        let job: RankJob<_> = Arc::new(|b: &mut CudaBackend, _| b.kv_pool_export());
        let replies = self.dispatch(&job)?;
        let mut ranks = Vec::with_capacity(self.size);
        for r in Self::gather(self.lead.kv_pool_export(), replies)? {
            match r? {
                Some(pool) => ranks.push(pool),
                None => return Ok(None),
            }
        }
        KvPoolExport::from_ranks(ranks)
            .map(Some)
            .map_err(|e| BackendError::Cuda(super::CudaError::Unsupported(e)))
    }

    /// Maps rank `r` of the peer group's pool on rank `r` (peer access from
    /// this group's GPU `r` to the peer's); the groups must be of equal size.
    fn open_peer_kv(&mut self, pool: &KvPoolExport) -> Result<(), BackendError> {
        check_ranks(self.size, pool).map_err(TpError::PeerGroup)?;
        let pool = Arc::new(pool.clone());
        let results = self.on_every_rank(move |b, rank| {
            let own = pool.rank(rank).expect("sizes checked");
            b.open_peer_kv(&own)
        })?;
        Self::lead_result(results)
    }

    /// Every rank copies its heads of the prompt's blocks into the same
    /// blocks of the peer's rank, all ranks at once; done when the slowest
    /// copy is (its GPU time is reported).
    fn write_kv_to_peer(
        &mut self,
        block_ids: &[u32],
        num_tokens: usize,
        target: &PeerKvTarget,
    ) -> Result<PeerWrite, BackendError> {
        check_ranks(self.size, &target.pool).map_err(TpError::PeerGroup)?;
        let ids = Arc::new(block_ids.to_vec());
        let target = Arc::new(target.clone());
        let results = self.on_every_rank(move |b, rank| {
            let own = PeerKvTarget {
                pool: target.pool.rank(rank).expect("sizes checked"),
                block_ids: target.block_ids.clone(),
            };
            b.write_kv_to_peer(&ids, num_tokens, &own)
        })?;
        let mut total = PeerWrite {
            bytes: 0,
            seconds: 0.0,
        };
        for r in results {
            let w = r?;
            total.bytes += w.bytes;
            total.seconds = total.seconds.max(w.seconds);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_model::{testing, Architecture};

    fn matvec(w: &Tensor, x: &[f32]) -> Vec<f32> {
        (0..w.shape[0])
            .map(|i| w.row(i).iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    fn rms_norm(x: &[f32], w: &Tensor, eps: f32) -> Vec<f32> {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let s = 1.0 / (ms + eps).sqrt();
        x.iter().zip(&w.data).map(|(v, g)| v * s * g).collect()
    }

    fn add(a: &mut [f32], b: &[f32]) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }

    /// The output projection of causal GQA attention over `x`'s rows, as
    /// the layer `l` of a model shaped `cfg` computes it (one row per token).
    fn attention_out(cfg: &ModelConfig, l: &LayerWeights, x: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let hd = cfg.head_dim;
        let group = cfg.num_heads / cfg.num_kv_heads;
        let project = |w: &Tensor, b: &Option<Tensor>, row: &[f32]| {
            let mut out = matvec(w, &rms_norm(row, &l.attn_norm, cfg.rms_norm_eps));
            if let Some(b) = b {
                add(&mut out, &b.data);
            }
            out
        };
        let q: Vec<Vec<f32>> = x.iter().map(|r| project(&l.wq, &l.bq, r)).collect();
        let k: Vec<Vec<f32>> = x.iter().map(|r| project(&l.wk, &l.bk, r)).collect();
        let v: Vec<Vec<f32>> = x.iter().map(|r| project(&l.wv, &l.bv, r)).collect();
        (0..x.len())
            .map(|t| {
                let mut attn = vec![0f32; cfg.num_heads * hd];
                for h in 0..cfg.num_heads {
                    let kvh = h / group;
                    let qh = &q[t][h * hd..(h + 1) * hd];
                    let scores: Vec<f32> = (0..=t)
                        .map(|s| {
                            let kh = &k[s][kvh * hd..(kvh + 1) * hd];
                            qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f32 = exp.iter().sum();
                    for (s, e) in exp.iter().enumerate() {
                        for d in 0..hd {
                            attn[h * hd + d] += e / total * v[s][kvh * hd + d];
                        }
                    }
                }
                matvec(&l.wo, &attn)
            })
            .collect()
    }

    /// The down projection of the SwiGLU MLP of layer `l` over `x`'s rows.
    fn mlp_out(cfg: &ModelConfig, l: &LayerWeights, x: &[Vec<f32>]) -> Vec<Vec<f32>> {
        x.iter()
            .map(|row| {
                let n = rms_norm(row, &l.ffn_norm, cfg.rms_norm_eps);
                let gate = matvec(&l.w_gate, &n);
                let up = matvec(&l.w_up, &n);
                let act: Vec<f32> = gate
                    .iter()
                    .zip(&up)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                matvec(&l.w_down, &act)
            })
            .collect()
    }

    /// One decoder layer: each half's projections summed over the ranks
    /// (what the all-reduces do) and added to the residual once.
    fn layer(cfg: &ModelConfig, shards: &[&LayerWeights], x: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let sum = |parts: Vec<Vec<Vec<f32>>>, base: &[Vec<f32>]| -> Vec<Vec<f32>> {
            let mut out = base.to_vec();
            for p in parts {
                for (o, r) in out.iter_mut().zip(&p) {
                    add(o, r);
                }
            }
            out
        };
        let after_attention = sum(shards.iter().map(|l| attention_out(cfg, l, x)).collect(), x);
        sum(
            shards
                .iter()
                .map(|l| mlp_out(cfg, l, &after_attention))
                .collect(),
            &after_attention,
        )
    }

    #[test]
    fn sharded_layers_summed_over_ranks_reproduce_the_whole_model() {
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let cfg = ModelConfig {
                num_heads: 8,
                num_kv_heads: 4,
                intermediate_size: 96,
                ..testing::tiny_config(arch)
            };
            let w = testing::random_weights(&cfg, 11);
            let x: Vec<Vec<f32>> = (0..5)
                .map(|t| {
                    (0..cfg.hidden_size)
                        .map(|i| ((t * 31 + i * 7) % 17) as f32 / 8.0 - 1.0)
                        .collect()
                })
                .collect();
            for size in [2, 4] {
                let shard_cfg = shard_config(&cfg, size).unwrap();
                let shards: Vec<Weights> = (0..size)
                    .map(|r| shard_weights(&cfg, &w, size, r))
                    .collect();
                // Every shard has the shapes its config implies.
                for s in &shards {
                    crate::backend::check_weights(&shard_cfg, s).unwrap();
                }
                let (mut whole, mut split) = (x.clone(), x.clone());
                for li in 0..cfg.num_layers {
                    whole = layer(&cfg, &[&w.layers[li]], &whole);
                    let parts: Vec<&LayerWeights> = shards.iter().map(|s| &s.layers[li]).collect();
                    split = layer(&shard_cfg, &parts, &split);
                }
                let worst = whole
                    .iter()
                    .flatten()
                    .zip(split.iter().flatten())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{arch:?} size {size}: max difference {worst}");
                // And the shards differ: a rank does not hold the whole model.
                assert_ne!(shards[0].layers[0].wq, shards[1].layers[0].wq);
                assert_eq!(
                    shards[0].layers[0].wq.shape[0],
                    cfg.num_heads / size * cfg.head_dim
                );
            }
        }
    }

    #[test]
    fn sizes_that_do_not_divide_the_model_are_refused_naming_the_count() {
        let smollm = tandem_model::dummy::config("smollm2-135m").unwrap();
        let err = shard_config(&smollm, 2).unwrap_err().to_string();
        assert!(
            err.contains("attention heads (9)") && err.contains("size 2"),
            "{err}"
        );
        let cfg = ModelConfig {
            num_heads: 8,
            num_kv_heads: 2,
            intermediate_size: 96,
            ..testing::tiny_config(Architecture::Llama)
        };
        let err = shard_config(&cfg, 4).unwrap_err().to_string();
        assert!(err.contains("KV heads (2)"), "{err}");
        let err = shard_config(
            &ModelConfig {
                num_kv_heads: 4,
                intermediate_size: 90,
                ..cfg.clone()
            },
            4,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("intermediate size (90)"), "{err}");
        assert!(matches!(shard_config(&cfg, 0), Err(TpError::ZeroSize)));
        let one = shard_config(&cfg, 1).unwrap();
        assert_eq!(one, cfg);
        let two = shard_config(&cfg, 2).unwrap();
        assert_eq!(
            (
                two.num_heads,
                two.num_kv_heads,
                two.intermediate_size,
                two.hidden_size
            ),
            (4, 1, 48, cfg.hidden_size)
        );
    }

    #[test]
    fn kv_heads_split_per_rank_merge_back_to_whole_rows() {
        // 3 tokens of 4 KV heads x head_dim 2.
        let rows: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let parts: Vec<Vec<f32>> = (0..2).map(|r| split_heads(&rows, 8, 2, r)).collect();
        assert_eq!(
            parts[0],
            [0., 1., 2., 3., 8., 9., 10., 11., 16., 17., 18., 19.]
        );
        assert_eq!(parts[1][..4], [4., 5., 6., 7.]);
        let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        assert_eq!(merge_head_rows(&refs, 4), rows);
    }

    #[test]
    fn the_flag_takes_a_positive_number_of_gpus() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            device: super::super::DeviceArgs,
        }
        let parse = |args: &[&str]| Cli::try_parse_from([&["tandem"], args].concat());
        assert_eq!(parse(&[]).unwrap().device.tensor_parallel_size, 1);
        let cli = parse(&["--device", "cuda:4", "--tensor-parallel-size", "4"]).unwrap();
        assert_eq!(cli.device.tensor_parallel_size, 4);
        assert_eq!(cli.device.device, super::super::DeviceSpec::Cuda(4));
        for bad in ["0", "two", "-1"] {
            let err = parse(&[&format!("--tensor-parallel-size={bad}")])
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains("--tensor-parallel-size"), "{err}");
        }
    }

    #[test]
    fn tensor_parallelism_on_the_cpu_is_refused() {
        let cfg = testing::tiny_config(Architecture::Llama);
        let opts = CudaOptions {
            tensor_parallel_size: 2,
            ..CudaOptions::default()
        };
        let err = match crate::backend::create(
            &super::super::DeviceSpec::Cpu,
            cfg,
            WeightsSource::Dummy { seed: 1 },
            &opts,
        ) {
            Ok(_) => panic!("the CPU cannot shard a model"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("--tensor-parallel-size 2") && err.contains("cuda"),
            "{err}"
        );
    }
}
