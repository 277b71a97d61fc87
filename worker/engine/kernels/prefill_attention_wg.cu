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

// From the host (tuning.rs): WG_K keys a tile; WG_MIN_BLOCKS blocks an SM
// holds (2 caps the kernel at 128 registers); WG_ZIGZAG, whether grids that
// fit at once pair long and short query tiles on an SM (see
// prefill_attention_wg); WG_MAX_SLACK, how far (log2 units) a row's running
// maximum may trail a tile's before the row's output and sum are rescaled
// (see softmax_wg).

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
