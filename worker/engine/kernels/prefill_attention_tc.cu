// Tensor-core prefill attention (mma.sync): any GPU the backend runs on.

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
// warp's first row. `rows` = query rows per tile (16 * max(1, TC_WARPS /
// group)); TC_K keys a tile.

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

extern "C" __global__ void __launch_bounds__(TC_WARPS * WARP, 2)
    prefill_attention_tc64(bf16* out, const float* qkv, const bf16* k_cache, const bf16* v_cache,
                           const int* block_tables, const int* positions, const int* tile_seq, const int* tile_row0,
                           const int* tile_rows, int nh, int nkv, int hd, int block_size, int max_blocks, float scale) {
    prefill_attention_tc<64>(out, qkv, k_cache, v_cache, block_tables, positions, tile_seq, tile_row0, tile_rows, nh,
                             nkv, block_size, max_blocks, scale);
}

extern "C" __global__ void __launch_bounds__(TC_WARPS * WARP, 2)
    prefill_attention_tc128(bf16* out, const float* qkv, const bf16* k_cache, const bf16* v_cache,
                            const int* block_tables, const int* positions, const int* tile_seq, const int* tile_row0,
                            const int* tile_rows, int nh, int nkv, int hd, int block_size, int max_blocks, float scale) {
    prefill_attention_tc<128>(out, qkv, k_cache, v_cache, block_tables, positions, tile_seq, tile_row0, tile_rows,
                              nh, nkv, block_size, max_blocks, scale);
}
