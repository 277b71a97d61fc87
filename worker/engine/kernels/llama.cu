// Kernels of Tandem's CUDA backend (worker/src/engine/backend/cuda/).
//
// Compiled at start by NVRTC for the device's architecture. Storage is bf16
// (weights, KV cache, GEMM inputs); arithmetic is f32. The residual stream,
// Q (after RoPE) and the QKV projection output stay f32.
//
// KV cache layout, per layer and for K and V alike: [num_slots, kv_heads,
// head_dim] with slot = block * block_size + position % block_size, as the
// CPU backend lays it out.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

#define WARP 32
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Programmatic dependent launch (Hopper; no-ops when a kernel is launched
// without it). Decode kernels let the next kernel of the stream start at once
// (`pdl_trigger`), do what does not depend on the previous kernel (such as
// prefetching their weights into L2), then wait for it to finish and its
// writes to be visible (`pdl_wait`) before reading anything it produced.
// Every kernel that triggers also waits before finishing, so finishing
// implies every earlier kernel of the stream has finished too.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + WARP - 1) / WARP;
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

// splitmix64: a counter-based generator, so every element is independent of
// launch geometry and the same seed gives the same weights on any card.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// Two f32 rounded to bf16 and packed in one register, the first in the low half
// (also the bf16 pair of an mma operand register).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ unsigned pack_bf16(bf16 lo, bf16 hi) {
    __nv_bfloat162 v = __halves2bfloat162(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

extern "C" {

// out[i] = uniform(-scale, scale) (bf16), for --load-format dummy.
__global__ void fill_uniform_bf16(bf16* out, unsigned long long n, unsigned long long seed, float scale) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = mix64(seed ^ mix64(i));
        float u = (float)(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        out[i] = __float2bfloat16((2.f * u - 1.f) * scale);
    }
}

// out[i] = value (f32): norm weights of dummy models.
__global__ void fill_f32(float* out, unsigned long long n, float value) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = value;
}

// x[t, :] = embed[tokens[t], :] as f32. Grid: one block per token.
__global__ void embed_gather(float* x, const bf16* embed, const int* tokens, int hidden) {
    int t = blockIdx.x;
    const bf16* row = embed + (long long)tokens[t] * hidden;
    float* out = x + (long long)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = __bfloat162float(row[i]);
}

// out[r, :] = bf16(x[src, :] / rms(x[src, :]) * w) with src = rows ? rows[r] : r.
// Grid: one block per output row. `rows` gathers the last token of each
// sequence before the output head. When hidden % 4 == 0 and a thread's share
// fits RMS_VEC float4s, the row is read once with 16-byte loads and kept in
// registers between the sum and the scaling; otherwise it is read twice.
#define RMS_VEC 4
__global__ void rms_norm(bf16* out, const float* x, const float* w, const int* rows, int hidden, float eps) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    int src = rows ? rows[r] : r;
    const float* in = x + (long long)src * hidden;
    bf16* o = out + (long long)r * hidden;
    int n4 = hidden / 4;
    if (hidden % 4 == 0 && n4 <= RMS_VEC * (int)blockDim.x) {
        const float4* in4 = reinterpret_cast<const float4*>(in);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        // The weights are loaded with the row, so the scaling after the
        // block-wide sum waits on nothing.
        float4 v[RMS_VEC], wv[RMS_VEC];
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < RMS_VEC; j++) {
            int i = threadIdx.x + j * blockDim.x;
            v[j] = i < n4 ? in4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            wv[j] = i < n4 ? w4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
        }
        ss = block_sum(ss, scratch);
        float inv = rsqrtf(ss / hidden + eps);
#pragma unroll
        for (int j = 0; j < RMS_VEC; j++) {
            int i = threadIdx.x + j * blockDim.x;
            if (i < n4) {
                float4 g = wv[j];
                __nv_bfloat162 lo = __floats2bfloat162_rn(v[j].x * inv * g.x, v[j].y * inv * g.y);
                __nv_bfloat162 hi = __floats2bfloat162_rn(v[j].z * inv * g.z, v[j].w * inv * g.w);
                uint2 packed = make_uint2(*reinterpret_cast<unsigned*>(&lo), *reinterpret_cast<unsigned*>(&hi));
                *reinterpret_cast<uint2*>(o + 4 * i) = packed;
            }
        }
        return;
    }
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += in[i] * in[i];
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __float2bfloat16(in[i] * inv * w[i]);
}

// The step's rotations: cs[t * half + j] = (cos, sin) of positions[t] *
// inv_freq[j], once per step for every layer's rope_kv_write.
__global__ void rope_table(float2* cs, const float* inv_freq, const int* positions, int tokens, int half) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < tokens * half; i += gridDim.x * blockDim.x) {
        float sn, c;
        sincosf((float)positions[i / half] * inv_freq[i % half], &sn, &c);
        cs[i] = make_float2(c, sn);
    }
}

// Per token t (one block each): add the QKV bias (when present), rotate the
// Q and K heads (half-split RoPE, by the step's rope_table), write K and V as
// bf16 into the cache at slots[t] (skipped for padding rows, slot < 0), and
// the rotated Q either back in place (f32) or, when q_out is set, scaled by
// q_scale and rounded to bf16 at q_out[t] (what the wgmma prefill attention
// reads: half the bytes). When `kv_out` is set, also writes K and V as stored
// (bf16-rounded, f32) to kv_out[t] = [K | V] for streaming the new KV to the
// host. A thread rotates four pairs with 16-byte loads (hd % 8 == 0: head
// dims are multiples of 32, see check_geometry).
__global__ void rope_kv_write(float* qkv, const float* bias, const float2* rope_cs, const int* slots,
                              bf16* k_cache, bf16* v_cache, float* kv_out, bf16* q_out, float q_scale, int nh,
                              int nkv, int hd) {
    int t = blockIdx.x;
    int half = hd / 2, quarter = half / 4;  // float4s per half head
    int q_dim = nh * hd, kv_dim = nkv * hd, width = q_dim + 2 * kv_dim;
    float* row = qkv + (long long)t * width;
    const float4* cs = reinterpret_cast<const float4*>(rope_cs + (long long)t * half);
    int slot = slots[t];
    auto add = [](float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); };
    for (int i = threadIdx.x; i < (nh + nkv) * quarter; i += blockDim.x) {
        int head = i / quarter, j = (i % quarter) * 4;
        int a = head * hd + j, b = a + half;
        float4 x0 = *reinterpret_cast<const float4*>(row + a);
        float4 x1 = *reinterpret_cast<const float4*>(row + b);
        if (bias) {
            x0 = add(x0, *reinterpret_cast<const float4*>(bias + a));
            x1 = add(x1, *reinterpret_cast<const float4*>(bias + b));
        }
        // (cos, sin) of pairs j, j + 1 and of j + 2, j + 3.
        float4 c01 = cs[j / 2], c23 = cs[j / 2 + 1];
        float4 y0 = make_float4(x0.x * c01.x - x1.x * c01.y, x0.y * c01.z - x1.y * c01.w, x0.z * c23.x - x1.z * c23.y,
                                x0.w * c23.z - x1.w * c23.w);
        float4 y1 = make_float4(x0.x * c01.y + x1.x * c01.x, x0.y * c01.w + x1.y * c01.z, x0.z * c23.y + x1.z * c23.x,
                                x0.w * c23.w + x1.w * c23.z);
        if (head < nh) {
            if (q_out) {
                bf16* dst = q_out + (long long)t * q_dim + a;
                *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16(y0.x * q_scale, y0.y * q_scale),
                                                            pack_bf16(y0.z * q_scale, y0.w * q_scale));
                *reinterpret_cast<uint2*>(dst + half) = make_uint2(pack_bf16(y1.x * q_scale, y1.y * q_scale),
                                                                   pack_bf16(y1.z * q_scale, y1.w * q_scale));
            } else {
                *reinterpret_cast<float4*>(row + a) = y0;
                *reinterpret_cast<float4*>(row + b) = y1;
            }
        } else {
            int kh = head - nh;
            __nv_bfloat162 k0a = __floats2bfloat162_rn(y0.x, y0.y), k0b = __floats2bfloat162_rn(y0.z, y0.w);
            __nv_bfloat162 k1a = __floats2bfloat162_rn(y1.x, y1.y), k1b = __floats2bfloat162_rn(y1.z, y1.w);
            if (slot >= 0) {
                bf16* dst = k_cache + (long long)slot * kv_dim + kh * hd + j;
                *reinterpret_cast<uint2*>(dst) =
                    make_uint2(*reinterpret_cast<unsigned*>(&k0a), *reinterpret_cast<unsigned*>(&k0b));
                *reinterpret_cast<uint2*>(dst + half) =
                    make_uint2(*reinterpret_cast<unsigned*>(&k1a), *reinterpret_cast<unsigned*>(&k1b));
            }
            if (kv_out) {
                float* dst = kv_out + (long long)t * 2 * kv_dim + kh * hd + j;
                float2 lo0 = __bfloat1622float2(k0a), hi0 = __bfloat1622float2(k0b);
                float2 lo1 = __bfloat1622float2(k1a), hi1 = __bfloat1622float2(k1b);
                *reinterpret_cast<float4*>(dst) = make_float4(lo0.x, lo0.y, hi0.x, hi0.y);
                *reinterpret_cast<float4*>(dst + half) = make_float4(lo1.x, lo1.y, hi1.x, hi1.y);
            }
        }
    }
    for (int i = threadIdx.x; i < kv_dim / 4; i += blockDim.x) {
        float4 v = *reinterpret_cast<const float4*>(row + q_dim + kv_dim + 4 * i);
        if (bias) v = add(v, *reinterpret_cast<const float4*>(bias + q_dim + kv_dim + 4 * i));
        __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
        if (slot >= 0)
            *reinterpret_cast<uint2*>(v_cache + (long long)slot * kv_dim + 4 * i) =
                make_uint2(*reinterpret_cast<unsigned*>(&lo), *reinterpret_cast<unsigned*>(&hi));
        if (kv_out) {
            float2 l = __bfloat1622float2(lo), h = __bfloat1622float2(hi);
            *reinterpret_cast<float4*>(kv_out + (long long)t * 2 * kv_dim + kv_dim + 4 * i) =
                make_float4(l.x, l.y, h.x, h.y);
        }
    }
}

// act[t, i] = silu(gu[t, i]) * gu[t, f + i], eight bf16 per thread (f % 8 == 0).
// Grid: x along the row, y over tokens (striding by gridDim.y), so no
// thread divides to find its token.
__global__ void silu_mul(bf16* act, const bf16* gu, int tokens, int f) {
    int n8 = f / 8;
    for (int t = blockIdx.y; t < tokens; t += gridDim.y) {
        const bf16* row = gu + (long long)t * 2 * f;
        bf16* dst = act + (long long)t * f;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
            uint4 g4 = *reinterpret_cast<const uint4*>(row + 8 * i);
            uint4 u4 = *reinterpret_cast<const uint4*>(row + f + 8 * i);
            const bf16* g = reinterpret_cast<const bf16*>(&g4);
            const bf16* u = reinterpret_cast<const bf16*>(&u4);
            uint4 o4;
            bf16* o = reinterpret_cast<bf16*>(&o4);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float gv = __bfloat162float(g[k]);
                o[k] = __float2bfloat16(gv / (1.f + __expf(-gv)) * __bfloat162float(u[k]));
            }
            *reinterpret_cast<uint4*>(dst + 8 * i) = o4;
        }
    }
}

// The same from f32 gate/up products (the GEMM's f32 output): eight per
// thread (f % 8 == 0), two 16-byte loads of each of gate and up in flight.
__global__ void silu_mul_f32(bf16* act, const float* gu, int tokens, int f) {
    int n8 = f / 8;
    for (int t = blockIdx.y; t < tokens; t += gridDim.y) {
        const float* row = gu + (long long)t * 2 * f;
        bf16* dst = act + (long long)t * f;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
            const float4* g4 = reinterpret_cast<const float4*>(row + 8 * i);
            const float4* u4 = reinterpret_cast<const float4*>(row + f + 8 * i);
            float4 ga = g4[0], gb = g4[1], ua = u4[0], ub = u4[1];
            auto sm = [](float g, float u) { return g / (1.f + __expf(-g)) * u; };
            uint4 o = make_uint4(pack_bf16(sm(ga.x, ua.x), sm(ga.y, ua.y)), pack_bf16(sm(ga.z, ua.z), sm(ga.w, ua.w)),
                                 pack_bf16(sm(gb.x, ub.x), sm(gb.y, ub.y)), pack_bf16(sm(gb.z, ub.z), sm(gb.w, ub.w)));
            *reinterpret_cast<uint4*>(dst + 8 * i) = o;
        }
    }
}

#define MAX_GROUP 8
#define MAX_HEAD_DIM 256
#define DECODE_WARPS 8
#define DECODE_PARTITION 64

}  // extern "C"

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
#ifndef DECODE_MIN_CHUNK
#define DECODE_MIN_CHUNK 128
#endif

// Positions a block loads in one round (before the first use of any), when
// registers allow (tunable for measuring: TANDEM_CUDA_DEFINES).
#ifndef DECODE_V2_ROUND
#define DECODE_V2_ROUND 128
#endif

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

extern "C" {

#define PF_Q 16
#define PF_K 32

// Causal attention for prefill chunks (and mixed batches), flash style over
// the paged cache. Grid (tiles, heads); tile i covers rows tile_row0[i] ..
// + tile_rows[i] (at most PF_Q, all of sequence tile_seq[i]); row r attends
// to positions 0 ..= positions[r]. 128 threads: thread (qi, part) = (tid / 8,
// tid % 8) owns query row qi and head_dim slice part.
__global__ void prefill_attention(bf16* out, const float* qkv, const bf16* k_cache, const bf16* v_cache,
                                  const int* block_tables, const int* positions, const int* tile_seq,
                                  const int* tile_row0, const int* tile_rows, int nh, int nkv, int hd,
                                  int block_size, int max_blocks, float scale) {
    extern __shared__ float smem[];
    int tile = blockIdx.x, h = blockIdx.y;
    int s = tile_seq[tile], row0 = tile_row0[tile], nrows = tile_rows[tile];
    int group = nh / nkv, kvh = h / group;
    int q_dim = nh * hd, kv_dim = nkv * hd, width = q_dim + 2 * kv_dim;
    float* q = smem;                   // [PF_Q, hd]
    float* ks = q + PF_Q * hd;         // [PF_K, hd + 1]
    float* vs = ks + PF_K * (hd + 1);  // [PF_K, hd]
    float* p = vs + PF_K * hd;         // [PF_Q, PF_K]
    int tid = threadIdx.x;
    int qi = tid / 8, part = tid % 8;
    for (int i = tid; i < PF_Q * hd; i += blockDim.x) {
        int r = i / hd, d = i % hd;
        q[i] = r < nrows ? qkv[(long long)(row0 + r) * width + h * hd + d] * scale : 0.f;
    }
    const int* table = block_tables + (long long)s * max_blocks;
    int my_pos = qi < nrows ? positions[row0 + qi] : -1;
    int last_pos = positions[row0 + nrows - 1];
    int dims = hd / 8;  // head_dim slice per thread (hd is a multiple of 32)
    float acc[MAX_HEAD_DIM / 8];
    for (int e = 0; e < dims; e++) acc[e] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (int k0 = 0; k0 <= last_pos; k0 += PF_K) {
        __syncthreads();
        for (int i = tid; i < PF_K * hd; i += blockDim.x) {
            int j = i / hd, d = i % hd, pos = k0 + j;
            float kv = 0.f, vv = 0.f;
            if (pos <= last_pos) {
                long long slot = (long long)table[pos / block_size] * block_size + pos % block_size;
                kv = __bfloat162float(k_cache[slot * kv_dim + kvh * hd + d]);
                vv = __bfloat162float(v_cache[slot * kv_dim + kvh * hd + d]);
            }
            ks[j * (hd + 1) + d] = kv;
            vs[j * hd + d] = vv;
        }
        __syncthreads();
        // Scores: thread (qi, part) computes keys part, part + 8, ... for row qi.
        for (int j = part; j < PF_K; j += 8) {
            float d = 0.f;
            for (int e = 0; e < hd; e++) d += q[qi * hd + e] * ks[j * (hd + 1) + e];
            p[qi * PF_K + j] = (k0 + j <= my_pos) ? d : -INFINITY;
        }
        __syncthreads();
        // Online softmax for row qi; the 8 threads of a row compute it redundantly.
        float tile_max = -INFINITY;
        for (int j = 0; j < PF_K; j++) tile_max = fmaxf(tile_max, p[qi * PF_K + j]);
        float new_m = fmaxf(m, tile_max);
        if (new_m == -INFINITY) continue;  // row fully masked so far (padding row)
        float corr = __expf(m - new_m);
        l *= corr;
        for (int e = 0; e < dims; e++) acc[e] *= corr;
        for (int j = 0; j < PF_K; j++) {
            float w = __expf(p[qi * PF_K + j] - new_m);
            l += w;
            for (int e = 0; e < dims; e++) acc[e] += w * vs[j * hd + part * dims + e];
        }
        m = new_m;
    }
    if (qi < nrows) {
        bf16* o = out + (long long)(row0 + qi) * q_dim + h * hd + part * dims;
        for (int e = 0; e < dims; e++) o[e] = __float2bfloat16(acc[e] / l);
    }
}

}  // extern "C"

// c += a (16x16 bf16, row) * b (16x8 bf16, col), f32 accumulators, in the
// m16n8k16 fragment layouts of the PTX ISA.
__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 bf16 matrices from shared memory, transposed: the B operands of
// two m16n8k16 products over a row-major [key][dim] tile (lanes 0-7 / 8-15 /
// 16-23 / 24-31 address the rows of matrices 0 / 1 / 2 / 3).
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const bf16* row) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    int src_size = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const bf16* row) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 2^x (ex2.approx: 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Flash-attention steps shared by the tensor-core prefill kernels. A thread
// holds two query rows (g and g + 8 of its warp's 16, g = lane / 4) in the
// m16n8 accumulator layout: sc[j] = keys 8j + 2 * (lane % 4) + {0, 1} of row g,
// then of row g + 8; o[j] likewise for output dims.

// Keys past a row's position masked out (-inf) in a tile of scores starting
// at key k0.
template <int NJ>
__device__ __forceinline__ void mask_scores(float (&sc)[NJ][4], int k0, int t4, int pos_a, int pos_b) {
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            int key = k0 + j * 8 + t4 * 2 + e;
            if (key > pos_a) sc[j][e] = -INFINITY;
            if (key > pos_b) sc[j][2 + e] = -INFINITY;
        }
}

// Scores into log2 units; keys past a row's position masked out when the
// tile reaches past the first row (`mask`).
template <int NJ>
__device__ __forceinline__ void scores_to_log2(float (&sc)[NJ][4], bool mask, int k0, int t4, int pos_a, int pos_b) {
    const float log2e = 1.4426950408889634f;
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        sc[j][0] *= log2e;
        sc[j][1] *= log2e;
        sc[j][2] *= log2e;
        sc[j][3] *= log2e;
    }
    if (mask) mask_scores(sc, k0, t4, pos_a, pos_b);
}

// Row maxima of a tile of scores, starting from (mx_a, mx_b), across the quad
// that holds each row.
template <int NJ>
__device__ __forceinline__ void quad_row_max(const float (&sc)[NJ][4], float& mx_a, float& mx_b) {
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        mx_a = fmaxf(mx_a, fmaxf(sc[j][0], sc[j][1]));
        mx_b = fmaxf(mx_b, fmaxf(sc[j][2], sc[j][3]));
    }
    for (int x = 1; x <= 2; x <<= 1) {
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffff, mx_a, x));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffff, mx_b, x));
    }
}

// Output rows a and b of a thread scaled by corr_a and corr_b.
template <int NO>
__device__ __forceinline__ void scale_rows(float (&o)[NO][4], float corr_a, float corr_b) {
#pragma unroll
    for (int j = 0; j < NO; j++) {
        o[j][0] *= corr_a;
        o[j][1] *= corr_a;
        o[j][2] *= corr_b;
        o[j][3] *= corr_b;
    }
}

// One online-softmax step: the scores become exp2 weights against the new
// running maxima (m_a, m_b), and the running sums (l_a, l_b, per thread;
// reduced across the quad at the end) and the output rows are rescaled.
template <int NJ, int NO>
__device__ __forceinline__ void online_softmax(float (&sc)[NJ][4], float (&o)[NO][4], float& m_a, float& m_b,
                                               float& l_a, float& l_b) {
    float mx_a = m_a, mx_b = m_b;
    quad_row_max(sc, mx_a, mx_b);
    // A row with every key masked so far keeps max -inf: exponentiate
    // against 0 instead, which gives 0 for the masked scores.
    float base_a = mx_a == -INFINITY ? 0.f : mx_a, base_b = mx_b == -INFINITY ? 0.f : mx_b;
    float corr_a = fast_exp2(m_a - base_a), corr_b = fast_exp2(m_b - base_b);
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        sc[j][0] = fast_exp2(sc[j][0] - base_a);
        sc[j][1] = fast_exp2(sc[j][1] - base_a);
        sc[j][2] = fast_exp2(sc[j][2] - base_b);
        sc[j][3] = fast_exp2(sc[j][3] - base_b);
        sum_a += sc[j][0] + sc[j][1];
        sum_b += sc[j][2] + sc[j][3];
    }
    l_a = l_a * corr_a + sum_a;
    l_b = l_b * corr_b + sum_b;
    m_a = mx_a;
    m_b = mx_b;
    scale_rows(o, corr_a, corr_b);
}

// Sums the row totals across the quad and writes rows ra and rb of the tile
// (those below `nrows`) of head h, normalised, as bf16.
template <int HD>
__device__ __forceinline__ void store_rows(bf16* out, const float (&o)[HD / 8][4], float l_a, float l_b, int ra,
                                           int rb, int nrows, int row0, int q_dim, int h, int t4) {
    for (int x = 1; x <= 2; x <<= 1) {
        l_a += __shfl_xor_sync(0xffffffff, l_a, x);
        l_b += __shfl_xor_sync(0xffffffff, l_b, x);
    }
    if (ra < nrows) {
        bf16* dst = out + (long long)(row0 + ra) * q_dim + h * HD + t4 * 2;
        float inv = 1.f / l_a;
#pragma unroll
        for (int j = 0; j < HD / 8; j++)
            *reinterpret_cast<__nv_bfloat162*>(dst + j * 8) = __floats2bfloat162_rn(o[j][0] * inv, o[j][1] * inv);
    }
    if (rb < nrows) {
        bf16* dst = out + (long long)(row0 + rb) * q_dim + h * HD + t4 * 2;
        float inv = 1.f / l_b;
#pragma unroll
        for (int j = 0; j < HD / 8; j++)
            *reinterpret_cast<__nv_bfloat162*>(dst + j * 8) = __floats2bfloat162_rn(o[j][2] * inv, o[j][3] * inv);
    }
}

// Tensor-core prefill attention (mma.sync bf16, f32 accumulation), flash
// style. One block per (query tile, KV head): the `group` query heads sharing
// that KV head run in the same block, so each K/V tile is loaded once for all
// of them. Warp w takes head kvh * group + w / (rows / 16) and 16 query rows.
// Key tiles of 64 positions are gathered from the paged cache into shared
// memory with cp.async, double-buffered so the next tile loads while this one
// computes. Each warp stages its Q rows (scaled by 1/sqrt(d)) in shared
// memory, and the softmax runs on exp2 of scores in log2 units; Q and K operands come from there by
// ldmatrix, V by ldmatrix.trans. Scores, probabilities and the output stay in
// registers (fragment layouts of mma.m16n8k16: thread (g = lane / 4, t = lane
// % 4) holds rows g and g + 8); keeping Q out of registers lets two blocks
// share an SM. The causal mask is applied only to key tiles that reach past a
// warp's first row. `rows` = query rows per tile (16 * max(1, 8 / group)).
#define TC_K 64

template <int HD>
__device__ void prefill_attention_tc(bf16* out, const float* qkv, const bf16* k_cache, const bf16* v_cache,
                                     const int* block_tables, const int* positions, const int* tile_seq,
                                     const int* tile_row0, const int* tile_rows, int nh, int nkv, int block_size,
                                     int max_blocks, float scale) {
    constexpr int LD = HD + 8;  // bf16 per shared row: keeps ldmatrix conflict-free
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* kbuf = reinterpret_cast<bf16*>(smem_raw);  // [2][TC_K][LD]
    bf16* vbuf = kbuf + 2 * TC_K * LD;                // [2][TC_K][LD]
    bf16* qbuf = vbuf + 2 * TC_K * LD;                // [warps][16][LD]

    // Tiles run last first: later tiles of a sequence attend to more keys,
    // and starting the longest blocks first evens out the last wave.
    int tile = gridDim.x - 1 - blockIdx.x, kvh = blockIdx.y;
    int s = tile_seq[tile], row0 = tile_row0[tile], nrows = tile_rows[tile];
    int group = nh / nkv;
    int warps_per_head = blockDim.x / WARP / group;
    int q_dim = nh * HD, kv_dim = nkv * HD, width = q_dim + 2 * kv_dim;
    int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    int h = kvh * group + warp / warps_per_head;
    int g = lane >> 2, t4 = lane & 3;
    const int* table = block_tables + (long long)s * max_blocks;

    int wrow = (warp % warps_per_head) * 16;  // the warp's first row in the tile
    int ra = wrow + g, rb = ra + 8;
    int pos_a = ra < nrows ? positions[row0 + ra] : -1;
    int pos_b = rb < nrows ? positions[row0 + rb] : -1;
    int warp_last = max(pos_a, pos_b), warp_first = min(pos_a, pos_b);
    for (int o = 16; o > 0; o >>= 1) {
        warp_last = max(warp_last, __shfl_xor_sync(0xffffffff, warp_last, o));
        warp_first = min(warp_first, __shfl_xor_sync(0xffffffff, warp_first, o));
    }
    int last_pos = positions[row0 + nrows - 1];
    int ntiles = last_pos / TC_K + 1;

    auto load_tile = [&](int it, int stage) {
        constexpr int VEC = HD / 8;  // 16-byte vectors per row
        int k0 = it * TC_K;
        for (int i = tid; i < TC_K * VEC; i += blockDim.x) {
            int j = i / VEC, c = (i % VEC) * 8, pos = k0 + j;
            bool valid = pos <= last_pos;
            long long slot = valid ? (long long)table[pos / block_size] * block_size + pos % block_size : 0;
            long long off = slot * kv_dim + kvh * HD + c;
            cp_async16(kbuf + (stage * TC_K + j) * LD + c, k_cache + off, valid);
            cp_async16(vbuf + (stage * TC_K + j) * LD + c, v_cache + off, valid);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    load_tile(0, 0);

    // This warp's 16 query rows, scaled by 1/sqrt(d), as bf16 (rows past the
    // tile are zero). Scores are turned into log2 units in f32 afterwards,
    // so Q is rounded exactly as without the exp2 softmax.
    bf16* qs = qbuf + warp * 16 * LD;
    {
        for (int i = lane; i < 16 * HD / 2; i += WARP) {
            int r = i / (HD / 2), c = (i % (HD / 2)) * 2;
            float2 v = make_float2(0.f, 0.f);
            if (wrow + r < nrows) v = *reinterpret_cast<const float2*>(qkv + (long long)(row0 + wrow + r) * width + h * HD + c);
            *reinterpret_cast<__nv_bfloat162*>(qs + r * LD + c) = __floats2bfloat162_rn(v.x * scale, v.y * scale);
        }
        __syncwarp();
    }
    // ldmatrix row addresses: lane l reads row l % 16, column block l / 16 of
    // a 16x16 A tile; for B (K) tiles, key row (l / 16) * 8 + l % 8 and
    // column block (l / 8) % 2.
    const bf16* qrow = qs + (lane & 15) * LD + (lane >> 4) * 8;
    int krow_off = ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8;

    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;

    for (int it = 0; it < ntiles; it++) {
        if (it + 1 < ntiles) {
            load_tile(it + 1, (it + 1) & 1);
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncthreads();
        int k0 = it * TC_K;
        const bf16* ks = kbuf + (it & 1) * TC_K * LD;
        const bf16* vs = vbuf + (it & 1) * TC_K * LD;
        if (k0 <= warp_last) {
            float sc[TC_K / 8][4];
#pragma unroll
            for (int j = 0; j < TC_K / 8; j++) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
            for (int kd = 0; kd < HD / 16; kd++) {
                unsigned qa[4];
                ldmatrix_x4(qa, qrow + kd * 16);
#pragma unroll
                for (int jj = 0; jj < TC_K / 16; jj++) {
                    unsigned kb[4];
                    ldmatrix_x4(kb, ks + jj * 16 * LD + krow_off + kd * 16);
                    mma_bf16(sc[2 * jj], qa, kb);
                    mma_bf16(sc[2 * jj + 1], qa, kb + 2);
                }
            }
            scores_to_log2(sc, k0 + TC_K - 1 > warp_first, k0, t4, pos_a, pos_b);
            online_softmax(sc, o, m_a, m_b, l_a, l_b);
#pragma unroll
            for (int kk = 0; kk < TC_K / 16; kk++) {
                unsigned pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                                  pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                  pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
                // B fragments of V for two 8-wide column blocks at once:
                // ldmatrix.x4.trans, lane l addressing key row kk*16 + l % 16
                // of column block j + l / 16.
                const bf16* vrow = vs + (kk * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
#pragma unroll
                for (int j = 0; j < HD / 8; j += 2) {
                    unsigned b[4];
                    ldmatrix_x4_trans(b, vrow + j * 8);
                    mma_bf16(o[j], pa, b);
                    mma_bf16(o[j + 1], pa, b + 2);
                }
            }
        }
        __syncthreads();  // this stage is free for the load two tiles ahead
    }
    store_rows<HD>(out, o, l_a, l_b, ra, rb, nrows, row0, q_dim, h, t4);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    prefill_attention_tc64(bf16* out, const float* qkv, const bf16* k_cache, const bf16* v_cache,
                           const int* block_tables, const int* positions, const int* tile_seq, const int* tile_row0,
                           const int* tile_rows, int nh, int nkv, int hd, int block_size, int max_blocks, float scale) {
    prefill_attention_tc<64>(out, qkv, k_cache, v_cache, block_tables, positions, tile_seq, tile_row0, tile_rows, nh,
                             nkv, block_size, max_blocks, scale);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    prefill_attention_tc128(bf16* out, const float* qkv, const bf16* k_cache, const bf16* v_cache,
                            const int* block_tables, const int* positions, const int* tile_seq, const int* tile_row0,
                            const int* tile_rows, int nh, int nkv, int hd, int block_size, int max_blocks, float scale) {
    prefill_attention_tc<128>(out, qkv, k_cache, v_cache, block_tables, positions, tile_seq, tile_row0, tile_rows,
                              nh, nkv, block_size, max_blocks, scale);
}

// ---------------------------------------------------------------------------
// Hopper prefill attention (wgmma, sm_90a only). The arithmetic of
// prefill_attention_tc (Q scaled by 1/sqrt(d) and rounded to bf16, exp2
// softmax in f32, probabilities rounded to bf16 for the P*V product, f32
// accumulation), so the CPU mirror of the one serves the other, except that
// the probabilities are rounded relative to a running maximum that may trail
// the true one by up to 2^WG_MAX_SLACK (softmax_wg): the same relative
// rounding error, on slightly different values.
//
// One block of two warpgroups per (pair of query heads of one KV head, 64-row
// query tile): each warpgroup takes one head's 64 rows, and both share the
// K/V tiles. Key tiles of 64 positions come from the paged cache into shared
// memory by TMA (two stages, see prefill_attention_wg), in wgmma's 128-byte
// swizzled layout. S = Q K^T takes Q and K from shared memory (K-major); O +=
// P V takes P from registers (the accumulator layout of S is the A-fragment
// layout of the second product) and V from shared memory, MN-major
// (transposed).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define WG_K 64
// Blocks an SM holds: 2 caps the kernel at 128 registers (4k prefill
// attention faster than with 1 block of up to 255 registers).
#ifndef WG_MIN_BLOCKS
#define WG_MIN_BLOCKS 2
#endif
// Whether grids that fit at once pair long and short query tiles on an SM
// (see prefill_attention_wg).
#ifndef WG_ZIGZAG
#define WG_ZIGZAG 1
#endif
// How far (log2 units) a row's running maximum may trail a tile's before
// the row's output and sum are rescaled (see softmax_wg); 0 rescales on every
// increase.
#ifndef WG_MAX_SLACK
#define WG_MAX_SLACK 8
#endif

// A shared-memory matrix descriptor in the 128-byte swizzle: start address,
// leading-dimension byte offset, stride-dimension byte offset (all >> 4).
__device__ __forceinline__ unsigned long long wg_desc(const void* smem, unsigned lbo, unsigned sbo) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}

// Byte offset of 16-byte column c of row r in a 64-row tile of HD bf16 per
// row, in the 128-byte swizzle (what TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B): 64-dim blocks of 64 rows x 128 bytes, 8 KiB
// apart, the column's place in its row XORed with r % 8, so the 8 rows of a
// column lie in different banks.
__device__ __forceinline__ int wg_offset(int r, int c) { return (c / 8) * 8192 + r * 128 + (((c % 8) ^ (r % 8)) * 16); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Writes by this thread to shared memory become visible to wgmma (the async
// proxy) after a barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accesses of accumulators across the
// asynchronous products that write them.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// The accumulator operands of a wgmma: d[i] .. d[i + 7], and the first 32 or 64.
#define WG_ACC8(i)                                                                                                 \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]),  \
        "+f"(d[i + 7])
#define WG_ACC32 WG_ACC8(0), WG_ACC8(8), WG_ACC8(16), WG_ACC8(24)
#define WG_ACC64 WG_ACC32, WG_ACC8(32), WG_ACC8(40), WG_ACC8(48), WG_ACC8(56)

// d (64x64 f32, the m64nN accumulator layout) (+)= A (64x16, shared memory,
// K-major) * B (16x64, shared memory, K-major); `accumulate` 0 overwrites d.
__device__ __forceinline__ void wgmma_64x64_ss(float* d, unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : WG_ACC32
        : "l"(a), "l"(b), "r"(accumulate));
}

// d (64x64 f32) += A (64x16 bf16 in registers, the m64k16 fragment layout)
// * B (16x64, shared memory, MN-major, i.e. transposed).
__device__ __forceinline__ void wgmma_64x64_rs(float* d, const unsigned* a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : WG_ACC32
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// d (64x128 f32) += A (64x16 bf16 in registers, the m64k16 fragment layout)
// * B (16x128, shared memory, MN-major, i.e. transposed).
__device__ __forceinline__ void wgmma_64x128_rs(float* d, const unsigned* a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : WG_ACC64
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

template <int HD>
__device__ __forceinline__ void wgmma_pv(float* o, const unsigned* a, unsigned long long b);
template <>
__device__ __forceinline__ void wgmma_pv<64>(float* o, const unsigned* a, unsigned long long b) {
    wgmma_64x64_rs(o, a, b);
}
template <>
__device__ __forceinline__ void wgmma_pv<128>(float* o, const unsigned* a, unsigned long long b) {
    wgmma_64x128_rs(o, a, b);
}

// A TMA tensor map (CUtensorMap, opaque), passed by value.
struct __align__(64) TmaMap {
    unsigned long long v[16];
};

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// One arrival that also expects `bytes` of asynchronous copies.
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}

// Waits until the barrier's phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    unsigned done = 0;
    while (!done)
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
}

// A box of the tensor map at (c0 = column, c1 = row) into shared memory,
// counted against `bar`'s expected bytes; rows past the map arrive as zeros.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaMap* map, int c0, int c1, unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
        : "memory");
}

// The online-softmax step of the wgmma kernel. Scores stay in natural units
// up to the exponent (one FFMA a score: s * log2e - m), and a row's running
// maximum m moves only when a tile's exceeds it by more than WG_MAX_SLACK
// (log2 units): the weights exp2(s - m) then reach at most 2^WG_MAX_SLACK,
// harmless in f32 and for bf16's relative rounding, and the rescaling of the
// output and sum (a multiply per output value) runs only in warps where some
// row's maximum moved, which after the first tiles is rare.
template <int NO>
__device__ __forceinline__ void softmax_wg(float (&sc)[8][4], float (&o)[NO][4], float& m_a, float& m_b, float& l_a,
                                           float& l_b, bool mask, int k0, int t4, int pos_a, int pos_b) {
    const float log2e = 1.4426950408889634f;
    if (mask) mask_scores(sc, k0, t4, pos_a, pos_b);
    float mx_a = -INFINITY, mx_b = -INFINITY;
    quad_row_max(sc, mx_a, mx_b);
    mx_a *= log2e;
    mx_b *= log2e;
    bool up_a = mx_a > m_a + (float)WG_MAX_SLACK, up_b = mx_b > m_b + (float)WG_MAX_SLACK;
    float new_a = up_a ? mx_a : m_a, new_b = up_b ? mx_b : m_b;
    // A row with every key masked so far keeps max -inf: exponentiate
    // against 0 instead, which gives 0 for the masked scores.
    float base_a = new_a == -INFINITY ? 0.f : new_a, base_b = new_b == -INFINITY ? 0.f : new_b;
    if (__any_sync(0xffffffff, up_a || up_b)) {
        float corr_a = up_a ? fast_exp2(m_a - base_a) : 1.f, corr_b = up_b ? fast_exp2(m_b - base_b) : 1.f;
        l_a *= corr_a;
        l_b *= corr_b;
        scale_rows(o, corr_a, corr_b);
    }
    m_a = new_a;
    m_b = new_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        sc[j][0] = fast_exp2(fmaf(sc[j][0], log2e, -base_a));
        sc[j][1] = fast_exp2(fmaf(sc[j][1], log2e, -base_a));
        sc[j][2] = fast_exp2(fmaf(sc[j][2], log2e, -base_b));
        sc[j][3] = fast_exp2(fmaf(sc[j][3], log2e, -base_b));
        sum_a += sc[j][0] + sc[j][1];
        sum_b += sc[j][2] + sc[j][3];
    }
    l_a += sum_a;
    l_b += sum_b;
}

// K and V tiles come from the paged cache by TMA: `kv_map` views the whole
// pool as rows of kv_dim bf16 (`[layer][k|v][slot]`), boxes of 64 dims x
// min(block_size, 64) slots in the 128-byte swizzle that wgmma reads, so a
// 64-key tile is 64 / rows-per-box boxes per 64-dim sector for each of K and
// V. Two stages; the warpgroup that finishes a tile last refills its stage
// with the tile two ahead (one thread per box of its first warp issues the
// copies, the boxes' cache rows looked up a tile earlier), so the two
// warpgroups never wait on each other except for a tile's data.
template <int HD>
__device__ void prefill_attention_wg(bf16* out, const bf16* q16, const TmaMap* kv_map, int k_row0, int v_row0,
                                     const int* block_tables, const int* positions, const int* tile_seq,
                                     const int* tile_row0, const int* tile_rows, int nh, int nkv, int block_size,
                                     int max_blocks) {
    constexpr int TILE = WG_K * HD;           // bf16 per K (or V) tile
    constexpr int VEC = HD / 8;               // 16-byte vectors per row
    constexpr unsigned STAGE_BYTES = TILE * 4;  // a K and a V tile
    static_assert(HD % 64 == 0, "TMA boxes are 64-dim sectors");
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    bf16* kbuf = reinterpret_cast<bf16*>(smem_raw);  // [2][TILE]
    bf16* vbuf = kbuf + 2 * TILE;                     // [2][TILE]
    bf16* qbuf = vbuf + 2 * TILE;                     // [2 warpgroups][64 * HD]
    unsigned long long* full = reinterpret_cast<unsigned long long*>(qbuf + 2 * 64 * HD);  // [2]: a stage landed
    unsigned* finished = reinterpret_cast<unsigned*>(full + 2);  // [2]: warpgroups done with a stage, ever

    // Head pairs along x, tiles along y, last tile first: blocks start in
    // x-major order, so every pair's longest tiles go first and the short
    // ones fill the last wave.
    int tile = gridDim.y - 1 - blockIdx.y, pair = blockIdx.x;
#if WG_ZIGZAG
    {
        // A grid that fits at once (WG_MIN_BLOCKS blocks an SM; a short
        // prompt's): blocks are dealt to the SMs in order, one each, then a
        // second each, so the first round takes the longest tiles and the
        // second the shortest first, and an SM holds one long and one short
        // tile rather than two long ones (8B shape, 1k prompt: attention
        // 1.55 -> 1.44 ms a step on H200).
        unsigned sms;
        asm("mov.u32 %0, %%nsmid;" : "=r"(sms));
        int n = gridDim.x * gridDim.y, l = blockIdx.y * gridDim.x + blockIdx.x;
        if (n <= WG_MIN_BLOCKS * (int)sms && l >= (int)sms) l = n - 1 - (l - (int)sms);
        tile = gridDim.y - 1 - l / gridDim.x;
        pair = l % gridDim.x;
    }
#endif
    int s = tile_seq[tile], row0 = tile_row0[tile], nrows = tile_rows[tile];
    int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
    int h = pair * 2 + wg, kvh = h / (nh / nkv);
    int q_dim = nh * HD;
    int lane = wtid % WARP, g = lane >> 2, t4 = lane & 3;
    bool copier = wtid < WARP;  // the first warp of each warpgroup
    const int* table = block_tables + (long long)s * max_blocks;

    int ra = (wtid / WARP) * 16 + g, rb = ra + 8;
    int pos_a = ra < nrows ? positions[row0 + ra] : -1;
    int pos_b = rb < nrows ? positions[row0 + rb] : -1;
    int warp_first = min(ra < nrows ? pos_a : 0x7fffffff, rb < nrows ? pos_b : 0x7fffffff);
    for (int o = 16; o > 0; o >>= 1) warp_first = min(warp_first, __shfl_xor_sync(0xffffffff, warp_first, o));
    int last_pos = positions[row0 + nrows - 1];
    int ntiles = last_pos / WG_K + 1;

    // Lane b of a copier warp fetches box b of a tile: its cache row (slot),
    // or a row past the map (zeros) when the box starts past the last key.
    int box_rows = min(block_size, WG_K), boxes = WG_K / box_rows;
    auto box_row = [&](int it) -> int {
        int key = it * WG_K + lane * box_rows;
        return lane < boxes && key <= last_pos ? table[key / block_size] * block_size + key % block_size : -1;
    };
    auto fetch = [&](int it, int row) {
        int st = it & 1;
        if (lane == 0) mbar_expect_tx(&full[st], STAGE_BYTES);
        __syncwarp();
        if (lane < boxes) {
            int kr = row < 0 ? 0x7fff0000 : k_row0 + row, vr = row < 0 ? 0x7fff0000 : v_row0 + row;
#pragma unroll
            for (int n = 0; n < HD / 64; n++) {
                int off = st * TILE + n * 64 * WG_K + lane * box_rows * 64;
                tma_load_2d(kbuf + off, kv_map, kvh * HD + n * 64, kr, &full[st]);
                tma_load_2d(vbuf + off, kv_map, kvh * HD + n * 64, vr, &full[st]);
            }
        }
    };
    if (tid == 0) {
        mbar_init(&full[0], 1);
        mbar_init(&full[1], 1);
        finished[0] = finished[1] = 0;
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (wg == 0 && copier) {
        fetch(0, box_row(0));
        if (ntiles > 1) fetch(1, box_row(1));
    }
    int next_row = copier ? box_row(2) : -1;

    // This warpgroup's 64 query rows (rope_kv_write stored them rotated,
    // scaled and rounded to bf16), in the same swizzled layout (rows past the
    // tile are zero).
    bf16* qs = qbuf + wg * 64 * HD;
    for (int i = wtid; i < 64 * VEC; i += 128) {
        int r = i % 64, c = i / 64;  // row, 16-byte column
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < nrows) v = *reinterpret_cast<const uint4*>(q16 + (long long)(row0 + r) * q_dim + h * HD + c * 8);
        *reinterpret_cast<uint4*>(qs + wg_offset(r, c) / 2) = v;
    }
    fence_proxy_async();
    __syncthreads();

    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float* of = &o[0][0];  // the same registers, flat, for the wgmma operands
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
    // Descriptors (start, leading byte offset, stride byte offset), 128-byte
    // swizzle: Q and K (K-major) step 32 bytes along a 128-byte row per 16
    // dims and 8 KiB per 64 dims, 8-row groups 1 KiB apart (the leading
    // offset is unused); V (MN-major) steps 2 KiB per 16 keys, its leading
    // offset is the next 64 dims (8 KiB), its stride offset the next 8 keys.
    auto qk_desc = [](const bf16* base, int kd) {
        return wg_desc(reinterpret_cast<const unsigned char*>(base) + (kd / 4) * 8192 + (kd % 4) * 32, 16, 1024);
    };
    auto v_desc = [](const bf16* base, int kk) {
        return wg_desc(reinterpret_cast<const unsigned char*>(base) + kk * 2048, 8192, 1024);
    };

    for (int it = 0; it < ntiles; it++) {
        int st = it & 1;
        mbar_wait(&full[st], (it >> 1) & 1);
        int k0 = it * WG_K;
        const bf16* ks = kbuf + st * TILE;
        const bf16* vs = vbuf + st * TILE;

        float sc[8][4];
        float* sf = &sc[0][0];
#pragma unroll
        for (int j = 0; j < 32; j++) sf[j] = 0.f;
        wgmma_fence();
#pragma unroll
        for (int kd = 0; kd < HD / 16; kd++)
            wgmma_64x64_ss(sf, qk_desc(qs, kd), qk_desc(ks, kd), kd > 0);
        wgmma_commit();
        wgmma_wait0();
#pragma unroll
        for (int j = 0; j < 32; j++) reg_fence(sf[j]);

        softmax_wg(sc, o, m_a, m_b, l_a, l_b, k0 + WG_K - 1 > warp_first, k0, t4, pos_a, pos_b);
        unsigned p[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            p[kk][0] = pack_bf16(sc[2 * kk][0], sc[2 * kk][1]);
            p[kk][1] = pack_bf16(sc[2 * kk][2], sc[2 * kk][3]);
            p[kk][2] = pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
            p[kk][3] = pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
        }
#pragma unroll
        for (int j = 0; j < HD / 2; j++) reg_fence(of[j]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wgmma_pv<HD>(of, p[kk], v_desc(vs, kk));
        wgmma_commit();
        wgmma_wait0();
#pragma unroll
        for (int j = 0; j < HD / 2; j++) reg_fence(of[j]);

        // This warpgroup's products over the stage are complete; the second
        // warpgroup to get here refills it with the tile two ahead.
        if (copier) {
            unsigned before = 0;
            if (lane == 0) before = atomicAdd(&finished[st], 1u);
            bool last = __shfl_sync(0xffffffff, before, 0) & 1;
            if (last && it + 2 < ntiles) fetch(it + 2, next_row);
            next_row = box_row(it + 3);
        }
    }
    store_rows<HD>(out, o, l_a, l_b, ra, rb, nrows, row0, q_dim, h, t4);
}

#define PREFILL_ATTENTION_WG(HD)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, WG_MIN_BLOCKS) prefill_attention_wg##HD(                    \
        bf16* out, const bf16* q16, const __grid_constant__ TmaMap kv_map, int k_row0, int v_row0,             \
        const int* block_tables, const int* positions, const int* tile_seq, const int* tile_row0,               \
        const int* tile_rows, int nh, int nkv, int hd, int block_size, int max_blocks) {                        \
        prefill_attention_wg<HD>(out, q16, &kv_map, k_row0, v_row0, block_tables, positions, tile_seq,          \
                                 tile_row0, tile_rows, nh, nkv, block_size, max_blocks);                        \
    }
PREFILL_ATTENTION_WG(64)
PREFILL_ATTENTION_WG(128)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

extern "C" {

// Gathers K and V of `num_tokens` positions (through a block table) from one
// layer's cache into [num_tokens, kv_dim] each, as the pool holds them (bf16):
// KV export, which ships bf16 as it is.
__global__ void kv_gather(bf16* k_out, bf16* v_out, const bf16* k_cache, const bf16* v_cache, const int* table,
                          int num_tokens, int kv_dim, int block_size) {
    int t = blockIdx.x;
    long long slot = (long long)table[t / block_size] * block_size + t % block_size;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_out[(long long)t * kv_dim + i] = k_cache[slot * kv_dim + i];
        v_out[(long long)t * kv_dim + i] = v_cache[slot * kv_dim + i];
    }
}

// The inverse: writes bf16 K and V of positions start_pos .. into the cache.
__global__ void kv_scatter(bf16* k_cache, bf16* v_cache, const bf16* k_in, const bf16* v_in, const int* table,
                           int start_pos, int kv_dim, int block_size) {
    int t = blockIdx.x, pos = start_pos + t;
    long long slot = (long long)table[pos / block_size] * block_size + pos % block_size;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_cache[slot * kv_dim + i] = k_in[(long long)t * kv_dim + i];
        v_cache[slot * kv_dim + i] = v_in[(long long)t * kv_dim + i];
    }
}

}  // extern "C"

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

// ---------------------------------------------------------------------------
// Sampling on the device, one block of SAMPLE_THREADS per logits row, the
// same algorithm as the CPU sampler (engine/sampler.rs): greedy (lowest id on
// ties) when temperature <= 0 or top_k == 1; else logits / temperature, keep
// the top_k largest (when 0 < top_k < vocab), keep the smallest best-first
// set holding top_p of the remaining mass (when top_p < 1), draw with the
// request's uniform number u in [0, 1) over the kept mass in id order.
// Thresholds are found by radix selection over order-preserving keys of the
// scaled logits (four 8-bit passes), so nothing is sorted; ties at a
// threshold are all kept. Probability mass is counted in 32.32 fixed point
// (exp(x - max) * 2^32, integer sums), so every sum is exact and independent
// of thread order: the same logits and u give the same token on every run.
// params per row (5 ints): temperature (f32 bits), top_k, top_p (f32 bits),
// u (f64 bits, low word first).
// ---------------------------------------------------------------------------

#define SAMPLE_THREADS 1024

__device__ __forceinline__ unsigned order_key(float v) {
    unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ unsigned long long fixed_mass(float x, float mx) {
    return __float2ull_rz(expf(x - mx) * 4294967296.0f);
}

// The key t with weight(key > t) < need <= weight(key >= t) among keys >= floor
// (weight: 1 per element, or its fixed-point mass). Needs 1 <= need <= total.
template <bool MASS>
__device__ unsigned radix_threshold(const float* row, int vocab, float inv_t, float mx, unsigned floor,
                                    unsigned long long need, unsigned long long* hist) {
    __shared__ unsigned sel_bin;
    __shared__ unsigned long long sel_need;
    unsigned prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        if (threadIdx.x == 0) {
            sel_bin = 0;
            sel_need = need;
        }
        __syncthreads();
        // Uniform trip count, so whole warps can combine their counts.
        for (int base = 0; base < vocab; base += blockDim.x) {
            int i = base + threadIdx.x;
            float x = i < vocab ? row[i] * inv_t : 0.f;
            unsigned k = order_key(x);
            bool in = i < vocab && k >= floor && (k & mask) == prefix;
            unsigned bin = (k >> shift) & 255;
            if (MASS) {
                if (in) atomicAdd(&hist[bin], fixed_mass(x, mx));
            } else {
                // Counts: one atomic per distinct bin per warp (most keys
                // share their top bits, and same-address atomics serialise).
                unsigned peers = __match_any_sync(0xffffffff, in ? bin : 256u);
                if (in && (threadIdx.x % WARP) == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned long long)__popc(peers));
            }
        }
        __syncthreads();
        if (threadIdx.x < WARP) {
            int lane = threadIdx.x;
            // Lane l holds bins 255 - 8l down to 248 - 8l: lane 0 the largest keys.
            unsigned long long s = 0;
            for (int j = 0; j < 8; j++) s += hist[255 - 8 * lane - j];
            unsigned long long incl = s;
            for (int o = 1; o < WARP; o <<= 1) {
                unsigned long long t = __shfl_up_sync(0xffffffff, incl, o);
                if (lane >= o) incl += t;
            }
            unsigned long long cum = incl - s;
            if (cum < need && need <= incl) {
                for (int j = 0; j < 8; j++) {
                    int bin = 255 - 8 * lane - j;
                    if (cum + hist[bin] >= need) {
                        sel_bin = bin;
                        sel_need = need - cum;
                        break;
                    }
                    cum += hist[bin];
                }
            }
        }
        __syncthreads();
        prefix |= sel_bin << shift;
        mask |= 255u << shift;
        need = sel_need;
        __syncthreads();
    }
    return prefix;
}

// Exclusive prefix sum over the block; the block's total is left in
// scratch[32] (`scratch` holds >= 33 values).
__device__ unsigned long long block_exclusive_scan(unsigned long long v, unsigned long long* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    unsigned long long incl = v;
    for (int o = 1; o < WARP; o <<= 1) {
        unsigned long long t = __shfl_up_sync(0xffffffff, incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();
    if (lane == WARP - 1) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int warps = blockDim.x / WARP;
        unsigned long long w = lane < warps ? scratch[lane] : 0ull, wi = w;
        for (int o = 1; o < WARP; o <<= 1) {
            unsigned long long t = __shfl_up_sync(0xffffffff, wi, o);
            if (lane >= o) wi += t;
        }
        if (lane < warps) scratch[lane] = wi - w;
        if (lane == warps - 1) scratch[32] = wi;
    }
    __syncthreads();
    return scratch[warp] + incl - v;
}

// Fixed-point mass of the ids this thread visits (stride blockDim.x) with keys >= floor.
__device__ unsigned long long strided_mass(const float* row, int vocab, float inv_t, float mx, unsigned floor) {
    unsigned long long mass = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float x = row[i] * inv_t;
        if (order_key(x) >= floor) mass += fixed_mass(x, mx);
    }
    return mass;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(int* out, const float* logits, const int* params, int vocab) {
    __shared__ unsigned long long hist[256];
    __shared__ unsigned long long scratch[33];
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    __shared__ float row_max;
    pdl_trigger();
    pdl_wait();
    const float* row = logits + (long long)blockIdx.x * vocab;
    const int* p = params + 5 * blockIdx.x;
    float temperature = __int_as_float(p[0]);
    int top_k = p[1];
    float top_p = __int_as_float(p[2]);
    double u = __hiloint2double(p[4], p[3]);

    // Argmax (lowest id on ties), as argmax_rows.
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (v > bv) {
            bv = v;
            bi = i;
        }
    }
    for (int o = WARP / 2; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffff, bv, o);
        int oi = __shfl_xor_sync(0xffffffff, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < blockDim.x / WARP; w++)
            if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) {
                bv = best_v[w];
                bi = best_i[w];
            }
        row_max = bv;
        out[blockIdx.x] = bi;
    }
    __syncthreads();
    if (!(temperature > 0.f) || top_k == 1) return;

    float inv_t = 1.f / temperature;
    // Scaling by a positive number keeps the order, so the scaled maximum is
    // the scaled maximum logit.
    float mx = row_max * inv_t;
    unsigned floor = 0;
    if (top_k > 1 && top_k < vocab) floor = radix_threshold<false>(row, vocab, inv_t, mx, 0, top_k, hist);

    // Kept mass, in fixed point.
    block_exclusive_scan(strided_mass(row, vocab, inv_t, mx, floor), scratch);
    unsigned long long kept = scratch[32];
    if (top_p < 1.f) {
        unsigned long long need = (unsigned long long)ceil((double)top_p * (double)kept);
        need = max(1ull, min(need, kept));
        floor = radix_threshold<true>(row, vocab, inv_t, mx, floor, need, hist);
        block_exclusive_scan(strided_mass(row, vocab, inv_t, mx, floor), scratch);
        kept = scratch[32];
    }
    // Draw: the first id (in id order) whose cumulative kept mass exceeds
    // u * kept. Thread t scans a contiguous chunk of ids.
    unsigned long long target = (unsigned long long)(u * (double)kept);
    if (target >= kept) target = kept - 1;
    int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    int lo = threadIdx.x * chunk, hi = min(vocab, lo + chunk);
    unsigned long long own = 0;
    for (int i = lo; i < hi; i++) {
        float x = row[i] * inv_t;
        if (order_key(x) >= floor) own += fixed_mass(x, mx);
    }
    unsigned long long before = block_exclusive_scan(own, scratch);
    if (before <= target && target < before + own) {
        unsigned long long cum = before;
        for (int i = lo; i < hi; i++) {
            float x = row[i] * inv_t;
            if (order_key(x) >= floor) {
                cum += fixed_mass(x, mx);
                if (cum > target) {
                    out[blockIdx.x] = i;
                    break;
                }
            }
        }
    }
}
