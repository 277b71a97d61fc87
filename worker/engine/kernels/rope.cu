// RoPE: the step's rotation table, and the rotation of Q and K fused with
// the QKV bias and the KV-cache write.

extern "C" {

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

}  // extern "C"
