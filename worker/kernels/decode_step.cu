// The whole decode step of a small model in one kernel (Tandem's CUDA
// backend, worker/src/engine/backend/cuda/).
//
// A batch-1 decode step of SmolLM2-135M reads 270 MB of weights (56 us at
// H200 bandwidth) but runs 150 dependent projection and attention kernels,
// each a few microseconds of launch, ramp-up and drain: the step is bound by
// that latency, not by memory. Here one block per SM runs every phase of
// the step in turn (embedding, then per layer: RMSNorm + QKV + RoPE + KV
// write, attention, output projection, RMSNorm + gate/up + SiLU, down
// projection; then the final norm and output head), with a grid-wide barrier
// between phases. Each phase is the same device code the per-operation
// kernels run (decode.cuh), over the same work split, so the results are
// bit for bit those of the per-operation path. Before each barrier a block
// prefetches into L2 the weight rows it will take in the next phase, so
// they arrive while the slowest block finishes.
//
// All blocks must be resident at once (the barrier waits for every block):
// the host launches one block per SM as a cooperative launch, which the
// driver refuses when they would not fit.
//
// NVRTC compiles common.cuh, decode.cuh and this file as one text, with
// STEP_HD (head dim: 32, 64 or 128) and STEP_G (the GQA group bound of
// decode_attention_v2: 1, 2, 4 or 8) defined for the model (device.rs).

#ifndef STEP_HD
#define STEP_HD 64
#endif
#ifndef STEP_G
#define STEP_G 4
#endif

// One layer's weights and KV cache (the host writes an array of these once
// the KV pool exists; StepLayer in mod.rs mirrors it).
struct StepLayer {
    const bf16* wqkv;
    const float* bqkv;  // null without QKV bias
    const float* attn_norm;
    const bf16* wo;
    const float* ffn_norm;
    const bf16* w_gate_up;
    const bf16* w_down;
    bf16* k_cache;
    bf16* v_cache;
};

// The step's buffers and shapes, passed by value (StepParams in mod.rs
// mirrors it field for field: pointers first, then 32-bit values).
struct StepParams {
    const StepLayer* layers;
    float* x;
    float* qkv;
    bf16* attn;
    bf16* act;
    float* logits;
    const bf16* embed;
    const bf16* out_w;
    const float* final_norm;
    const float* inv_freq;
    const int* tokens;
    const int* positions;
    const int* slots;
    const int* logit_rows;
    const int* tables;
    float* part_max;
    float* part_sum;
    float* part_out;
    int* counters;
    unsigned* barrier;  // [count, generation], zero before the first step
    int num_layers;
    int hidden;
    int nh;
    int nkv;
    int f;
    int vocab;
    int block_size;
    int max_blocks;
    int seqs;
    int splits;
    int accumulate;
    float eps;
    float scale;
};

// Tunables (for measuring; TANDEM_CUDA_DEFINES): STEP_FENCE 1 makes the
// barrier use full fences around relaxed atomics, 0 acquire/release
// atomics alone; STEP_PREFETCH_AHEAD 1 has the grid prefetch the next
// layer's weights into L2 at the start of each layer (small layers only),
// 0 has each block prefetch its next phase's rows before each barrier;
// STEP_NO_BARRIER 1 (diagnostic only: wrong results) leaves the barrier out
// to show its cost.
#ifndef STEP_FENCE
#define STEP_FENCE 1
#endif
#ifndef STEP_PREFETCH_AHEAD
#define STEP_PREFETCH_AHEAD 0
#endif
#ifndef STEP_NO_BARRIER
#define STEP_NO_BARRIER 0
#endif
#ifndef STEP_MIN_BLOCKS
#define STEP_MIN_BLOCKS 1
#endif
// Layers up to this many bytes of weights are prefetched a layer ahead.
#define STEP_AHEAD_BYTES (24ll << 20)

__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Waits until every block of the grid has arrived. Reusable without a reset:
// the last block to arrive zeroes the count and then advances the
// generation the others wait on (each read the generation before arriving,
// and it cannot advance before they do). Writes before the barrier are
// visible to every block after it.
struct GridWait {
    static constexpr bool kPrefetchAll = !STEP_PREFETCH_AHEAD;
    unsigned* bar;
    unsigned blocks;
    __device__ void operator()() const {
        __syncthreads();
#if !STEP_NO_BARRIER
        if (threadIdx.x == 0) {
            unsigned* count = bar;
            unsigned* generation = bar + 1;
            unsigned g = ld_acquire_gpu(generation);
#if STEP_FENCE
            __threadfence();
            if (atomicAdd(count, 1u) == blocks - 1) {
                atomicExch(count, 0u);
                __threadfence();
                atomicAdd(generation, 1u);
            } else {
                while (ld_acquire_gpu(generation) == g) {
                }
            }
            __threadfence();
#else
            unsigned arrived;
            asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;\n" : "=r"(arrived) : "l"(count) : "memory");
            if (arrived == blocks - 1) {
                asm volatile("st.relaxed.gpu.global.u32 [%0], 0;\n" ::"l"(count) : "memory");
                asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(generation), "r"(g + 1) : "memory");
            } else {
                while (ld_acquire_gpu(generation) == g) {
                }
            }
#endif
        }
        __syncthreads();
#endif
    }
};

// Starts pulling `bytes` at `p` into L2, this thread's share of the grid's
// 128-byte lines.
__device__ __forceinline__ void prefetch_share(const void* p, long long bytes) {
    const char* c = reinterpret_cast<const char*>(p);
    long long threads = (long long)gridDim.x * blockDim.x;
    for (long long off = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 128; off < bytes; off += threads * 128)
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(c + off));
}

// Prefetches layer l's projection weights, when the layer is small enough.
__device__ void prefetch_layer(const StepParams& p, int l) {
    if (l >= p.num_layers) return;
    const StepLayer& w = p.layers[l];
    long long h = p.hidden, q = (long long)p.nh * STEP_HD, kv = (long long)p.nkv * STEP_HD;
    long long qkv = (q + 2 * kv) * h * 2, o = q * h * 2, gu = 2ll * p.f * h * 2, down = (long long)p.f * h * 2;
    if (qkv + o + gu + down > STEP_AHEAD_BYTES) return;
    prefetch_share(w.wqkv, qkv);
    prefetch_share(w.wo, o);
    prefetch_share(w.w_gate_up, gu);
    prefetch_share(w.w_down, down);
}

template <int M>
__device__ void decode_step_impl(const StepParams& p) {
    const GridWait wait{p.barrier, gridDim.x};
    int bid = blockIdx.x, nb = gridDim.x;
    int q_dim = p.nh * STEP_HD;
    // Embedding rows (the previous step's kernels are done: plain launch).
    for (int t = bid; t < M; t += nb) {
        const bf16* row = p.embed + (long long)p.tokens[t] * p.hidden;
        float* out = p.x + (long long)t * p.hidden;
        for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) out[i] = __bfloat162float(row[i]);
    }
#if STEP_PREFETCH_AHEAD
    prefetch_layer(p, 0);
#endif
    for (int l = 0; l < p.num_layers; l++) {
        const StepLayer& w = p.layers[l];
#if STEP_PREFETCH_AHEAD
        prefetch_layer(p, l + 1);
#endif
        gemv_qkv_impl<M>(p.qkv, w.k_cache, w.v_cache, w.wqkv, w.bqkv, p.x, w.attn_norm, p.eps, p.inv_freq,
                         p.positions, p.slots, p.hidden, p.nh, p.nkv, STEP_HD, bid, nb, wait);
        wait();
        int units = p.seqs * p.nkv * p.splits;
        for (int u = bid; u < units; u += nb) {
            int split = u % p.splits, kvh = (u / p.splits) % p.nkv, s = u / (p.splits * p.nkv);
            decode_attention_v2_impl<STEP_HD, STEP_G>(p.qkv, w.k_cache, w.v_cache, p.tables, p.positions,
                                                      p.part_max, p.part_sum, p.part_out, p.counters, p.attn,
                                                      p.nh, p.nkv, p.block_size, p.max_blocks, p.scale, s, kvh,
                                                      split, p.splits);
            __syncthreads();  // the next unit reuses the shared memory
        }
        gemv_out_impl<M>(p.x, w.wo, p.attn, nullptr, nullptr, nullptr, p.eps, q_dim, p.hidden, p.accumulate, bid,
                         nb, wait);
        gemv_silu_impl<M>(p.act, w.w_gate_up, p.x, w.ffn_norm, p.eps, p.hidden, p.f, bid, nb, wait);
        gemv_out_impl<M>(p.x, w.w_down, p.act, nullptr, nullptr, nullptr, p.eps, p.f, p.hidden, p.accumulate, bid,
                         nb, wait);
    }
    // Final norm of the gathered rows and the output head.
    gemv_out_impl<M>(p.logits, p.out_w, nullptr, p.x, p.final_norm, p.logit_rows, p.eps, p.hidden, p.vocab, 0, bid,
                     nb, wait);
}

#define DECODE_STEP(M)                                                                                             \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS* WARP, STEP_MIN_BLOCKS) decode_step_##M(const StepParams p) {      \
        decode_step_impl<M>(p);                                                                                  \
    }
DECODE_STEP(1)
DECODE_STEP(2)
DECODE_STEP(4)
