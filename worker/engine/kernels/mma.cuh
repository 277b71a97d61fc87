// Tensor-core building blocks of the prefill attention kernels
// (prefill_attention_tc.cu, prefill_attention_wg.cu): mma.sync, ldmatrix
// and cp.async wrappers, and the flash-attention steps on fragments.

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
