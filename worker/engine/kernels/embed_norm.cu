// The embedding gather and RMSNorm of the unfused (cuBLAS) path.

extern "C" {

// x[t, :] = embed[tokens[t], :] as f32. Grid: one block per token.
__global__ void embed_gather(float* x, const bf16* embed, const int* tokens, int hidden) {
    int t = blockIdx.x;
    const bf16* row = embed + (long long)tokens[t] * hidden;
    float* out = x + (long long)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = __bfloat162float(row[i]);
}

// out[r, :] = bf16(x[src, :] / rms(x[src, :]) * w) with src = rows ? rows[r] : r.
// Grid: one block per output row. `rows` gathers the last token of each
// sequence before the output head. When hidden % 4 == 0 and a thread's share
// fits RMS_VEC float4s, the row is read once with 16-byte loads and kept in
// registers between the sum and the scaling; otherwise it is read twice.
__global__ void rms_norm(bf16* out, const float* x, const float* w, const int* rows, int hidden, float eps) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    int src = rows ? rows[r] : r;
    const float* in = x + (long long)src * hidden;
    bf16* o = out + (long long)r * hidden;
    int n4 = hidden / 4;
    if (hidden % 4 == 0 && n4 <= RMS_VEC * (int)blockDim.x) {
        const float4* in4 = reinterpret_cast<const float4*>(in);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        // The weights are loaded with the row, so the scaling after the
        // block-wide sum waits on nothing.
        float4 v[RMS_VEC], wv[RMS_VEC];
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < RMS_VEC; j++) {
            int i = threadIdx.x + j * blockDim.x;
            v[j] = i < n4 ? in4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            wv[j] = i < n4 ? w4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
        }
        ss = block_sum(ss, scratch);
        float inv = rsqrtf(ss / hidden + eps);
#pragma unroll
        for (int j = 0; j < RMS_VEC; j++) {
            int i = threadIdx.x + j * blockDim.x;
            if (i < n4) {
                float4 g = wv[j];
                __nv_bfloat162 lo = __floats2bfloat162_rn(v[j].x * inv * g.x, v[j].y * inv * g.y);
                __nv_bfloat162 hi = __floats2bfloat162_rn(v[j].z * inv * g.z, v[j].w * inv * g.w);
                uint2 packed = make_uint2(*reinterpret_cast<unsigned*>(&lo), *reinterpret_cast<unsigned*>(&hi));
                *reinterpret_cast<uint2*>(o + 4 * i) = packed;
            }
        }
        return;
    }
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += in[i] * in[i];
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __float2bfloat16(in[i] * inv * w[i]);
}

}  // extern "C"
