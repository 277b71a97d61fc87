// Kernels of Tandem's CUDA backend (worker/engine/src/backend/cuda/): the
// header every kernel file builds on.
//
// The kernels are one NVRTC program, compiled at start for the device's
// architecture: this header, then the files in the order `KERNEL_PROGRAM`
// lists them (worker/engine/src/backend/cuda/kernels.rs), concatenated, so
// a file uses what the ones before it define and none includes another.
// Storage is bf16 (weights, KV cache, GEMM inputs); arithmetic is f32. The
// residual stream, Q (after RoPE) and the QKV projection output stay f32.
//
// KV cache layout, per layer and for K and V alike: [num_slots, kv_heads,
// head_dim] with slot = block * block_size + position % block_size, as the
// CPU backend lays it out.
//
// Tile sizes, block shapes and tuning knobs are not defined here: the host
// defines each once (`KernelTuning` in tuning.rs) and passes it as `-DNAME=
// VALUE`, since it sizes grids, shared memory and workspaces by the same
// numbers. A program compiled without them stops here.
#ifndef RMS_VEC
#error "RMS_VEC is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef MAX_GROUP
#error "MAX_GROUP is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef MAX_HEAD_DIM
#error "MAX_HEAD_DIM is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef DECODE_WARPS
#error "DECODE_WARPS is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef DECODE_PARTITION
#error "DECODE_PARTITION is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef DECODE_MIN_CHUNK
#error "DECODE_MIN_CHUNK is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef DECODE_V2_ROUND
#error "DECODE_V2_ROUND is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef PF_Q
#error "PF_Q is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef PF_K
#error "PF_K is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef TC_K
#error "TC_K is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef TC_WARPS
#error "TC_WARPS is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef WG_K
#error "WG_K is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef WG_MIN_BLOCKS
#error "WG_MIN_BLOCKS is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef WG_ZIGZAG
#error "WG_ZIGZAG is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef WG_MAX_SLACK
#error "WG_MAX_SLACK is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef GEMV_WARPS
#error "GEMV_WARPS is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef GEMV_UNROLL
#error "GEMV_UNROLL is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef GEMV_PREFETCH_BYTES
#error "GEMV_PREFETCH_BYTES is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef SAMPLE_THREADS
#error "SAMPLE_THREADS is not defined: the host passes it (see tuning.rs)"
#endif
#ifndef SAMPLING_WORDS
#error "SAMPLING_WORDS is not defined: the host passes it (see tuning.rs)"
#endif

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
