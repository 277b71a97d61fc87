//! The engine: scheduler, paged KV block manager, sampler and compute backends.
//!
//! [`Engine::start`] moves a backend onto its own OS thread, which runs the
//! scheduling loop: take new requests and cancellations from a channel, plan a
//! step, run it on the backend, sample, stream events to each request's own
//! channel. The thread blocks when there is nothing to do. [`EngineHandle`] is
//! the cheap, cloneable front: it validates and admits requests (refusing them
//! at once when the queue is full) and implements [`Infer`].
//!
//! For disaggregation the handle also runs a prompt only, streaming its KV
//! layer by layer ([`EngineHandle::prefill_stream`], or collected:
//! [`EngineHandle::prefill_only`]), and continues a request from imported KV
//! ([`EngineHandle::generate_with_kv`]).
//!
//! ```no_run
//! # fn demo(model: tandem_model::LoadedModel) -> Result<(), Box<dyn std::error::Error>> {
//! use tandem_engine::backend::{CpuBackend, WeightStorage};
//! use tandem_engine::{Engine, EngineConfig};
//!
//! let backend = CpuBackend::new(model.config.clone(), &model.weights, WeightStorage::default())?;
//! drop(model.weights); // the backend keeps its own compact copy
//! let engine = Engine::start(
//!     Box::new(backend),
//!     EngineConfig::default(),
//!     model.tokenizer.eos_token_ids().to_vec(),
//!     model.config.max_position_embeddings,
//!     "aggregated",
//! )?;
//! # Ok(()) }
//! ```

pub mod backend;
pub mod block_manager;
pub mod sampler;
pub mod scheduler;
pub mod step_watch;
pub use tandem_api::types;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc as tmpsc, oneshot};

use backend::cuda::ipc::{KvPoolExport, PeerKvTarget};
use backend::{BackendError, ComputeBackend, DeviceSampling, KvLayerSink, SeqInput};
use block_manager::{BlockManager, KvEvent};
use sampler::{token_logprobs, Sampler};
use scheduler::{check_stop, Scheduler, SchedulerConfig, SeqId, Sequence};
use step_watch::{StepFacts, StepWatch};
use tandem_api::args;
use tandem_api::infer::{GenerateStream, Infer, InferError, OnDrop};
use tandem_api::metrics::metrics;
use tandem_guide::{Constraint, Guide, GuideError};
use types::{
    FinishReason, GenerateEvent, GenerateRequest, KvDtype, KvExport, KvLayerChunk, KvPieces,
    PrefillEvent, PrefillOutput, SamplingParams, StopParams, TokenOutput,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("cannot start the engine thread: {0}")]
    Spawn(String),
}

/// How the engine batches and how much KV cache it keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV pool; `None` sizes the pool from `kv_cache_bytes`.
    pub num_blocks: Option<usize>,
    /// KV pool memory budget used when `num_blocks` is `None`.
    pub kv_cache_bytes: usize,
    /// Tokens computed per step at most (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences in the running batch at most.
    pub max_num_seqs: usize,
    /// Requests waiting for admission at most; beyond, `InferError::Overloaded`.
    pub max_queue: usize,
    /// Compute threads; 0 uses one per core.
    pub threads: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: args::DEFAULT_BLOCK_SIZE,
            num_blocks: None,
            kv_cache_bytes: args::DEFAULT_KV_CACHE_BYTES,
            max_batch_tokens: args::DEFAULT_MAX_BATCH_TOKENS,
            max_num_seqs: args::DEFAULT_MAX_NUM_SEQS,
            max_queue: args::DEFAULT_MAX_QUEUE,
            threads: args::DEFAULT_THREADS,
        }
    }
}

/// A snapshot of the engine's state, for tests and diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Blocks holding a reusable prefix (referenced or not).
    pub kv_blocks_cached: usize,
    pub prefix_cache_hit_tokens: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Time the engine thread spent in steps outside the backend (scheduling,
    /// bookkeeping, streaming): what a GPU waits for between steps.
    pub step_host_nanos: u64,
    /// Time spent in the backend during steps.
    pub step_backend_nanos: u64,
}

enum Command {
    Generate {
        id: SeqId,
        request: GenerateRequest,
        /// The request's grammar, compiled by the caller's thread.
        constraint: Option<Constraint>,
        events: tmpsc::UnboundedSender<GenerateEvent>,
        /// Prompt KV computed elsewhere and the token sampled from it.
        import: Option<Import>,
    },
    Prefill {
        id: SeqId,
        prompt: Vec<u32>,
        sampling: SamplingParams,
        constraint: Option<Constraint>,
        events: tmpsc::UnboundedSender<PrefillEvent>,
        /// Write the KV into a peer's pool (cuda-ipc) instead of streaming it.
        peer: Option<Box<PeerKvTarget>>,
    },
    Cancel(SeqId),
    /// Takes blocks for KV a peer will write (see [`KvReservation`]).
    Reserve {
        id: u64,
        blocks: usize,
        reply: oneshot::Sender<Result<Vec<u32>, InferError>>,
    },
    ReleaseReservation(u64),
    OpenPeer {
        pool: Box<KvPoolExport>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A sampled row's grammar state, out of its request for the step.
struct Masked {
    id: SeqId,
    /// The row's index among the step's sampled rows.
    row: usize,
    constraint: Constraint,
}

/// The step's grammar states while their masks are computed on another
/// thread; [`MaskWait::wait`] joins it.
struct MaskWait<'s> {
    helper: Option<std::thread::ScopedJoinHandle<'s, Vec<Masked>>>,
    ready: Vec<Masked>,
}

impl MaskWait<'_> {
    fn is_empty(&self) -> bool {
        self.helper.is_none() && self.ready.is_empty()
    }

    /// The grammar states, their masks computed.
    fn wait(&mut self) -> &mut [Masked] {
        if let Some(helper) = self.helper.take() {
            self.ready = helper.join().expect("mask thread");
        }
        &mut self.ready
    }
}

/// Runs `forward` on this thread while another computes the next-token
/// masks of `masks` (none: no second thread); `forward` may wait for them
/// (a backend that masks where the logits are). Returns both.
fn while_preparing_masks<R>(
    masks: Vec<Masked>,
    forward: impl FnOnce(&mut MaskWait<'_>) -> R,
) -> (R, Vec<Masked>) {
    if masks.is_empty() {
        let mut wait = MaskWait {
            helper: None,
            ready: masks,
        };
        return (forward(&mut wait), wait.ready);
    }
    std::thread::scope(|scope| {
        let helper = scope.spawn(move || {
            let mut masks = masks;
            for m in &mut masks {
                // A failure stays in the constraint: `allowed` reports it.
                let _ = m.constraint.prepare();
            }
            masks
        });
        let mut wait = MaskWait {
            helper: Some(helper),
            ready: Vec::new(),
        };
        let result = forward(&mut wait);
        wait.wait();
        (result, wait.ready)
    })
}

/// Copies a grammar's allowed set into a backend's mask row; `Err` (the row
/// left as it was) when the grammar failed.
fn fill_mask_row(row: &mut [u32], constraint: &mut Constraint) -> Result<(), String> {
    let allowed = constraint.allowed().map_err(|e| e.to_string())?;
    let n = allowed.len().min(row.len());
    row[..n].copy_from_slice(&allowed[..n]);
    row[n..].fill(0);
    Ok(())
}

/// A prompt's KV computed elsewhere.
enum Import {
    /// Shipped in pieces; installed into fresh blocks.
    Kv(KvPieces, TokenOutput),
    /// Already written into these reserved blocks by a peer (cuda-ipc).
    Reserved {
        reservation: u64,
        first: TokenOutput,
    },
}

/// What the handle must know to validate requests without asking the thread.
struct Limits {
    max_queue: usize,
    max_model_len: usize,
    vocab_size: usize,
    block_size: usize,
    num_blocks: usize,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The KV pool as a peer on this node can map it (CUDA backends).
    kv_pool_export: Option<KvPoolExport>,
    /// Element type of the KV pool.
    kv_dtype: KvDtype,
}

struct Shared {
    /// Requests submitted and not yet admitted (or dropped) the first time.
    queued: AtomicUsize,
    alive: AtomicBool,
    stats: Mutex<EngineStats>,
}

/// Marks the engine dead when its thread ends, however it ends.
struct AliveGuard(Arc<Shared>);
impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

pub struct Engine;

impl Engine {
    /// Allocates the KV pool on `backend` and starts the engine thread.
    /// `max_model_len` bounds prompt plus generated tokens; `role` labels the
    /// worker metrics.
    pub fn start(
        mut backend: Box<dyn ComputeBackend>,
        cfg: EngineConfig,
        eos_token_ids: Vec<u32>,
        max_model_len: usize,
        role: &'static str,
    ) -> Result<EngineHandle, EngineError> {
        if cfg.block_size == 0 || cfg.max_batch_tokens == 0 || cfg.max_num_seqs == 0 {
            return Err(EngineError::Config(format!(
                "block_size ({}), max_batch_tokens ({}) and max_num_seqs ({}) must be positive",
                cfg.block_size, cfg.max_batch_tokens, cfg.max_num_seqs
            )));
        }
        if max_model_len < 2 {
            return Err(EngineError::Config(format!(
                "max_model_len {max_model_len} leaves no room for a prompt and a generated token"
            )));
        }
        let block_bytes = backend.kv_bytes_per_token() * cfg.block_size;
        let num_blocks = cfg
            .num_blocks
            .unwrap_or(cfg.kv_cache_bytes / block_bytes.max(1));
        if num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "a KV budget of {} bytes holds no block of {block_bytes} bytes",
                cfg.kv_cache_bytes
            )));
        }
        backend.init_kv_cache(cfg.block_size, num_blocks)?;
        // A pool that cannot be exported only rules out cuda-ipc.
        let kv_pool_export = backend.kv_pool_export().unwrap_or_else(|e| {
            tracing::warn!("the KV pool cannot be shared over CUDA IPC: {e}");
            None
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(move |i| format!("tandem-{role}-compute-{i}"))
            .build()
            .map_err(|e| EngineError::Spawn(e.to_string()))?;

        let model = backend.config().clone();
        let kv_dtype = backend.kv_dtype();
        let blocks = BlockManager::new(num_blocks, cfg.block_size);
        let kv_events = blocks.event_sender();
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: cfg.max_batch_tokens,
                max_num_seqs: cfg.max_num_seqs,
                max_model_len,
            },
            blocks,
        );
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
            stats: Mutex::new(EngineStats {
                kv_blocks_total: num_blocks,
                ..EngineStats::default()
            }),
        });
        let (tx, rx) = mpsc::channel();
        let engine_loop = EngineLoop {
            backend,
            scheduler,
            requests: HashMap::new(),
            eos_token_ids,
            max_model_len,
            shared: shared.clone(),
            role,
            rx,
            logits: Vec::new(),
            reservations: HashMap::new(),
            stats: EngineStats {
                kv_blocks_total: num_blocks,
                ..EngineStats::default()
            },
            facts: StepFacts::default(),
            watch: StepWatch::default(),
        };
        metrics()
            .kv_blocks_total
            .with_label_values(&[role])
            .set(num_blocks as i64);
        let guard = AliveGuard(shared.clone());
        std::thread::Builder::new()
            .name(format!("tandem-{role}-engine"))
            .spawn(move || {
                let _guard = guard;
                // Declared after the guard, so dropped first: the backend (and
                // its GPU state) is gone before the engine counts as stopped.
                let mut engine_loop = engine_loop;
                pool.install(|| engine_loop.run());
            })
            .map_err(|e| EngineError::Spawn(e.to_string()))?;
        Ok(EngineHandle {
            tx,
            shared,
            next_id: Arc::new(AtomicU64::new(1)),
            limits: Arc::new(Limits {
                max_queue: cfg.max_queue,
                max_model_len,
                vocab_size: model.vocab_size,
                block_size: cfg.block_size,
                num_blocks,
                num_layers: model.num_layers,
                kv_heads: model.num_kv_heads,
                head_dim: model.head_dim,
                kv_pool_export,
                kv_dtype,
            }),
            kv_events,
            guide: None,
        })
    }
}

/// The cloneable front of a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    next_id: Arc<AtomicU64>,
    limits: Arc<Limits>,
    kv_events: broadcast::Sender<KvEvent>,
    /// Compiles requests' grammars; `None` refuses them.
    guide: Option<Guide>,
}

impl EngineHandle {
    /// Lets requests carry a grammar, compiled against `guide`'s vocabulary
    /// (the model's tokenizer). Without it such requests are refused.
    pub fn with_guide(mut self, guide: Guide) -> Self {
        self.guide = Some(guide);
        self
    }

    /// Compiles a request's grammar (on the caller's thread: never the
    /// engine's) and checks its sampling fields.
    fn compile(&self, sampling: &SamplingParams) -> Result<Option<Constraint>, InferError> {
        if let Some(&(token, _)) = sampling
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= self.limits.vocab_size)
        {
            return Err(InferError::Invalid(format!(
                "logit_bias names token {token}, outside the vocabulary of {} tokens",
                self.limits.vocab_size
            )));
        }
        let Some(grammar) = &sampling.grammar else {
            return Ok(None);
        };
        let guide = self.guide.as_ref().ok_or_else(|| {
            InferError::Invalid("this worker cannot constrain output to a grammar".into())
        })?;
        guide.compile(grammar).map(Some).map_err(|e| match e {
            GuideError::Invalid { .. } => InferError::Invalid(e.to_string()),
            _ => InferError::Unavailable(e.to_string()),
        })
    }

    /// Drops this handle and waits up to `timeout` for the engine thread to
    /// end, which it does once every handle is gone and its backend is
    /// dropped: a process that frees GPU state this way does not exit while
    /// the engine thread still tears it down. Returns whether it ended (not
    /// if another clone of the handle is still alive).
    pub fn shutdown(self, timeout: std::time::Duration) -> bool {
        let shared = self.shared.clone();
        drop(self);
        let deadline = std::time::Instant::now() + timeout;
        while shared.alive.load(Ordering::SeqCst) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }
}

/// Releases a queue slot unless the request reached the engine thread.
struct QueueSlot<'a>(Option<&'a AtomicUsize>);
impl QueueSlot<'_> {
    fn keep(mut self) {
        self.0 = None;
    }
}
impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        if let Some(q) = self.0 {
            q.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl EngineHandle {
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().expect("stats lock").clone()
    }

    /// KV events (prefixes stored and evicted) from now on.
    pub fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEvent> {
        self.kv_events.subscribe()
    }

    /// The longest sequence (prompt plus generated) the engine serves.
    pub fn max_model_len(&self) -> usize {
        self.limits.max_model_len
    }

    /// The shape of the KV a prefill streams: (layers, kv_heads, head_dim).
    pub fn kv_shape(&self) -> (usize, usize, usize) {
        let l = &self.limits;
        (l.num_layers, l.kv_heads, l.head_dim)
    }

    /// Element type of the KV pool: a prefill ships its KV in it.
    pub fn kv_dtype(&self) -> KvDtype {
        self.limits.kv_dtype
    }

    /// Tokens per KV block (routers hash prompts with it).
    pub fn block_size(&self) -> usize {
        self.limits.block_size
    }

    /// Requests that may wait for admission before new ones are refused.
    pub fn max_queue(&self) -> usize {
        self.limits.max_queue
    }

    /// Checks a request as `generate` would, without submitting it: lets a
    /// decode worker refuse a prompt before asking a prefill worker for it.
    pub fn check_request(&self, request: &GenerateRequest) -> Result<(), InferError> {
        self.validate_prompt(&request.prompt)?;
        if request.stop.max_tokens == 0 {
            return Err(InferError::Invalid("max_tokens must be at least 1".into()));
        }
        self.compile(&request.sampling)?;
        Ok(())
    }

    fn validate_prompt(&self, prompt: &[u32]) -> Result<(), InferError> {
        let l = &self.limits;
        if prompt.is_empty() {
            return Err(InferError::Invalid("the prompt is empty".into()));
        }
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= l.vocab_size) {
            return Err(InferError::Invalid(format!(
                "token id {t} is outside the vocabulary of {} tokens",
                l.vocab_size
            )));
        }
        if prompt.len() >= l.max_model_len {
            return Err(InferError::Invalid(format!(
                "the prompt has {} tokens; the context holds {} including at least one generated token",
                prompt.len(),
                l.max_model_len
            )));
        }
        let blocks = (prompt.len() + 1).div_ceil(l.block_size);
        if blocks > l.num_blocks {
            return Err(InferError::Invalid(format!(
                "the prompt needs {blocks} KV blocks; this worker's pool has {}",
                l.num_blocks
            )));
        }
        Ok(())
    }

    fn take_queue_slot(&self) -> Result<QueueSlot<'_>, InferError> {
        if !self.is_ready() {
            return Err(InferError::Unavailable("the engine has stopped".into()));
        }
        let q = &self.shared.queued;
        let slot = QueueSlot(Some(q));
        if q.fetch_add(1, Ordering::SeqCst) >= self.limits.max_queue {
            return Err(InferError::Overloaded(format!(
                "{} requests are already waiting",
                self.limits.max_queue
            )));
        }
        Ok(slot)
    }

    fn submit(
        &self,
        request: GenerateRequest,
        import: Option<Import>,
    ) -> Result<GenerateStream, InferError> {
        self.validate_prompt(&request.prompt)?;
        if request.stop.max_tokens == 0 {
            return Err(InferError::Invalid("max_tokens must be at least 1".into()));
        }
        let constraint = self.compile(&request.sampling)?;
        let slot = self.take_queue_slot()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = tmpsc::unbounded_channel();
        self.tx
            .send(Command::Generate {
                id,
                request,
                constraint,
                events,
                import,
            })
            .map_err(|_| InferError::Unavailable("the engine has stopped".into()))?;
        slot.keep();
        let tx = self.tx.clone();
        let cancel = OnDrop::new(move || {
            // The engine may be gone already; then nothing is left to free.
            let _ = tx.send(Command::Cancel(id));
        });
        Ok(GenerateStream::new(rx, cancel))
    }

    /// Runs only the prompt, streaming each layer's K and V as soon as it is
    /// computed, then the first sampled token. Dropping the stream cancels.
    pub fn prefill_stream(
        &self,
        prompt: Vec<u32>,
        sampling: SamplingParams,
    ) -> Result<PrefillStream, InferError> {
        self.start_prefill(prompt, sampling, None)
    }

    /// Runs only the prompt and, once it is computed, copies its KV straight
    /// into `target`'s blocks of a peer's pool (cuda-ipc): the stream says
    /// `Started`, `PeerWritten` after the copy finished, then `Done`.
    pub fn prefill_stream_to_peer(
        &self,
        prompt: Vec<u32>,
        sampling: SamplingParams,
        target: PeerKvTarget,
    ) -> Result<PrefillStream, InferError> {
        if target.block_ids.len() < prompt.len().div_ceil(target.pool.layout.block_size.max(1)) {
            return Err(InferError::Invalid(format!(
                "{} reserved blocks of {} tokens cannot hold a {}-token prompt",
                target.block_ids.len(),
                target.pool.layout.block_size,
                prompt.len()
            )));
        }
        self.start_prefill(prompt, sampling, Some(Box::new(target)))
    }

    /// The KV pool as a peer on this node can map it; `None` unless the
    /// backend can share its pool (CUDA).
    pub fn kv_pool_export(&self) -> Option<&KvPoolExport> {
        self.limits.kv_pool_export.as_ref()
    }

    /// Maps a peer's pool for [`EngineHandle::prefill_stream_to_peer`] (once
    /// per pool), checking that this pool's blocks fit it; `Err` says why not.
    pub async fn open_peer_kv(&self, pool: KvPoolExport) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::OpenPeer {
                pool: Box::new(pool),
                reply,
            })
            .map_err(|_| "the engine has stopped".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("the engine has stopped".to_string()))
    }

    /// Reserves blocks for `num_tokens` prompt positions that a peer will
    /// write (cuda-ipc). Dropping the reservation frees them, unless
    /// [`EngineHandle::generate_with_reserved`] adopted them.
    pub async fn reserve_kv_blocks(&self, num_tokens: usize) -> Result<KvReservation, InferError> {
        let blocks = num_tokens.div_ceil(self.limits.block_size);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Reserve { id, blocks, reply })
            .map_err(|_| InferError::Unavailable("the engine has stopped".into()))?;
        let block_ids = rx
            .await
            .map_err(|_| InferError::Unavailable("the engine has stopped".into()))??;
        Ok(KvReservation {
            id,
            block_ids,
            tx: Some(self.tx.clone()),
        })
    }

    /// Continues a request whose prompt KV a peer wrote into `reservation`'s
    /// blocks: adopts them, emits `first_token`, and decodes from there.
    pub fn generate_with_reserved(
        &self,
        request: GenerateRequest,
        mut reservation: KvReservation,
        first_token: TokenOutput,
    ) -> Result<GenerateStream, InferError> {
        let needed = request.prompt.len().div_ceil(self.limits.block_size);
        if reservation.block_ids.len() != needed {
            return Err(InferError::Invalid(format!(
                "{} reserved blocks for a prompt of {} tokens (needs {needed})",
                reservation.block_ids.len(),
                request.prompt.len()
            )));
        }
        if first_token.id as usize >= self.limits.vocab_size {
            return Err(InferError::Invalid(format!(
                "first token {} is outside the vocabulary",
                first_token.id
            )));
        }
        let import = Import::Reserved {
            reservation: reservation.id,
            first: first_token,
        };
        // From here the engine owns the blocks (a failed submit drops them
        // through the Generate command never arriving: release them then).
        let tx = reservation.tx.take();
        let result = self.submit(request, Some(import));
        if result.is_err() {
            if let Some(tx) = tx {
                let _ = tx.send(Command::ReleaseReservation(reservation.id));
            }
        }
        result
    }

    fn start_prefill(
        &self,
        prompt: Vec<u32>,
        sampling: SamplingParams,
        peer: Option<Box<PeerKvTarget>>,
    ) -> Result<PrefillStream, InferError> {
        self.validate_prompt(&prompt)?;
        let constraint = self.compile(&sampling)?;
        let slot = self.take_queue_slot()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = tmpsc::unbounded_channel();
        self.tx
            .send(Command::Prefill {
                id,
                prompt,
                sampling,
                constraint,
                events,
                peer,
            })
            .map_err(|_| InferError::Unavailable("the engine has stopped".into()))?;
        slot.keep();
        let tx = self.tx.clone();
        Ok(PrefillStream {
            rx,
            _cancel: OnDrop::new(move || {
                let _ = tx.send(Command::Cancel(id));
            }),
        })
    }

    /// Runs only the prompt and returns the first sampled token together with
    /// the prompt's KV (for a decode worker to continue from).
    pub async fn prefill_only(
        &self,
        prompt: Vec<u32>,
        sampling: SamplingParams,
    ) -> Result<PrefillOutput, InferError> {
        let l = &self.limits;
        let num_tokens = prompt.len();
        let width = l.kv_heads * l.head_dim;
        let mut stream = self.prefill_stream(prompt, sampling)?;
        let mut kv = KvExport {
            dtype: KvDtype::F32,
            num_tokens,
            kv_heads: l.kv_heads,
            head_dim: l.head_dim,
            layers: (0..l.num_layers)
                .map(|_| (vec![0.0; num_tokens * width], vec![0.0; num_tokens * width]))
                .collect(),
        };
        let mut cached_tokens = 0;
        while let Some(event) = stream.next_event().await {
            match event {
                PrefillEvent::Started {
                    cached_tokens: c, ..
                } => cached_tokens = c,
                PrefillEvent::Kv(chunk) => {
                    let (k, v) = &mut kv.layers[chunk.layer];
                    let range =
                        chunk.start_pos * width..(chunk.start_pos + chunk.num_tokens) * width;
                    let widen = |bytes: &[u8]| {
                        l.kv_dtype.decode(bytes).ok_or_else(|| {
                            InferError::Unavailable("the engine streamed partial KV values".into())
                        })
                    };
                    k[range.clone()].copy_from_slice(&widen(&chunk.k)?);
                    v[range].copy_from_slice(&widen(&chunk.v)?);
                }
                PrefillEvent::Done(first_token) => {
                    return Ok(PrefillOutput {
                        first_token,
                        kv,
                        cached_tokens,
                    })
                }
                PrefillEvent::Error(e) => return Err(InferError::Unavailable(e)),
                PrefillEvent::PeerWritten(_) => {
                    return Err(InferError::Unavailable(
                        "a prefill without a peer reported a peer write".into(),
                    ))
                }
            }
        }
        Err(InferError::Unavailable(
            "the engine stopped during prefill".into(),
        ))
    }

    /// Continues a request whose prompt was computed elsewhere: installs `kv`
    /// (all prompt positions: a [`KvPieces`] as a transfer received it, or a
    /// [`KvExport`]) into fresh blocks, emits `first_token`, and decodes from
    /// there.
    pub fn generate_with_kv(
        &self,
        request: GenerateRequest,
        kv: impl Into<KvPieces>,
        first_token: TokenOutput,
    ) -> Result<GenerateStream, InferError> {
        let kv = kv.into();
        let l = &self.limits;
        if kv.num_tokens != request.prompt.len() {
            return Err(InferError::Invalid(format!(
                "the KV covers {} tokens but the prompt has {}",
                kv.num_tokens,
                request.prompt.len()
            )));
        }
        let complete = kv.check();
        if kv.num_layers != l.num_layers
            || kv.kv_heads != l.kv_heads
            || kv.head_dim != l.head_dim
            || complete.is_err()
        {
            return Err(InferError::Invalid(format!(
                "the KV ({} layers x {} kv heads x head_dim {}) does not match this model ({} x {} x {}) or its data is truncated{}",
                kv.num_layers,
                kv.kv_heads,
                kv.head_dim,
                l.num_layers,
                l.kv_heads,
                l.head_dim,
                complete.err().map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        if first_token.id as usize >= l.vocab_size {
            return Err(InferError::Invalid(format!(
                "first token {} is outside the vocabulary",
                first_token.id
            )));
        }
        self.submit(request, Some(Import::Kv(kv, first_token)))
    }
}

/// Blocks of this engine's pool held for a prompt's KV that a peer writes
/// (cuda-ipc). Dropped without being adopted, they return to the pool.
pub struct KvReservation {
    id: u64,
    block_ids: Vec<u32>,
    /// `None` once adopted.
    tx: Option<mpsc::Sender<Command>>,
}

impl KvReservation {
    /// The reserved blocks, in prompt position order.
    pub fn block_ids(&self) -> &[u32] {
        &self.block_ids
    }
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            // The engine may be gone already; then nothing is left to free.
            let _ = tx.send(Command::ReleaseReservation(self.id));
        }
    }
}

/// The events of one streamed prefill. Dropping it cancels the prefill.
pub struct PrefillStream {
    rx: tmpsc::UnboundedReceiver<PrefillEvent>,
    _cancel: OnDrop,
}

impl PrefillStream {
    pub async fn next_event(&mut self) -> Option<PrefillEvent> {
        self.rx.recv().await
    }
}

impl Infer for EngineHandle {
    fn generate(&self, request: GenerateRequest) -> Result<GenerateStream, InferError> {
        self.submit(request, None)
    }

    fn is_ready(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }
}

enum Output {
    Stream(tmpsc::UnboundedSender<GenerateEvent>),
    Prefill(tmpsc::UnboundedSender<PrefillEvent>),
}

struct Request {
    sampler: Sampler,
    /// Prompt token logprobs gathered so far (`prompt_logprobs` requests).
    prompt_logprobs: Vec<TokenOutput>,
    output: Output,
    /// Still counted in `Shared::queued` (never admitted yet).
    queued: bool,
    started: bool,
    cached_tokens: usize,
    /// Prefill-only: where the KV goes instead of the stream (cuda-ipc).
    peer: Option<Box<PeerKvTarget>>,
    /// The request's phases, for the per-request queue/prefill/decode histograms.
    phases: Phases,
}

/// When a request arrived at this engine, was first admitted into the batch and got its
/// first token.
struct Phases {
    arrived: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

impl Phases {
    fn new() -> Self {
        Self {
            arrived: Instant::now(),
            admitted: None,
            first_token: None,
        }
    }

    /// First admission (a re-admission after preemption is not queueing again): observes
    /// the time spent waiting.
    fn admitted(&mut self, role: &str) {
        if self.admitted.is_none() {
            let now = Instant::now();
            self.admitted = Some(now);
            metrics()
                .request_queue_seconds
                .with_label_values(&[role])
                .observe(now.duration_since(self.arrived).as_secs_f64());
        }
    }

    /// The first token: observes the prompt's computation since admission (not for a
    /// prompt prefilled elsewhere, which is never admitted before its first token).
    fn first_token(&mut self, role: &str) {
        if self.first_token.is_none() {
            let now = Instant::now();
            self.first_token = Some(now);
            if let Some(admitted) = self.admitted {
                metrics()
                    .request_prefill_seconds
                    .with_label_values(&[role])
                    .observe(now.duration_since(admitted).as_secs_f64());
            }
        }
    }

    /// The last token: observes the decode phase since the first.
    fn finished(&self, role: &str) {
        if let Some(first) = self.first_token {
            metrics()
                .request_decode_seconds
                .with_label_values(&[role])
                .observe(first.elapsed().as_secs_f64());
        }
    }
}

impl Request {
    /// Sends an event; false when the receiver is gone (the caller cancelled).
    fn send(&self, event: GenerateEvent) -> bool {
        match &self.output {
            Output::Stream(tx) => tx.send(event).is_ok(),
            Output::Prefill(_) => true,
        }
    }

    fn fail(&self, message: String) {
        match &self.output {
            Output::Stream(tx) => {
                let _ = tx.send(GenerateEvent::Error(message));
            }
            Output::Prefill(tx) => {
                let _ = tx.send(PrefillEvent::Error(message));
            }
        }
    }
}

/// Frees an installed prompt's KV on a short-lived thread of its own:
/// an 8B model's 3000-token prompt is 393 MB of received buffers, and the
/// step that installed one on an H100 host spent 23 ms of host time after
/// the install, most likely returning them to the system; every sequence
/// decoding in that step waited for it.
fn free_elsewhere(kv: KvPieces) {
    let spawned = std::thread::Builder::new()
        .name("tandem-kv-free".into())
        .spawn(move || drop(kv));
    // Without a thread (resource limits) the failed spawn drops it here.
    if let Err(e) = spawned {
        tracing::debug!("freeing imported KV on the engine thread: {e}");
    }
}

/// Forwards the K and V of prefill-only sequences to their streams as each
/// layer completes, already as bytes of the pool's dtype (what the wire
/// carries): one pass over the values, on the compute pool's threads, while
/// the backend computes the next layer.
struct StreamSink<'a> {
    /// Per batch entry: its stream (if it is a prefill-only sequence) and the
    /// position of its first new token.
    targets: Vec<(Option<&'a tmpsc::UnboundedSender<PrefillEvent>>, usize)>,
    kv_width: usize,
    dtype: KvDtype,
}

/// Values converted per parallel task when a sink splits and encodes rows.
const ENCODE_TASK_VALUES: usize = 1 << 16;

impl StreamSink<'_> {
    fn send(&self, seq_index: usize, layer: usize, num_tokens: usize, k: Bytes, v: Bytes) {
        if let Some((Some(tx), start_pos)) = self.targets.get(seq_index) {
            let _ = tx.send(PrefillEvent::Kv(KvLayerChunk {
                layer,
                start_pos: *start_pos,
                num_tokens,
                k,
                v,
            }));
        }
    }

    fn wanted(&self, seq_index: usize) -> bool {
        matches!(self.targets.get(seq_index), Some((Some(_), _)))
    }
}

impl KvLayerSink for StreamSink<'_> {
    fn layer_computed(&mut self, layer: usize, seq_index: usize, k: &[f32], v: &[f32]) {
        if self.wanted(seq_index) {
            let (kb, vb) = (self.dtype.encode(k), self.dtype.encode(v));
            self.send(seq_index, layer, k.len() / self.kv_width, kb, vb);
        }
    }

    fn layer_rows_computed(&mut self, layer: usize, seq_index: usize, rows: &[f32], kv_dim: usize) {
        if !self.wanted(seq_index) {
            return;
        }
        let (k, v) = split_encode_rows(rows, kv_dim, self.dtype);
        self.send(seq_index, layer, rows.len() / (2 * kv_dim), k, v);
    }
}

/// Splits rows of `[K | V]` into K and V bytes of `dtype`, in parallel over
/// the current rayon pool for large layers.
fn split_encode_rows(rows: &[f32], kv_dim: usize, dtype: KvDtype) -> (Bytes, Bytes) {
    use rayon::prelude::*;
    let row_values = 2 * kv_dim;
    let tokens = rows.len() / row_values;
    let row_bytes = kv_dim * dtype.size();
    let mut k = vec![0u8; tokens * row_bytes];
    let mut v = vec![0u8; tokens * row_bytes];
    let rows_per_task = (ENCODE_TASK_VALUES / row_values).max(1);
    let encode = |(src, (k, v)): (&[f32], (&mut [u8], &mut [u8]))| {
        for ((row, k), v) in src
            .chunks_exact(row_values)
            .zip(k.chunks_exact_mut(row_bytes))
            .zip(v.chunks_exact_mut(row_bytes))
        {
            encode_to(&row[..kv_dim], k, dtype);
            encode_to(&row[kv_dim..], v, dtype);
        }
    };
    let (src, dst) = (rows_per_task * row_values, rows_per_task * row_bytes);
    if tokens > rows_per_task {
        rows.par_chunks(src)
            .zip(k.par_chunks_mut(dst).zip(v.par_chunks_mut(dst)))
            .for_each(encode);
    } else {
        rows.chunks(src)
            .zip(k.chunks_mut(dst).zip(v.chunks_mut(dst)))
            .for_each(encode);
    }
    (Bytes::from(k), Bytes::from(v))
}

/// Writes `values` as little-endian bytes of `dtype` into `out` (exactly
/// `values.len() * dtype.size()` bytes).
fn encode_to(values: &[f32], out: &mut [u8], dtype: KvDtype) {
    match dtype {
        KvDtype::F32 => out.copy_from_slice(bytemuck::cast_slice(values)),
        KvDtype::Bf16 => {
            for (x, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&types::bf16_bits(*x).to_le_bytes());
            }
        }
    }
}

struct EngineLoop {
    backend: Box<dyn ComputeBackend>,
    scheduler: Scheduler,
    requests: HashMap<SeqId, Request>,
    eos_token_ids: Vec<u32>,
    max_model_len: usize,
    shared: Arc<Shared>,
    role: &'static str,
    rx: mpsc::Receiver<Command>,
    logits: Vec<f32>,
    /// Blocks reserved for KV a peer writes, by reservation id.
    reservations: HashMap<u64, Vec<u32>>,
    stats: EngineStats,
    /// What the current iteration held and where its time went.
    facts: StepFacts,
    watch: StepWatch,
}

impl EngineLoop {
    fn run(&mut self) {
        loop {
            let mut woken_by = None;
            if self.scheduler.is_idle() {
                // Nothing to compute: sleep until a command arrives.
                match self.rx.recv() {
                    Ok(cmd) => woken_by = Some(cmd),
                    Err(_) => return,
                }
            }
            let started = Instant::now();
            self.facts = StepFacts::default();
            if let Some(cmd) = woken_by {
                self.facts.commands += 1;
                self.handle(cmd);
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.facts.commands += 1;
                self.handle(cmd);
            }
            let stepped = !self.scheduler.is_idle();
            if stepped {
                self.step();
                // Accounted before publishing, so the stats of an engine
                // that goes idle now include this step.
                self.facts.total = started.elapsed();
                self.stats.step_host_nanos += self.facts.host().as_nanos() as u64;
                self.stats.step_backend_nanos += self.facts.backend.as_nanos() as u64;
            }
            self.publish();
            if stepped {
                if let Some(slow) = self.watch.observe(&self.facts, Instant::now()) {
                    slow.log(self.role);
                }
            }
        }
    }

    fn unqueue(&mut self, id: SeqId) {
        if let Some(r) = self.requests.get_mut(&id) {
            if r.queued {
                r.queued = false;
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Forgets a request and frees whatever it holds.
    fn drop_request(&mut self, id: SeqId) {
        self.unqueue(id);
        self.requests.remove(&id);
        self.scheduler.remove(id);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Cancel(id) => self.drop_request(id),
            Command::Reserve { id, blocks, reply } => {
                let result = match self.scheduler.allocate_blocks(blocks) {
                    Some(ids) => {
                        self.reservations.insert(id, ids.clone());
                        Ok(ids)
                    }
                    None => Err(InferError::Overloaded(format!(
                        "no {blocks} free KV blocks to receive a prompt into"
                    ))),
                };
                if let Err(Ok(ids)) = reply.send(result) {
                    // The caller went away: nobody will adopt them.
                    self.reservations.remove(&id);
                    self.scheduler.release_blocks(&ids);
                }
            }
            Command::ReleaseReservation(id) => {
                if let Some(ids) = self.reservations.remove(&id) {
                    self.scheduler.release_blocks(&ids);
                }
            }
            Command::OpenPeer { pool, reply } => {
                let started = Instant::now();
                let result = self.backend.open_peer_kv(&pool).map_err(|e| e.to_string());
                self.facts.backend += started.elapsed();
                let _ = reply.send(result);
            }
            Command::Prefill {
                id,
                prompt,
                sampling,
                constraint,
                events,
                peer,
            } => {
                let stop = StopParams {
                    max_tokens: 1,
                    stop_token_ids: Vec::new(),
                    ignore_eos: true,
                };
                let sampler = match Sampler::for_request(sampling, &prompt, constraint) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = events.send(PrefillEvent::Error(e));
                        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                };
                self.requests.insert(
                    id,
                    Request {
                        sampler,
                        prompt_logprobs: Vec::new(),
                        output: Output::Prefill(events),
                        queued: true,
                        started: false,
                        cached_tokens: 0,
                        peer,
                        phases: Phases::new(),
                    },
                );
                self.scheduler.add(Sequence::new(id, prompt, stop));
            }
            Command::Generate {
                id,
                request,
                constraint,
                events,
                import,
            } => {
                let every_token = request.sampling.prompt_logprobs.is_some() && import.is_none();
                let sampler =
                    match Sampler::for_request(request.sampling, &request.prompt, constraint) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = events.send(GenerateEvent::Error(e));
                            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                    };
                let mut req = Request {
                    sampler,
                    prompt_logprobs: Vec::new(),
                    output: Output::Stream(events),
                    queued: true,
                    started: false,
                    cached_tokens: 0,
                    peer: None,
                    phases: Phases::new(),
                };
                let mut seq = Sequence::new(id, request.prompt, request.stop);
                seq.logits_every_token = every_token;
                let (kv, first) = match import {
                    None => (None, None),
                    Some(Import::Kv(kv, first)) => (Some(kv), Some(first)),
                    Some(Import::Reserved { reservation, first }) => {
                        let Some(blocks) = self.reservations.remove(&reservation) else {
                            req.fail("the reserved KV blocks are gone".into());
                            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                            return;
                        };
                        seq.blocks = blocks;
                        seq.num_computed = seq.prompt_len;
                        seq.kv_adopted = true;
                        (None, Some(first))
                    }
                };
                if let Some(first) = first {
                    req.started = true;
                    req.phases.first_token(self.role);
                    req.send(GenerateEvent::Started {
                        prompt_tokens: seq.prompt_len,
                        cached_tokens: 0,
                    });
                    let finish =
                        check_stop(&mut seq, first.id, &self.eos_token_ids, self.max_model_len);
                    if finish != Some(FinishReason::Stop) {
                        if let Err(e) = req.sampler.record_drawn_elsewhere(first.id) {
                            req.fail(format!("the prefill worker's first token: {e}"));
                            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                            self.scheduler.release_blocks(&seq.blocks);
                            return;
                        }
                        req.send(GenerateEvent::Token(first));
                    }
                    if let Some(reason) = finish {
                        req.send(GenerateEvent::Finished(reason));
                        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                        self.scheduler.release_blocks(&seq.blocks);
                        return;
                    }
                    seq.kv_import = kv;
                }
                self.requests.insert(id, req);
                self.scheduler.add(seq);
            }
        }
    }

    fn step(&mut self) {
        let mut plan = self.scheduler.schedule();
        self.stats.steps += 1;
        self.stats.preemptions += plan.preempted.len() as u64;
        metrics()
            .preemptions
            .with_label_values(&[self.role])
            .inc_by(plan.preempted.len() as u64);
        let mut failed = Vec::new();
        for id in std::mem::take(&mut plan.out_of_blocks) {
            // The prompt fitted the pool when admitted; only generation grew
            // it beyond the whole pool.
            match self.requests.get(&id) {
                Some(
                    req @ Request {
                        output: Output::Stream(_),
                        ..
                    },
                ) => {
                    req.send(GenerateEvent::Finished(FinishReason::Length));
                }
                Some(req) => req.fail("the prompt does not fit this worker's KV pool".into()),
                None => {}
            }
            self.drop_request(id);
        }
        self.facts.admitted = plan.admitted.len();
        self.facts.imported = plan.imports.len();
        self.facts.preempted = plan.preempted.len();
        for &(id, cached) in &plan.admitted {
            self.unqueue(id);
            let Some(req) = self.requests.get_mut(&id) else {
                continue;
            };
            req.phases.admitted(self.role);
            let seq = self.scheduler.get(id).expect("admitted");
            self.facts.adopted += seq.kv_adopted as usize;
            if let Output::Prefill(tx) = &req.output {
                let streams_kv = req.peer.is_none();
                if !req.started {
                    let _ = tx.send(PrefillEvent::Started {
                        prompt_tokens: seq.prompt_len,
                        cached_tokens: cached,
                    });
                }
                // Cached positions are never computed here: send them now,
                // layer by layer (again after a re-admission, harmlessly).
                if cached > 0 && streams_kv {
                    let started = Instant::now();
                    let read = self.backend.read_kv_pieces(&seq.blocks, cached);
                    self.facts.backend += started.elapsed();
                    match read {
                        Ok(kv) => {
                            for piece in kv.pieces {
                                let _ = tx.send(PrefillEvent::Kv(piece));
                            }
                        }
                        Err(e) => failed.push((id, format!("reading cached KV failed: {e}"))),
                    }
                }
            }
            if !req.started {
                req.started = true;
                req.cached_tokens = cached;
                req.send(GenerateEvent::Started {
                    prompt_tokens: seq.prompt_len,
                    cached_tokens: cached,
                });
                self.stats.prefix_cache_hit_tokens += cached as u64;
                metrics()
                    .prefix_cache_hits
                    .with_label_values(&[self.role])
                    .inc_by(cached as u64);
            }
        }
        for &id in &plan.imports {
            let kv = self.scheduler.take_import(id).expect("admitted with KV");
            let blocks = &self.scheduler.get(id).expect("admitted").blocks;
            let started = Instant::now();
            let written = self.backend.write_kv_pieces(blocks, &kv);
            self.facts.backend += started.elapsed();
            if let Err(e) = written {
                failed.push((id, format!("installing the prompt's KV failed: {e}")));
            }
            free_elsewhere(kv);
        }
        for (id, message) in failed {
            plan.chunks.retain(|c| c.id != id);
            if let Some(req) = self.requests.get_mut(&id) {
                req.fail(message);
            }
            self.drop_request(id);
        }
        if plan.chunks.is_empty() {
            return;
        }

        // A backend that samples where the logits are does so when every
        // sampled request's rule allows it (no logprobs, no penalties).
        let sampled = plan.chunks.iter().filter(|c| c.need_logits);
        let on_device = self.backend.samples_on_device()
            && sampled.clone().all(|c| {
                self.requests
                    .get(&c.id)
                    .is_none_or(|r| r.sampler.device_eligible())
            });
        let device_rules: Option<Vec<DeviceSampling>> = on_device.then(|| {
            sampled
                .map(|c| {
                    self.requests
                        .get_mut(&c.id)
                        .map_or(DeviceSampling::GREEDY, |r| r.sampler.device_sampling())
                })
                .collect()
        });
        // Grammar masks for the tokens this step samples, computed on another
        // thread while the backend computes the logits.
        let mut masks: Vec<Masked> = Vec::new();
        for (row, c) in plan.chunks.iter().filter(|c| c.need_logits).enumerate() {
            if let Some(req) = self.requests.get_mut(&c.id) {
                masks.extend(req.sampler.take_constraint().map(|constraint| Masked {
                    id: c.id,
                    row,
                    constraint,
                }));
            }
        }
        // Constrained rows whose grammar failed while the device sampled them.
        let mut broken: Vec<(SeqId, String)> = Vec::new();
        let mut prefill_tokens = 0u64;
        let mut decodes = 0;
        let graphs_before = self.backend.graphs_captured();
        let forward_started: Instant;
        let result = {
            let mut sink = StreamSink {
                targets: Vec::with_capacity(plan.chunks.len()),
                kv_width: self.backend.config().num_kv_heads * self.backend.config().head_dim,
                dtype: self.backend.kv_dtype(),
            };
            let inputs: Vec<SeqInput<'_>> = plan
                .chunks
                .iter()
                .map(|c| {
                    let seq = self.scheduler.get(c.id).expect("scheduled sequence");
                    let decoding = c.len == 1 && c.start >= seq.prompt_len;
                    if decoding {
                        decodes += 1;
                    } else {
                        prefill_tokens += c.len as u64;
                    }
                    let target = match self.requests.get(&c.id) {
                        Some(Request {
                            output: Output::Prefill(tx),
                            peer: None,
                            ..
                        }) => Some(tx),
                        _ => None,
                    };
                    sink.targets.push((target, c.start));
                    SeqInput {
                        tokens: &seq.tokens[c.start..c.start + c.len],
                        start_pos: c.start,
                        block_table: &seq.blocks,
                        need_logits: c.need_logits,
                    }
                })
                .collect();
            let any_target = sink.targets.iter().any(|t| t.0.is_some());
            let sink: Option<&mut dyn KvLayerSink> =
                if any_target { Some(&mut sink) } else { None };
            forward_started = Instant::now();
            let backend = &mut self.backend;
            let logits = &mut self.logits;
            let broken = &mut broken;
            let (result, prepared) = while_preparing_masks(masks, |wait| match &device_rules {
                Some(rules) if !wait.is_empty() => {
                    let mut fill = |bits: &mut [u32], words: usize| {
                        for m in wait.wait() {
                            let row = &mut bits[m.row * words..(m.row + 1) * words];
                            if let Err(e) = fill_mask_row(row, &mut m.constraint) {
                                broken.push((m.id, e));
                            }
                        }
                    };
                    backend
                        .forward_sampled_masked(&inputs, rules, &mut fill, sink)
                        .map(Some)
                }
                Some(rules) => backend.forward_sampled(&inputs, rules, sink).map(Some),
                None => backend.forward(&inputs, logits, sink).map(|()| None),
            });
            masks = prepared;
            result
        };
        for m in masks.drain(..) {
            if let Some(req) = self.requests.get_mut(&m.id) {
                req.sampler.put_constraint(m.constraint);
            }
        }
        self.facts.backend += forward_started.elapsed();
        self.facts.graphs_captured = self.backend.graphs_captured().saturating_sub(graphs_before);
        self.facts.sequences = plan.chunks.len();
        self.facts.decodes = decodes;
        self.facts.prefill_tokens = prefill_tokens as usize;
        self.stats.prefill_tokens += prefill_tokens;
        metrics()
            .prefill_tokens
            .with_label_values(&[self.role])
            .inc_by(prefill_tokens);
        if let Err(e) = result {
            tracing::error!(error = %e, "forward step failed");
            for c in &plan.chunks {
                if let Some(req) = self.requests.get_mut(&c.id) {
                    req.fail(format!("forward step failed: {e}"));
                }
                self.drop_request(c.id);
            }
            return;
        }
        self.scheduler.complete_step(&plan);

        if let Ok(Some(tokens)) = result {
            for (id, e) in broken {
                if let Some(req) = self.requests.get_mut(&id) {
                    req.fail(format!("constrained sampling failed: {e}"));
                }
                self.drop_request(id);
            }
            let sampled = plan.chunks.iter().filter(|c| c.need_logits);
            for (chunk, id) in sampled.zip(tokens) {
                let token = TokenOutput {
                    id,
                    logprob: None,
                    top_logprobs: Vec::new(),
                };
                self.on_token(chunk.id, token);
            }
            return;
        }
        let vocab = self.backend.config().vocab_size;
        // Taken out so sampling can mutate the loop state; put back to keep its allocation.
        let mut logits = std::mem::take(&mut self.logits);
        let sampled = plan.chunks.iter().filter(|c| c.need_logits);
        for (row, chunk) in sampled.enumerate() {
            let row = &mut logits[row * vocab..(row + 1) * vocab];
            let end = chunk.start + chunk.len;
            let prompt_len = self.scheduler.get(chunk.id).map_or(0, |s| s.prompt_len);
            if end < prompt_len {
                self.on_prompt_logits(chunk.id, end, row);
            } else {
                self.on_logits(chunk.id, row);
            }
        }
        self.logits = logits;
    }

    /// Logits of a prompt position (a `prompt_logprobs` request computes its
    /// prompt a token at a time): the logprob of the prompt token at `next`.
    fn on_prompt_logits(&mut self, id: SeqId, next: usize, logits: &[f32]) {
        let Some(req) = self.requests.get_mut(&id) else {
            return;
        };
        let Some(seq) = self.scheduler.get(id) else {
            return;
        };
        let n = req.sampler.params().prompt_logprobs.unwrap_or(0);
        req.prompt_logprobs
            .push(token_logprobs(logits, seq.tokens[next], n));
    }

    fn on_logits(&mut self, id: SeqId, logits: &mut [f32]) {
        let Some(req) = self.requests.get_mut(&id) else {
            return;
        };
        if !req.prompt_logprobs.is_empty() {
            let tokens = std::mem::take(&mut req.prompt_logprobs);
            req.send(GenerateEvent::PromptLogprobs(tokens));
        }
        match req.sampler.sample(logits) {
            Ok(token) => self.on_token(id, token),
            Err(e) => {
                req.fail(format!("constrained sampling failed: {e}"));
                self.drop_request(id);
            }
        }
    }

    /// Hands a sampled token to its request: the prefill role's answer, or
    /// the next token of a generation (which may finish it).
    fn on_token(&mut self, id: SeqId, token: TokenOutput) {
        let Some(req) = self.requests.get_mut(&id) else {
            return;
        };
        if let Output::Prefill(tx) = &req.output {
            if let Some(target) = &req.peer {
                // Every prompt position is in this sequence's blocks now.
                let seq = self.scheduler.get(id).expect("sampled sequence");
                let started = Instant::now();
                let written = self
                    .backend
                    .write_kv_to_peer(&seq.blocks, seq.prompt_len, target);
                self.facts.backend += started.elapsed();
                match written {
                    Ok(w) => {
                        let _ = tx.send(PrefillEvent::PeerWritten(w));
                    }
                    Err(e) => {
                        let _ = tx.send(PrefillEvent::Error(format!(
                            "writing the KV into the peer's pool failed: {e}"
                        )));
                        self.drop_request(id);
                        return;
                    }
                }
            }
            req.phases.first_token(self.role);
            let _ = tx.send(PrefillEvent::Done(token));
            self.drop_request(id);
            return;
        }
        req.phases.first_token(self.role);
        let finish = self
            .scheduler
            .append_token(id, token.id, &self.eos_token_ids);
        let mut alive = true;
        if finish != Some(FinishReason::Stop) {
            if let Err(e) = req.sampler.record(token.id) {
                req.fail(format!("constrained sampling failed: {e}"));
                self.drop_request(id);
                return;
            }
            self.stats.decode_tokens += 1;
            metrics()
                .decode_tokens
                .with_label_values(&[self.role])
                .inc();
            alive = req.send(GenerateEvent::Token(token));
        }
        if let Some(reason) = finish {
            req.phases.finished(self.role);
            req.send(GenerateEvent::Finished(reason));
            self.drop_request(id);
        } else if !alive {
            self.drop_request(id);
        }
    }

    fn publish(&mut self) {
        let bm = self.scheduler.block_manager();
        self.stats.waiting = self.scheduler.num_waiting();
        self.stats.running = self.scheduler.num_running();
        self.stats.kv_blocks_used = bm.num_used();
        self.stats.kv_blocks_cached = bm.num_cached();
        let m = metrics();
        let role = [self.role];
        m.queue_depth
            .with_label_values(&role)
            .set(self.stats.waiting as i64);
        m.running_sequences
            .with_label_values(&role)
            .set(self.stats.running as i64);
        m.kv_blocks_used
            .with_label_values(&role)
            .set(self.stats.kv_blocks_used as i64);
        *self.shared.stats.lock().expect("stats lock") = self.stats.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_k_and_v_split_into_encoded_k_and_v_in_parallel_or_not() {
        let kv_dim = 3;
        // Few rows (one task) and enough for several parallel tasks.
        for tokens in [5, 3 * ENCODE_TASK_VALUES / (2 * kv_dim) + 7] {
            let rows: Vec<f32> = (0..tokens)
                .flat_map(|t| {
                    let t = t as f32;
                    [t, t + 0.25, t + 0.5, -t, -t - 0.25, -t - 0.5]
                })
                .collect();
            for dtype in [KvDtype::F32, KvDtype::Bf16] {
                let (k, v) = split_encode_rows(&rows, kv_dim, dtype);
                let (k, v) = (dtype.decode(&k).unwrap(), dtype.decode(&v).unwrap());
                assert_eq!(k.len(), tokens * kv_dim);
                let round = |x: f32| dtype.decode(&dtype.encode(&[x])).unwrap()[0];
                for t in [0, 1, tokens - 1] {
                    let x = t as f32;
                    assert_eq!(k[t * 3..t * 3 + 3], [x, x + 0.25, x + 0.5].map(round));
                    assert_eq!(v[t * 3..t * 3 + 3], [-x, -x - 0.25, -x - 0.5].map(round));
                }
            }
        }
    }
}
