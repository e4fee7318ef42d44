// qsens CUDA kernels: FP8 E4M3 fake quantization and the fused gradient-score reduction.
// Same arithmetic as src/quant/fp8.rs (the CPU path), which is the reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Nearest E4M3FN value (ties to even) of v, |v| <= 448 or NaN.
__device__ __forceinline__ float round_to_e4m3(float v) {
    float a = fabsf(v);
    if (!isfinite(a)) return v;
    float step, inv_step;
    if (a < 0.015625f) {           // below 2^-6: subnormal spacing 2^-9
        step = 0.001953125f;
        inv_step = 512.0f;
    } else {
        int e = (int)((__float_as_uint(a) >> 23) & 0xff) - 127;
        step = __uint_as_float((unsigned)(e - 3 + 127) << 23);
        inv_step = __uint_as_float((unsigned)(3 - e + 127) << 23);
    }
    // Power-of-two scalings are exact; rintf rounds half to even.
    float r = rintf(a * inv_step) * step;
    return copysignf(r, v);
}

__device__ __forceinline__ float fake_quant(float x, float scale, float inv_scale) {
    float v = x * scale;
    v = v > 448.0f ? 448.0f : (v < -448.0f ? -448.0f : v);   // NaN passes through
    return round_to_e4m3(v) * inv_scale;
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ void from_f32(float v, float *out) { *out = v; }
__device__ __forceinline__ void from_f32(float v, __nv_bfloat16 *out) { *out = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_f32(float v, __half *out) { *out = __float2half_rn(v); }

#define FAKE_QUANT(NAME, T)                                                                     \
    extern "C" __global__ void NAME(const T *x, T *y, const size_t n, const float scale,         \
                                    const float inv_scale) {                                    \
        for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;                   \
             i += (size_t)blockDim.x * gridDim.x) {                                             \
            from_f32(fake_quant(to_f32(x[i]), scale, inv_scale), &y[i]);                       \
        }                                                                                       \
    }

FAKE_QUANT(fake_quant_e4m3_f32, float)
FAKE_QUANT(fake_quant_e4m3_bf16, __nv_bfloat16)
FAKE_QUANT(fake_quant_e4m3_f16, __half)
