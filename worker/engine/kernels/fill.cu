// Dummy weights (`--load-format dummy`), generated on the device.

extern "C" {

// out[i] = uniform(-scale, scale) (bf16), for --load-format dummy.
__global__ void fill_uniform_bf16(bf16* out, unsigned long long n, unsigned long long seed, float scale) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = mix64(seed ^ mix64(i));
        float u = (float)(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        out[i] = __float2bfloat16((2.f * u - 1.f) * scale);
    }
}

// out[i] = value (f32): norm weights of dummy models.
__global__ void fill_f32(float* out, unsigned long long n, float value) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = value;
}

}  // extern "C"
