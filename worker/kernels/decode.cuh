// Decode-step building blocks shared by llama.cu (one kernel per operation)
// and decode_step.cu (the whole step in one kernel): the context-independent
// decode attention and the fused small-batch projections, as device
// templates that take the block's index among the blocks doing the work.
// Follows common.cuh in the source NVRTC compiles.

#define MAX_GROUP 8
#define MAX_HEAD_DIM 256
#define DECODE_WARPS 8
#define DECODE_PARTITION 64

// Decode attention for head_dim HD in {32, 64, 128}, G >= the GQA group
// (1, 2, 4 or 8): the split count no longer depends on the context, so one
// CUDA graph per batch bucket serves every context length. Grid (seqs,
// kv_heads, splits): `splits` (gridDim.z) is the most a sequence may use,
// sized by the host for the batch alone; each sequence uses
// min(splits, max(1, ctx / DECODE_MIN_CHUNK)) of them (the rest return at
// once), each a contiguous chunk of at least DECODE_MIN_CHUNK positions, so
// short contexts run one block per (sequence, KV head) that writes `out`
// directly: no partial results, no counter, no second pass.
//
// Each lane owns 8 elements of the head (one 16-byte load of K and of V), T =
// HD / 8 lanes cover one position and a warp KPW = 32 / T positions at once;
// a lane issues the K and V loads of DECODE_UNROLL positions before using
// any (at small batch the kernel is bound by memory latency). Softmax is
// online per lane group (running max and sum in registers), merged across
// the warp with shuffles and across warps once through shared memory. With
// several splits, each writes its partial max, sum and unnormalised output,
// and the last to finish (counted in `counters`) combines them.
#define DECODE_MIN_CHUNK 128

//
// The body below is one block's work, (sequence s, KV head kvh, split) of
// `splits`; it reads what earlier kernels wrote, so its caller has waited for
// them. Every return in it is uniform over the block.
template <int HD, int G>
__device__ void decode_attention_v2_impl(const float* qkv, const bf16* k_cache, const bf16* v_cache,
                                         const int* block_tables, const int* positions, float* part_max,
                                         float* part_sum, float* part_out, int* counters, bf16* out, int nh,
                                         int nkv, int block_size, int max_blocks, float scale, int s, int kvh,
                                         int split, int splits) {
    constexpr int T = HD / 8;
    constexpr int KPW = WARP / T;
    constexpr int STRIDE = DECODE_WARPS * KPW;
    // Positions in flight per lane: about 128 per block, fewer for large
    // groups (registers).
    constexpr int UNROLL_CAP = G > 4 ? 4 : 8;
    constexpr int UNROLL = HD / 16 < UNROLL_CAP ? HD / 16 : UNROLL_CAP;
    extern __shared__ float decode_smem[];
    int group = nh / nkv;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int sub = lane / T, part = lane % T;
    int ctx = positions[s] + 1;
    int used = min(splits, max(1, ctx / DECODE_MIN_CHUNK));
    if (split >= used) return;
    int chunk = (ctx + used - 1) / used;
    int begin = split * chunk, end = min(begin + chunk, ctx);

    int width = (nh + 2 * nkv) * HD;
    const float* qrow = qkv + (long long)s * width + kvh * group * HD + part * 8;
    float q[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
        if (g < group) {
            a = *reinterpret_cast<const float4*>(qrow + g * HD);
            b = *reinterpret_cast<const float4*>(qrow + g * HD + 4);
        }
        q[g][0] = a.x * scale, q[g][1] = a.y * scale, q[g][2] = a.z * scale, q[g][3] = a.w * scale;
        q[g][4] = b.x * scale, q[g][5] = b.y * scale, q[g][6] = b.z * scale, q[g][7] = b.w * scale;
    }
    const int* table = block_tables + (long long)s * max_blocks;
    long long kv_dim = (long long)nkv * HD;
    const bf16* kbase = k_cache + kvh * HD + part * 8;
    const bf16* vbase = v_cache + kvh * HD + part * 8;
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.f;
    }
    // `base` is uniform over the warp, so every lane runs the same
    // iterations (the shuffles below need the whole warp).
    for (int base = begin + warp * KPW; base < end; base += STRIDE * UNROLL) {
        uint4 kr[UNROLL], vr[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int p = min(base + sub + u * STRIDE, end - 1);
            long long slot = (long long)table[p / block_size] * block_size + p % block_size;
            kr[u] = *reinterpret_cast<const uint4*>(kbase + slot * kv_dim);
            vr[u] = *reinterpret_cast<const uint4*>(vbase + slot * kv_dim);
        }
        float d[G][UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(&kr[u]);
            float kf[8];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float2 f = __bfloat1622float2(k2[e]);
                kf[2 * e] = f.x, kf[2 * e + 1] = f.y;
            }
            bool valid = base + sub + u * STRIDE < end;
#pragma unroll
            for (int g = 0; g < G; g++) {
                float dot = 0.f;
#pragma unroll
                for (int e = 0; e < 8; e++) dot += q[g][e] * kf[e];
#pragma unroll
                for (int o = T / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
                d[g][u] = valid ? dot : -INFINITY;
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float mx = d[g][0];
#pragma unroll
            for (int u = 1; u < UNROLL; u++) mx = fmaxf(mx, d[g][u]);
            if (mx == -INFINITY) continue;  // no valid position for this lane group
            float mn = fmaxf(m[g], mx);
            float corr = __expf(m[g] - mn);  // 0 while m[g] is still -inf
            l[g] *= corr;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] *= corr;
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                float pe = __expf(d[g][u] - mn);  // 0 for invalid positions
                l[g] += pe;
                const __nv_bfloat162* v2 = reinterpret_cast<const __nv_bfloat162*>(&vr[u]);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float2 f = __bfloat1622float2(v2[e]);
                    acc[g][2 * e] += pe * f.x;
                    acc[g][2 * e + 1] += pe * f.y;
                }
            }
            m[g] = mn;
        }
    }
    // Merge the lane groups of the warp (lanes part, part + T, ...).
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int o = T; o < WARP; o <<= 1) {
            float mo = __shfl_xor_sync(0xffffffff, m[g], o);
            float lo = __shfl_xor_sync(0xffffffff, l[g], o);
            float mn = fmaxf(m[g], mo);
            float ca = m[g] == -INFINITY ? 0.f : __expf(m[g] - mn);
            float cb = mo == -INFINITY ? 0.f : __expf(mo - mn);
            l[g] = l[g] * ca + lo * cb;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float ao = __shfl_xor_sync(0xffffffff, acc[g][e], o);
                acc[g][e] = acc[g][e] * ca + ao * cb;
            }
            m[g] = mn;
        }
    }
    // Merge the warps: [DECODE_WARPS][G] max and sum, [DECODE_WARPS][G][HD] output.
    float* sm_m = decode_smem;
    float* sm_l = sm_m + DECODE_WARPS * G;
    float* sm_acc = sm_l + DECODE_WARPS * G;
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            if (part == 0) {
                sm_m[warp * G + g] = m[g];
                sm_l[warp * G + g] = l[g];
            }
            float4* dst = reinterpret_cast<float4*>(sm_acc + (warp * G + g) * HD + part * 8);
            dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
            dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
        }
    }
    __syncthreads();
    long long head0 = (long long)s * nh + kvh * group;
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        int g = i / HD, dd = i % HD;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; w++) mx = fmaxf(mx, sm_m[w * G + g]);
        float sum = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; w++) {
            float mw = sm_m[w * G + g];
            float c = mw == -INFINITY ? 0.f : __expf(mw - mx);
            sum += c * sm_l[w * G + g];
            o += c * sm_acc[(w * G + g) * HD + dd];
        }
        if (used == 1) {
            out[(head0 + g) * HD + dd] = __float2bfloat16(o / sum);
        } else {
            long long pi = (head0 + g) * splits + split;
            part_out[pi * HD + dd] = o;
            if (dd == 0) {
                part_max[pi] = mx;
                part_sum[pi] = sum;
            }
        }
    }
    if (used == 1) return;
    // The last split of this (sequence, KV head) to finish combines them all;
    // it resets the counter for the next step (graph replays reuse it).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = counters + s * nkv + kvh;
        last = atomicAdd(counter, 1) == used - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        int g = i / HD, dd = i % HD;
        long long pb = (head0 + g) * splits;
        float mx = -INFINITY;
        for (int j = 0; j < used; j++) mx = fmaxf(mx, __ldcg(part_max + pb + j));
        float sum = 0.f, o = 0.f;
        for (int j = 0; j < used; j++) {
            float w = __expf(__ldcg(part_max + pb + j) - mx);
            sum += w * __ldcg(part_sum + pb + j);
            o += w * __ldcg(part_out + (pb + j) * HD + dd);
        }
        out[(head0 + g) * HD + dd] = __float2bfloat16(o / sum);
    }
}

// ---------------------------------------------------------------------------
// Fused matrix-vector products for steps of at most 4 tokens (batch-1..4
// decode). Such steps read every weight once and are bound by memory latency
// and launch count, not FLOPs: cuBLAS plus separate RMSNorm, RoPE/KV-write
// and SiLU kernels make 9 launches per layer; these make 4 (plus attention).
// Each block stages its M input rows in shared memory as bf16 (normalising
// them first when a norm weight is given, exactly as rms_norm does), then
// each warp takes pairs of weight rows, 16-byte loads with several in flight
// per lane, and applies the epilogue of its kind to the two dot products of
// each input row. Requirements (checked on the host): K % 8 == 0, rows 16-byte
// aligned.
// ---------------------------------------------------------------------------

#define GEMV_WARPS 8
// 16-byte loads of each of a pair's rows a lane issues at once (tunable for
// measuring: TANDEM_CUDA_DEFINES, see device.rs).
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4
#endif

// Stages M input rows of width K into xs (bf16): x (f32) normalised with
// norm_w when given (rows gathered through `rows` when non-null), else the
// bf16 rows of `in` copied.
template <int M>
__device__ void gemv_stage(bf16* xs, const float* x, const float* norm_w, const int* rows, const bf16* in, int K,
                           float eps) {
    __shared__ float scratch[32];
    if (norm_w) {
#pragma unroll
        for (int m = 0; m < M; m++) {
            int src = rows ? rows[m] : m;
            const float* r = x + (long long)src * K;
            float ss = 0.f;
            for (int i = threadIdx.x; i < K; i += blockDim.x) ss += r[i] * r[i];
            ss = block_sum(ss, scratch);
            float inv = rsqrtf(ss / K + eps);
            for (int i = threadIdx.x; i < K; i += blockDim.x) xs[m * K + i] = __float2bfloat16(r[i] * inv * norm_w[i]);
        }
    } else {
        const uint4* src = reinterpret_cast<const uint4*>(in);
        uint4* dst = reinterpret_cast<uint4*>(xs);
        for (int i = threadIdx.x; i < M * K / 8; i += blockDim.x) dst[i] = src[i];
    }
    __syncthreads();
}

// Matrices up to this size (bytes) have their first rows prefetched: small
// ones are bound by latency, and their rows fit in L2 next to the running
// kernel's; prefetching a big one early would only compete with the running
// kernel for memory bandwidth and evict its lines.
#ifndef GEMV_PREFETCH_BYTES
#define GEMV_PREFETCH_BYTES (16ll << 20)
#endif

// Starts pulling weight rows a and b (K bf16 each) into L2.
__device__ __forceinline__ void prefetch_rows(const bf16* wa, const bf16* wb, int K, int lane) {
    const char* pa = reinterpret_cast<const char*>(wa);
    const char* pb = reinterpret_cast<const char*>(wb);
    for (int off = lane * 128; off < K * 2; off += WARP * 128) {
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(pa + off));
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(pb + off));
    }
}

// How a projection waits for the work before it, after prefetching its
// weights (which nothing earlier writes): as its own kernel, it lets the next
// kernel launch and waits for the previous one (programmatic dependent
// launch), having prefetched each warp's first pair of rows; inside the
// whole-step kernel (decode_step.cu) it waits at a grid barrier, having
// prefetched every pair the warp will take.
struct PdlWait {
    static constexpr bool kPrefetchAll = false;
    __device__ void operator()() const {
        pdl_trigger();
        pdl_wait();
    }
};

// Prefetches (for a small matrix of `rows` rows of width K) the row pairs
// the calling warp takes, first = its first pair index, stride = pairs per
// round over all blocks, then waits as `wait` does. rows_of(p, a, b) names
// pair p's two rows.
template <class Wait, class RowsOf>
__device__ __forceinline__ void gemv_prologue(const bf16* w, int K, long long rows, int first, int pairs, int stride,
                                              int lane, RowsOf rows_of, const Wait& wait) {
    if (rows * K * 2 <= GEMV_PREFETCH_BYTES) {
        for (int p = min(first, pairs - 1); p < pairs; p += stride) {
            int a, b;
            rows_of(p, a, b);
            prefetch_rows(w + (long long)a * K, w + (long long)b * K, K, lane);
            if (!Wait::kPrefetchAll) break;
        }
    }
    wait();
}

__device__ __forceinline__ void fma8(float& acc, uint4 w, uint4 x) {
    const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&w);
    const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 wf = __bfloat1622float2(w2[k]);
        float2 xf = __bfloat1622float2(x2[k]);
        acc = fmaf(wf.x, xf.x, acc);
        acc = fmaf(wf.y, xf.y, acc);
    }
}

// acc[m][0] = wa · xs[m], acc[m][1] = wb · xs[m], summed over the warp (every
// lane gets the sums).
template <int M>
__device__ __forceinline__ void gemv_dot2(float (&acc)[M][2], const bf16* wa, const bf16* wb, const bf16* xs, int K,
                                          int lane) {
#pragma unroll
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = 0.f;
    const uint4* a4 = reinterpret_cast<const uint4*>(wa);
    const uint4* b4 = reinterpret_cast<const uint4*>(wb);
    const uint4* x4 = reinterpret_cast<const uint4*>(xs);
    int nv = K / 8;
    for (int v0 = lane; v0 < nv; v0 += WARP * GEMV_UNROLL) {
        uint4 ra[GEMV_UNROLL], rb[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            int v = v0 + u * WARP;
            if (v < nv) {
                ra[u] = __ldg(a4 + v);
                rb[u] = __ldg(b4 + v);
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            int v = v0 + u * WARP;
            if (v < nv) {
#pragma unroll
                for (int m = 0; m < M; m++) {
                    uint4 xv = x4[m * nv + v];
                    fma8(acc[m][0], ra[u], xv);
                    fma8(acc[m][1], rb[u], xv);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
        acc[m][0] = warp_sum(acc[m][0]);
        acc[m][1] = warp_sum(acc[m][1]);
    }
}

// Normalise, project to Q|K|V, add the bias, rotate Q and K (half-split RoPE)
// and write K and V (bf16) to the cache at slots[m] (skipped when < 0); Q goes
// to qkv (f32, row width nh*hd + 2*nkv*hd) for the attention kernel. A pair
// is two rows rotated together (j, j + hd/2 of one Q or K head) or two
// adjacent V rows.
//
// Block `bid` of `nb` takes pairs bid * GEMV_WARPS + warp, + nb * GEMV_WARPS,
// ... (here and in the other projections).
template <int M, class Wait>
__device__ void gemv_qkv_impl(float* qkv, bf16* k_cache, bf16* v_cache, const bf16* w, const float* bias,
                              const float* x, const float* norm_w, float eps, const float* inv_freq,
                              const int* positions, const int* slots, int K, int nh, int nkv, int hd, int bid, int nb,
                              const Wait& wait) {
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    bf16* xs = reinterpret_cast<bf16*>(gemv_smem);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int half = hd / 2, q_dim = nh * hd, kv_dim = nkv * hd, width = q_dim + 2 * kv_dim;
    int rot_pairs = (nh + nkv) * half, pairs = rot_pairs + kv_dim / 2;
    auto rows_of = [&](int p, int& a, int& b) {
        if (p < rot_pairs) {
            a = (p / half) * hd + p % half;
            b = a + half;
        } else {
            a = q_dim + kv_dim + 2 * (p - rot_pairs);
            b = a + 1;
        }
    };
    int first = bid * GEMV_WARPS + warp, stride = nb * GEMV_WARPS;
    gemv_prologue(w, K, 2ll * pairs, first, pairs, stride, lane, rows_of, wait);
    gemv_stage<M>(xs, x, norm_w, nullptr, nullptr, K, eps);
    for (int p = first; p < pairs; p += stride) {
        int a, b;
        rows_of(p, a, b);
        float acc[M][2];
        gemv_dot2<M>(acc, w + (long long)a * K, w + (long long)b * K, xs, K, lane);
#pragma unroll
        for (int m = 0; m < M; m++) {
            if (lane != m) continue;  // lane m writes token m's results
            float ya = acc[m][0], yb = acc[m][1];
            if (bias) {
                ya += bias[a];
                yb += bias[b];
            }
            int slot = slots[m];
            if (p < rot_pairs) {
                int j = p % half, head = p / half;
                float s, c;
                sincosf((float)positions[m] * inv_freq[j], &s, &c);
                float y0 = ya * c - yb * s, y1 = ya * s + yb * c;
                if (head < nh) {
                    qkv[(long long)m * width + a] = y0;
                    qkv[(long long)m * width + b] = y1;
                } else if (slot >= 0) {
                    bf16* dst = k_cache + (long long)slot * kv_dim + (a - q_dim);
                    dst[0] = __float2bfloat16(y0);
                    dst[half] = __float2bfloat16(y1);
                }
            } else if (slot >= 0) {
                bf16* dst = v_cache + (long long)slot * kv_dim + (a - q_dim - kv_dim);
                dst[0] = __float2bfloat16(ya);
                dst[1] = __float2bfloat16(yb);
            }
        }
    }
}

// Normalise, project to gate|up (w is [2f, K]: gate rows then up rows) and
// write act[m, i] = silu(gate) * up (gate and up rounded to bf16 first, as
// the unfused path stores them).
template <int M, class Wait>
__device__ void gemv_silu_impl(bf16* act, const bf16* w, const float* x, const float* norm_w, float eps, int K,
                               int f, int bid, int nb, const Wait& wait) {
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    bf16* xs = reinterpret_cast<bf16*>(gemv_smem);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int first = bid * GEMV_WARPS + warp, stride = nb * GEMV_WARPS;
    auto rows_of = [f](int p, int& a, int& b) {
        a = p;
        b = f + p;
    };
    gemv_prologue(w, K, 2ll * f, first, f, stride, lane, rows_of, wait);
    gemv_stage<M>(xs, x, norm_w, nullptr, nullptr, K, eps);
    for (int p = first; p < f; p += stride) {
        float acc[M][2];
        gemv_dot2<M>(acc, w + (long long)p * K, w + (long long)(f + p) * K, xs, K, lane);
#pragma unroll
        for (int m = 0; m < M; m++)
            if (lane == m) {
                float g = __bfloat162float(__float2bfloat16(acc[m][0]));
                float u = __bfloat162float(__float2bfloat16(acc[m][1]));
                act[(long long)m * f + p] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
            }
    }
}

// out[m, n] (f32, row width N) = w[n] · input[m], added to what is there when
// `accumulate` (the residual adds of the output and down projections). The
// input is either bf16 rows `in` or f32 rows of x normalised with norm_w and
// gathered through `rows` (the final norm and output head).
template <int M, class Wait>
__device__ void gemv_out_impl(float* out, const bf16* w, const bf16* in, const float* x, const float* norm_w,
                              const int* rows, float eps, int K, int N, int accumulate, int bid, int nb,
                              const Wait& wait) {
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    bf16* xs = reinterpret_cast<bf16*>(gemv_smem);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int pairs = (N + 1) / 2;
    int first = bid * GEMV_WARPS + warp, stride = nb * GEMV_WARPS;
    auto rows_of = [N](int p, int& a, int& b) {
        a = 2 * p;
        b = min(a + 1, N - 1);
    };
    gemv_prologue(w, K, N, first, pairs, stride, lane, rows_of, wait);
    gemv_stage<M>(xs, x, norm_w, rows, in, K, eps);
    for (int p = first; p < pairs; p += stride) {
        int a = 2 * p, b = min(a + 1, N - 1);
        float acc[M][2];
        gemv_dot2<M>(acc, w + (long long)a * K, w + (long long)b * K, xs, K, lane);
#pragma unroll
        for (int m = 0; m < M; m++)
            if (lane == m) {
                float* o = out + (long long)m * N;
                o[a] = accumulate ? o[a] + acc[m][0] : acc[m][0];
                if (b != a) o[b] = accumulate ? o[b] + acc[m][1] : acc[m][1];
            }
    }
}

