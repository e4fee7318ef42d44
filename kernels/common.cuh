// Shared helpers of the kernels (attention.cu, norm.cu, act.cu, quant.cu). All arithmetic is in
// f32; values are read from / written to the storage type T (float, bf16, f16) with one rounding.
// The CPU reference of every kernel is src/model/qwen3_vl/fused.rs (src/quant for quant.cu).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// v rounded to T and back: what a T-typed op of PyTorch/candle stores.
template <typename T> __device__ __forceinline__ float rnd(float v) { return to_f32(from_f32<T>(v)); }

// Products and sums that must not be contracted into an FMA (the CPU reference rounds each one).
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the TPR threads that share a row: a warp (TPR = 32) or the whole block (TPR =
// blockDim.x, a multiple of 32, one row per block; `shm` holds TPR/32 floats). Every thread of
// the group gets the total.
template <int TPR> __device__ __forceinline__ float group_sum(float v, float *shm) {
    v = warp_sum(v);
    if (TPR == 32) return v;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // the previous reduction's readers are done with shm
    if (lane == 0) shm[w] = v;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < TPR / 32; ++i) t += shm[i];
    return t;
}
