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

// From the host (tuning.rs): GEMV_WARPS warps a block; GEMV_UNROLL 16-byte
// loads of each of a pair's rows a lane issues at once.

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
// kernel for memory bandwidth and evict its lines (GEMV_PREFETCH_BYTES).

// Loads 16-byte vectors v0, v0 + 32, ... (GEMV_UNROLL of them, those below
// nv) of rows a and b.
__device__ __forceinline__ void gemv_load(uint4 (&ra)[GEMV_UNROLL], uint4 (&rb)[GEMV_UNROLL], const bf16* wa,
                                          const bf16* wb, int v0, int nv) {
    const uint4* a4 = reinterpret_cast<const uint4*>(wa);
    const uint4* b4 = reinterpret_cast<const uint4*>(wb);
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++) {
        int v = v0 + u * WARP;
        if (v < nv) {
            ra[u] = __ldg(a4 + v);
            rb[u] = __ldg(b4 + v);
        }
    }
}

// Loads the first vectors of the warp's first rows a and b into ra and rb
// (one round of loads, whose latency then overlaps the staging of the input
// rows whether or not the kernel launched early), and for a matrix (rows x K
// bf16) of at most GEMV_PREFETCH_BYTES starts pulling the rest of those rows
// into L2; the block's norm weights (K floats, when given) go into L1. Then
// lets the next kernel launch and waits for the previous one: weights do not
// depend on it, so they stream in while it finishes.
__device__ __forceinline__ void gemv_prologue(uint4 (&ra)[GEMV_UNROLL], uint4 (&rb)[GEMV_UNROLL], const bf16* wa,
                                              const bf16* wb, int K, long long rows, int lane,
                                              const float* norm_w = nullptr) {
    gemv_load(ra, rb, wa, wb, lane, K / 8);
    if (rows * K * 2 <= GEMV_PREFETCH_BYTES) {
        const char* pa = reinterpret_cast<const char*>(wa);
        const char* pb = reinterpret_cast<const char*>(wb);
        for (int off = lane * 128; off < K * 2; off += WARP * 128) {
            asm volatile("prefetch.global.L2 [%0];\n" ::"l"(pa + off));
            asm volatile("prefetch.global.L2 [%0];\n" ::"l"(pb + off));
        }
    }
    if (norm_w)
        for (int i = threadIdx.x * 32; i < K; i += blockDim.x * 32)
            asm volatile("prefetch.global.L1 [%0];\n" ::"l"(norm_w + i));
    pdl_trigger();
    pdl_wait();
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
// lane gets the sums). `loaded`: ra and rb already hold the first vectors
// (gemv_prologue loads them for the warp's first pair).
template <int M>
__device__ __forceinline__ void gemv_dot2(float (&acc)[M][2], const bf16* wa, const bf16* wb, const bf16* xs, int K,
                                          int lane, uint4 (&ra)[GEMV_UNROLL], uint4 (&rb)[GEMV_UNROLL], bool loaded) {
#pragma unroll
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = 0.f;
    const uint4* x4 = reinterpret_cast<const uint4*>(xs);
    int nv = K / 8;
    for (int v0 = lane; v0 < nv; v0 += WARP * GEMV_UNROLL) {
        if (!loaded || v0 != lane) gemv_load(ra, rb, wa, wb, v0, nv);
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
template <int M>
__device__ void gemv_qkv_impl(float* qkv, bf16* k_cache, bf16* v_cache, const bf16* w, const float* bias,
                              const float* x, const float* norm_w, float eps, const float* inv_freq,
                              const int* positions, const int* slots, int K, int nh, int nkv, int hd) {
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
    // The rotation of the warp's first pair, computed before the wait: the
    // positions are the step's inputs (lane m holds token m's).
    int p_first = blockIdx.x * GEMV_WARPS + warp;
    float s_first = 0.f, c_first = 1.f;
    if (p_first < rot_pairs && lane < M) sincosf((float)positions[lane] * inv_freq[p_first % half], &s_first, &c_first);
    uint4 ra[GEMV_UNROLL], rb[GEMV_UNROLL];
    {
        int p0 = min(p_first, pairs - 1), a, b;
        rows_of(p0, a, b);
        gemv_prologue(ra, rb, w + (long long)a * K, w + (long long)b * K, K, 2ll * pairs, lane, norm_w);
    }
    gemv_stage<M>(xs, x, norm_w, nullptr, nullptr, K, eps);
    for (int p = p_first; p < pairs; p += gridDim.x * GEMV_WARPS) {
        int a, b;
        rows_of(p, a, b);
        float acc[M][2];
        gemv_dot2<M>(acc, w + (long long)a * K, w + (long long)b * K, xs, K, lane, ra, rb, p == p_first);
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
                float s = s_first, c = c_first;
                if (p != p_first) sincosf((float)positions[m] * inv_freq[j], &s, &c);
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
template <int M>
__device__ void gemv_silu_impl(bf16* act, const bf16* w, const float* x, const float* norm_w, float eps, int K,
                               int f) {
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    bf16* xs = reinterpret_cast<bf16*>(gemv_smem);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int p_first = blockIdx.x * GEMV_WARPS + warp, p0 = min(p_first, f - 1);
    uint4 ra[GEMV_UNROLL], rb[GEMV_UNROLL];
    gemv_prologue(ra, rb, w + (long long)p0 * K, w + (long long)(f + p0) * K, K, 2ll * f, lane, norm_w);
    gemv_stage<M>(xs, x, norm_w, nullptr, nullptr, K, eps);
    for (int p = p_first; p < f; p += gridDim.x * GEMV_WARPS) {
        float acc[M][2];
        gemv_dot2<M>(acc, w + (long long)p * K, w + (long long)(f + p) * K, xs, K, lane, ra, rb,
                     p == p_first);
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
template <int M>
__device__ void gemv_out_impl(float* out, const bf16* w, const bf16* in, const float* x, const float* norm_w,
                              const int* rows, float eps, int K, int N, int accumulate) {
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    bf16* xs = reinterpret_cast<bf16*>(gemv_smem);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int pairs = (N + 1) / 2;
    int p_first = blockIdx.x * GEMV_WARPS + warp, a0 = 2 * min(p_first, pairs - 1);
    uint4 ra[GEMV_UNROLL], rb[GEMV_UNROLL];
    gemv_prologue(ra, rb, w + (long long)a0 * K, w + (long long)min(a0 + 1, N - 1) * K, K, N, lane, norm_w);
    gemv_stage<M>(xs, x, norm_w, rows, in, K, eps);
    for (int p = p_first; p < pairs; p += gridDim.x * GEMV_WARPS) {
        int a = 2 * p, b = min(a + 1, N - 1);
        // Lane m reads what it adds to before the dot products, so the load
        // is in flight while they run.
        float prev_a = 0.f, prev_b = 0.f;
        if (accumulate && lane < M) {
            prev_a = out[(long long)lane * N + a];
            prev_b = out[(long long)lane * N + b];
        }
        float acc[M][2];
        gemv_dot2<M>(acc, w + (long long)a * K, w + (long long)b * K, xs, K, lane, ra, rb, p == p_first);
#pragma unroll
        for (int m = 0; m < M; m++)
            if (lane == m) {
                float* o = out + (long long)m * N;
                o[a] = prev_a + acc[m][0];
                if (b != a) o[b] = prev_b + acc[m][1];
            }
    }
}

#define GEMV_KERNELS(M)                                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS* WARP) gemv_qkv_##M(                                  \
        float* qkv, bf16* k_cache, bf16* v_cache, const bf16* w, const float* bias, const float* x,              \
        const float* norm_w, float eps, const float* inv_freq, const int* positions, const int* slots, int K,     \
        int nh, int nkv, int hd) {                                                                              \
        gemv_qkv_impl<M>(qkv, k_cache, v_cache, w, bias, x, norm_w, eps, inv_freq, positions, slots, K, nh, nkv,  \
                         hd);                                                                                    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS* WARP)                                                \
        gemv_silu_##M(bf16* act, const bf16* w, const float* x, const float* norm_w, float eps, int K, int f) {   \
        gemv_silu_impl<M>(act, w, x, norm_w, eps, K, f);                                                         \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS* WARP)                                                \
        gemv_out_##M(float* out, const bf16* w, const bf16* in, const float* x, const float* norm_w,              \
                     const int* rows, float eps, int K, int N, int accumulate) {                                  \
        gemv_out_impl<M>(out, w, in, x, norm_w, rows, eps, K, N, accumulate);                                     \
    }
GEMV_KERNELS(1)
GEMV_KERNELS(2)
GEMV_KERNELS(4)
