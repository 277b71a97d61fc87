// Decode attention: one query token per sequence over the paged KV cache
// (flash-decoding, split over the context). decode_attention_v2_{HD}_{G}
// for head dims 32, 64 and 128; decode_attention_{PL} for the others.

// Flash-decoding: one query token per sequence. Grid (seqs, kv_heads,
// splits); each block takes DECODE_PARTITION positions of one sequence's
// context for the `group` query heads sharing one KV head (GQA: K and V are
// read once for the group). Writes, per (seq, head, split), the partial
// softmax max, sum and unnormalised output; the last split of a (sequence, KV
// head) to finish combines them into out[s, head, :] (bf16), counting
// finished splits in `counters`. Sequence s's query is row s of
// qkv; its context is positions[s] + 1 tokens. Each warp takes a run of
// DECODE_PER_WARP positions and issues all their loads before using them
// (decode attention is bound by memory latency, not bandwidth, at small
// batch). PL = head_dim / 32 elements per lane, a template parameter so the
// per-lane arrays stay in registers.
#define DECODE_PER_WARP (DECODE_PARTITION / DECODE_WARPS)

// Called by every thread of a split's block once its partial results are
// written: the last of the `used` splits of one (sequence, KV head) to finish
// combines them all into `out`, for that KV head's `group` query heads
// (head0, head0 + 1, ...), and resets the counter for the next step (graph
// replays reuse it).
__device__ __forceinline__ void combine_if_last_split(int* counter, int used, const float* part_max,
                                                      const float* part_sum, const float* part_out, bf16* out,
                                                      long long head0, int group, int hd, int splits) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1) == used - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
        int g = i / hd, d = i % hd;
        long long base = (head0 + g) * splits;
        float m = -INFINITY;
        for (int j = 0; j < used; j++) m = fmaxf(m, __ldcg(part_max + base + j));
        float sum = 0.f, o = 0.f;
        for (int j = 0; j < used; j++) {
            float w = __expf(__ldcg(part_max + base + j) - m);
            sum += w * __ldcg(part_sum + base + j);
            o += w * __ldcg(part_out + (base + j) * hd + d);
        }
        out[(head0 + g) * hd + d] = __float2bfloat16(o / sum);
    }
}

template <int PL>
__device__ void decode_attention_impl(const float* qkv, const bf16* k_cache, const bf16* v_cache,
                                      const int* block_tables, const int* positions, float* part_max,
                                      float* part_sum, float* part_out, int* counters, bf16* out, int nh, int nkv,
                                      int block_size, int max_blocks, int splits, float scale) {
    constexpr int hd = PL * WARP;
    extern __shared__ float decode_smem[];
    int s = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    int group = nh / nkv;
    int ctx = positions[s] + 1;
    int begin = split * DECODE_PARTITION;
    int end = min(begin + DECODE_PARTITION, ctx);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    long long part_base = ((long long)s * nh + kvh * group) * splits + split;
    pdl_trigger();
    pdl_wait();
    if (begin >= end) return;  // phase 2 reads only the splits this context reaches
    float* q = decode_smem;                        // [group, hd]
    float* scores = q + group * hd;                // [group, DECODE_PARTITION]
    float* red = scores + group * DECODE_PARTITION;  // [DECODE_WARPS, group, hd]
    int q_dim = nh * hd, width = q_dim + 2 * nkv * hd;
    const float* qrow = qkv + (long long)s * width + kvh * group * hd;
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) q[i] = qrow[i] * scale;
    const int* table = block_tables + (long long)s * max_blocks;
    int kv_dim = nkv * hd;
    int first = begin + warp * DECODE_PER_WARP;
    long long offs[DECODE_PER_WARP];
#pragma unroll
    for (int i = 0; i < DECODE_PER_WARP; i++) {
        int p = min(first + i, end - 1);
        offs[i] = ((long long)table[p / block_size] * block_size + p % block_size) * kv_dim + kvh * hd + lane * PL;
    }
    float kf[DECODE_PER_WARP][PL];
#pragma unroll
    for (int i = 0; i < DECODE_PER_WARP; i++)
#pragma unroll
        for (int e = 0; e < PL; e++) kf[i][e] = __bfloat162float(k_cache[offs[i] + e]);
    __syncthreads();  // q staged
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        if (g < group) {
#pragma unroll
            for (int i = 0; i < DECODE_PER_WARP; i++) {
                float d = 0.f;
#pragma unroll
                for (int e = 0; e < PL; e++) d += q[g * hd + lane * PL + e] * kf[i][e];
                d = warp_sum(d);
                if (lane == 0 && first + i < end) scores[g * DECODE_PARTITION + (first + i - begin)] = d;
            }
        }
    }
    // V loads overlap the softmax below.
    float vf[DECODE_PER_WARP][PL];
#pragma unroll
    for (int i = 0; i < DECODE_PER_WARP; i++)
#pragma unroll
        for (int e = 0; e < PL; e++) vf[i][e] = __bfloat162float(v_cache[offs[i] + e]);
    __syncthreads();
    // Softmax statistics per head: warp w handles heads w, w + DECODE_WARPS, ...
    int n = end - begin;
    for (int g = warp; g < group; g += DECODE_WARPS) {
        float m = -INFINITY;
        for (int i = lane; i < n; i += WARP) m = fmaxf(m, scores[g * DECODE_PARTITION + i]);
        m = warp_max(m);
        float sum = 0.f;
        for (int i = lane; i < n; i += WARP) {
            float e = __expf(scores[g * DECODE_PARTITION + i] - m);
            scores[g * DECODE_PARTITION + i] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            part_max[part_base + (long long)g * splits] = m;
            part_sum[part_base + (long long)g * splits] = sum;
        }
    }
    __syncthreads();
    // Weighted V: each warp its positions, lanes the head dimension.
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        if (g < group) {
            float acc[PL];
#pragma unroll
            for (int e = 0; e < PL; e++) acc[e] = 0.f;
#pragma unroll
            for (int i = 0; i < DECODE_PER_WARP; i++) {
                float w = first + i < end ? scores[g * DECODE_PARTITION + (first + i - begin)] : 0.f;
#pragma unroll
                for (int e = 0; e < PL; e++) acc[e] += w * vf[i][e];
            }
#pragma unroll
            for (int e = 0; e < PL; e++) red[(warp * group + g) * hd + lane * PL + e] = acc[e];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; w++) o += red[w * group * hd + i];
        int g = i / hd, d = i % hd;
        part_out[(part_base + (long long)g * splits) * hd + d] = o;
    }
    // Phase 2 without another launch.
    int used = min(splits, (ctx + DECODE_PARTITION - 1) / DECODE_PARTITION);
    combine_if_last_split(counters + s * nkv + kvh, used, part_max, part_sum, part_out, out,
                          (long long)s * nh + kvh * group, group, hd, splits);
}

#define DECODE_ATTENTION(PL)                                                                                      \
    extern "C" __global__ void decode_attention_##PL(                                                            \
        const float* qkv, const bf16* k_cache, const bf16* v_cache, const int* block_tables, const int* positions, \
        float* part_max, float* part_sum, float* part_out, int* counters, bf16* out, int nh, int nkv, int hd,     \
        int block_size, int max_blocks, int splits, float scale) {                                                \
        decode_attention_impl<PL>(qkv, k_cache, v_cache, block_tables, positions, part_max, part_sum, part_out,   \
                                  counters, out, nh, nkv, block_size, max_blocks, splits, scale);                 \
    }
// Only for the head dims decode_attention_v2 does not cover (96, 160, ...).
DECODE_ATTENTION(3)
DECODE_ATTENTION(5)
DECODE_ATTENTION(6)
DECODE_ATTENTION(7)
DECODE_ATTENTION(8)

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
// DECODE_V2_ROUND: positions a block loads in one round (before the first
// use of any), when registers allow.

template <int HD, int G>
__device__ void decode_attention_v2_impl(const float* qkv, const bf16* k_cache, const bf16* v_cache,
                                         const int* block_tables, const int* positions, float* part_max,
                                         float* part_sum, float* part_out, int* counters, bf16* out, int nh,
                                         int nkv, int block_size, int max_blocks, float scale) {
    constexpr int T = HD / 8;
    constexpr int KPW = WARP / T;
    constexpr int STRIDE = DECODE_WARPS * KPW;
    // Positions in flight per lane: DECODE_V2_ROUND per block, at most 4 a
    // lane for large groups and 8 for the others (registers).
    constexpr int UNROLL_CAP = G > 4 ? 4 : 8;
    constexpr int UNROLL_WANT = DECODE_V2_ROUND / STRIDE > 0 ? DECODE_V2_ROUND / STRIDE : 1;
    constexpr int UNROLL = UNROLL_WANT < UNROLL_CAP ? UNROLL_WANT : UNROLL_CAP;
    constexpr int ROUND = STRIDE * UNROLL;
    extern __shared__ float decode_smem[];
    int s = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    int group = nh / nkv;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int sub = lane / T, part = lane % T;
    pdl_trigger();
    // Until pdl_wait only what the step had before it began is read: its
    // inputs (positions, block tables) and the cache rows of earlier
    // positions. Q and the newest position's K and V come from the kernel
    // before, still running. Every block waits before it ends (see
    // pdl_trigger).
    int ctx = positions[s] + 1, newest = ctx - 1;
    int used = min(splits, max(1, ctx / DECODE_MIN_CHUNK));
    if (split >= used) {
        pdl_wait();
        return;
    }
    int chunk = (ctx + used - 1) / used;
    int begin = split * chunk, end = min(begin + chunk, ctx);
    const int* table = block_tables + (long long)s * max_blocks;
    long long kv_dim = (long long)nkv * HD;
    const bf16* kbase = k_cache + kvh * HD + part * 8;
    const bf16* vbase = v_cache + kvh * HD + part * 8;
    auto row_of = [&](int p) { return (long long)table[p / block_size] * block_size + p % block_size; };
    uint4 kr[UNROLL], vr[UNROLL];
    // This lane's part of position p's K and V into kr[u] and vr[u].
    auto load_kv = [&](int u, int p) {
        long long slot = row_of(p);
        kr[u] = *reinterpret_cast<const uint4*>(kbase + slot * kv_dim);
        vr[u] = *reinterpret_cast<const uint4*>(vbase + slot * kv_dim);
    };
    // The first round's rows in registers (but the newest position's), the
    // rest of the chunk's into L2, one prefetch per 128-byte line.
    int base0 = begin + warp * KPW;
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        int p = min(base0 + sub + u * STRIDE, end - 1);
        if (p != newest) load_kv(u, p);
    }
    int old_end = min(end, newest);
    if (part % 8 == 0) {
        for (int b = base0 + ROUND; b < old_end; b += ROUND) {
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                int p = b + sub + u * STRIDE;
                if (p < old_end) {
                    long long slot = row_of(p);
                    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(kbase + slot * kv_dim));
                    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(vbase + slot * kv_dim));
                }
            }
        }
    }
    pdl_wait();
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        int p = min(base0 + sub + u * STRIDE, end - 1);
        if (p == newest) load_kv(u, p);
    }

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
    for (int base = base0; base < end; base += ROUND) {
        if (base != base0) {
#pragma unroll
            for (int u = 0; u < UNROLL; u++) load_kv(u, min(base + sub + u * STRIDE, end - 1));
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
    combine_if_last_split(counters + s * nkv + kvh, used, part_max, part_sum, part_out, out, head0, group, HD,
                          splits);
}

#define DECODE_ATTENTION_V2(HD, G)                                                                                \
    extern "C" __global__ void __launch_bounds__(DECODE_WARPS* WARP) decode_attention_v2_##HD##_##G(            \
        const float* qkv, const bf16* k_cache, const bf16* v_cache, const int* block_tables, const int* positions, \
        float* part_max, float* part_sum, float* part_out, int* counters, bf16* out, int nh, int nkv,             \
        int block_size, int max_blocks, float scale) {                                                            \
        decode_attention_v2_impl<HD, G>(qkv, k_cache, v_cache, block_tables, positions, part_max, part_sum,      \
                                        part_out, counters, out, nh, nkv, block_size, max_blocks, scale);        \
    }
#define DECODE_ATTENTION_V2_GROUPS(HD) \
    DECODE_ATTENTION_V2(HD, 1)         \
    DECODE_ATTENTION_V2(HD, 2)         \
    DECODE_ATTENTION_V2(HD, 4)         \
    DECODE_ATTENTION_V2(HD, 8)
DECODE_ATTENTION_V2_GROUPS(32)
DECODE_ATTENTION_V2_GROUPS(64)
DECODE_ATTENTION_V2_GROUPS(128)
