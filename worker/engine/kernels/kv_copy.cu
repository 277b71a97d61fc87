// KV export and import: K and V of listed positions gathered from, or
// scattered into, one layer's paged cache as the pool holds them (bf16).

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
