// SiLU(gate) * up of the unfused MLP, from bf16 or f32 gate/up products.

extern "C" {

// act[t, i] = silu(gu[t, i]) * gu[t, f + i], eight bf16 per thread (f % 8 == 0).
// Grid: x along the row, y over tokens (striding by gridDim.y), so no
// thread divides to find its token.
__global__ void silu_mul(bf16* act, const bf16* gu, int tokens, int f) {
    int n8 = f / 8;
    for (int t = blockIdx.y; t < tokens; t += gridDim.y) {
        const bf16* row = gu + (long long)t * 2 * f;
        bf16* dst = act + (long long)t * f;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
            uint4 g4 = *reinterpret_cast<const uint4*>(row + 8 * i);
            uint4 u4 = *reinterpret_cast<const uint4*>(row + f + 8 * i);
            const bf16* g = reinterpret_cast<const bf16*>(&g4);
            const bf16* u = reinterpret_cast<const bf16*>(&u4);
            uint4 o4;
            bf16* o = reinterpret_cast<bf16*>(&o4);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float gv = __bfloat162float(g[k]);
                o[k] = __float2bfloat16(gv / (1.f + __expf(-gv)) * __bfloat162float(u[k]));
            }
            *reinterpret_cast<uint4*>(dst + 8 * i) = o4;
        }
    }
}

// The same from f32 gate/up products (the GEMM's f32 output): eight per
// thread (f % 8 == 0), two 16-byte loads of each of gate and up in flight.
__global__ void silu_mul_f32(bf16* act, const float* gu, int tokens, int f) {
    int n8 = f / 8;
    for (int t = blockIdx.y; t < tokens; t += gridDim.y) {
        const float* row = gu + (long long)t * 2 * f;
        bf16* dst = act + (long long)t * f;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += gridDim.x * blockDim.x) {
            const float4* g4 = reinterpret_cast<const float4*>(row + 8 * i);
            const float4* u4 = reinterpret_cast<const float4*>(row + f + 8 * i);
            float4 ga = g4[0], gb = g4[1], ua = u4[0], ub = u4[1];
            auto sm = [](float g, float u) { return g / (1.f + __expf(-g)) * u; };
            uint4 o = make_uint4(pack_bf16(sm(ga.x, ua.x), sm(ga.y, ua.y)), pack_bf16(sm(ga.z, ua.z), sm(ga.w, ua.w)),
                                 pack_bf16(sm(gb.x, ub.x), sm(gb.y, ub.y)), pack_bf16(sm(gb.z, ub.z), sm(gb.w, ub.w)));
            *reinterpret_cast<uint4*>(dst + 8 * i) = o;
        }
    }
}

}  // extern "C"
