// The scalar prefill attention (f32, any head dim): the fallback of the
// tensor-core kernels (prefill_attention_tc.cu, prefill_attention_wg.cu).

extern "C" {

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
