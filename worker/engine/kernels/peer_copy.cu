// cuda-ipc KV transfer (worker/engine/src/backend/cuda/ipc.rs), a program
// of its own: copies whole KV blocks of this pool into a peer's mapped pool.
// One thread block per (prompt block, plane): 16-byte loads from this pool,
// 16-byte stores into the peer's (mapped) pool.

extern "C" __global__ void kv_copy_blocks(
    const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
    const unsigned int* __restrict__ src_blocks, const unsigned int* __restrict__ dst_blocks,
    unsigned long long src_plane, unsigned long long dst_plane, unsigned long long block_bytes)
{
    const unsigned long long p = blockIdx.y;
    const uint4* s = reinterpret_cast<const uint4*>(
        src + p * src_plane + (unsigned long long)src_blocks[blockIdx.x] * block_bytes);
    uint4* d = reinterpret_cast<uint4*>(
        dst + p * dst_plane + (unsigned long long)dst_blocks[blockIdx.x] * block_bytes);
    const unsigned long long n = block_bytes / 16;
    for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) {
        d[i] = s[i];
    }
}
