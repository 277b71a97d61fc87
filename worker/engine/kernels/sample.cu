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
// params per row (SAMPLING_WORDS = 5 ints): temperature (f32 bits), top_k,
// top_p (f32 bits), u (f64 bits, low word first).
// With `masks` (a grammar's allowed tokens, `mask_words` 32-bit words a row,
// bit i of word i / 32 set when token i may follow), a row's forbidden
// logits are first set to -inf in place: they carry no mass and never win.
// ---------------------------------------------------------------------------

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
    sample_rows(int* out, float* logits, const int* params, int vocab, const unsigned* masks, int mask_words) {
    __shared__ unsigned long long hist[256];
    __shared__ unsigned long long scratch[33];
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    __shared__ float row_max;
    pdl_trigger();
    pdl_wait();
    float* row = logits + (long long)blockIdx.x * vocab;
    if (masks) {
        const unsigned* allowed = masks + (long long)blockIdx.x * mask_words;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            if (!((allowed[i >> 5] >> (i & 31)) & 1u)) row[i] = -INFINITY;
        __syncthreads();
    }
    const int* p = params + SAMPLING_WORDS * blockIdx.x;
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
