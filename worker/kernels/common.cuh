// Shared by Tandem's kernel sources (llama.cu, decode_step.cu): NVRTC gets
// this file's text first, then decode.cuh, then the kernels' own source
// (concatenated by device.rs), so every definition here exists once.

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

