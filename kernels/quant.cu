// qsens CUDA kernels of src/quant: FP8 E4M3 fake quantization and the gradient-score reduction.
// Same arithmetic as src/quant/{fp8,sensitivity}.rs (the CPU paths), which are the reference.
#include "common.cuh"

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

// A block's reduction of one value per thread with `op` (sum or max), in a fixed tree order (so
// reruns give the same bits): warps by shuffle-down, then the warps' results by warp 0. The total
// is valid in thread 0 only; `shared` holds 32 floats.
template <typename Op> __device__ __forceinline__ float block_reduce(float v, float *shared, Op op) {
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffff, v, off));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x + 31) / 32 ? shared[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffff, v, off));
    }
    return v;
}
struct SumOp {
    __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

#define FAKE_QUANT(NAME, T)                                                                     \
    extern "C" __global__ void NAME(const T *x, T *y, const size_t n, const float scale,         \
                                    const float inv_scale) {                                    \
        for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;                   \
             i += (size_t)blockDim.x * gridDim.x) {                                             \
            y[i] = from_f32<T>(fake_quant(to_f32(x[i]), scale, inv_scale));                     \
        }                                                                                       \
    }

FAKE_QUANT(fake_quant_e4m3_f32, float)
FAKE_QUANT(fake_quant_e4m3_bf16, __nv_bfloat16)
FAKE_QUANT(fake_quant_e4m3_f16, __half)

// A served FP8 layer's static quantization, `e4m3(clamp(x / scale, ±448)) · scale` in f32 (IEEE
// division, as the checkpoint writer divides), in one pass (fp8.rs `served_fake_quant`).
#define SERVED_FAKE_QUANT(NAME, T)                                                              \
    extern "C" __global__ void NAME(const T *x, T *y, const size_t n, const float scale) {       \
        for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;                   \
             i += (size_t)blockDim.x * gridDim.x) {                                             \
            float v = to_f32(x[i]) / scale;                                                     \
            v = v > 448.0f ? 448.0f : (v < -448.0f ? -448.0f : v);                              \
            y[i] = from_f32<T>(round_to_e4m3(v) * scale);                                       \
        }                                                                                       \
    }

SERVED_FAKE_QUANT(served_fake_quant_e4m3_f32, float)
SERVED_FAKE_QUANT(served_fake_quant_e4m3_bf16, __nv_bfloat16)
SERVED_FAKE_QUANT(served_fake_quant_e4m3_f16, __half)

// ModelOpt's gradient score Σ clamp((yq − y)·dy, ±1e10)² in f32, stage 1: one partial sum per
// block (grid-stride), reduced in shared memory. Stage 2 (sum_partials) adds the partials.
template <typename T>
__device__ void grad_score_partials(const T *dy, const T *y, const T *yq, const size_t n, float *partials) {
    __shared__ float shared[32];
    float acc = 0.0f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        float p = (to_f32(yq[i]) - to_f32(y[i])) * to_f32(dy[i]);
        p = fminf(fmaxf(p, -1e10f), 1e10f);
        acc += p * p;
    }
    acc = block_reduce(acc, shared, SumOp());
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

#define GRAD_SCORE(NAME, T)                                                                      \
    extern "C" __global__ void NAME(const T *dy, const T *y, const T *yq, const size_t n,         \
                                    float *partials) {                                          \
        grad_score_partials<T>(dy, y, yq, n, partials);                                         \
    }
GRAD_SCORE(grad_score_f32, float)
GRAD_SCORE(grad_score_bf16, __nv_bfloat16)
GRAD_SCORE(grad_score_f16, __half)

// Stage 2: one block adds `n` partials into out[0] (fixed order: deterministic).
extern "C" __global__ void sum_partials(const float *partials, const size_t n, float *out) {
    __shared__ float shared[32];
    float acc = 0.0f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
    acc = block_reduce(acc, shared, SumOp());
    if (threadIdx.x == 0) out[0] = acc;
}

// Max calibration: slot = max(slot, max |x|) in one pass (grid-stride, warp and block reduce,
// then an atomic max on the float's bits, which orders like the float for values >= 0).
template <typename T>
__device__ void amax_update(const T *x, const size_t n, float *slot) {
    __shared__ float shared[32];
    float m = 0.0f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x)
        m = fmaxf(m, fabsf(to_f32(x[i])));
    m = block_reduce(m, shared, MaxOp());
    if (threadIdx.x == 0) atomicMax((int *)slot, __float_as_int(m));
}

#define AMAX_UPDATE(NAME, T)                                                                     \
    extern "C" __global__ void NAME(const T *x, const size_t n, float *slot) { amax_update<T>(x, n, slot); }
AMAX_UPDATE(amax_update_f32, float)
AMAX_UPDATE(amax_update_bf16, __nv_bfloat16)
AMAX_UPDATE(amax_update_f16, __half)

// NVFP4 fake quantization (nvfp4.rs `fake_quant_row`, ModelOpt's triton kernel): per row of
// `cols` values, blocks of 16 from the row's start (the last one may be short, zero-padded); one
// thread per block. `⊘` is triton's division, modelled as a · RN(1/b) (nvfp4.rs `triton_div`);
// every product is rounded on its own (no contraction into an FMA).
__device__ __forceinline__ float triton_div(float a, float b) { return __fmul_rn(a, __fdiv_rn(1.0f, b)); }

__device__ __forceinline__ float round_e2m1_magnitude(float a) {
    if (a <= 0.25f) return 0.0f;
    if (a < 0.75f) return 0.5f;
    if (a <= 1.25f) return 1.0f;
    if (a < 1.75f) return 1.5f;
    if (a <= 2.5f) return 2.0f;
    if (a < 3.5f) return 3.0f;
    if (a <= 5.0f) return 4.0f;
    return 6.0f;   // NaN too, like the kernel's chain of comparisons
}

#define FAKE_QUANT_NVFP4(NAME, T)                                                               \
    extern "C" __global__ void NAME(const T *x, T *y, const size_t rows, const size_t cols,     \
                                    const float global_scale) {                                 \
        const size_t per_row = (cols + 15) / 16, total = rows * per_row;                        \
        const float gs = global_scale > 0.0f ? global_scale : 1e-12f;                           \
        for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < total;               \
             b += (size_t)blockDim.x * gridDim.x) {                                             \
            const size_t first = (b / per_row) * cols + (b % per_row) * 16;                     \
            const int len = (int)min((size_t)16, cols - (b % per_row) * 16);                    \
            float v[16];                                                                        \
            for (int i = 0; i < len; ++i) v[i] = to_f32(x[first + i]);                          \
            float bmax = len == 16 ? fabsf(v[0]) : 0.0f;                                        \
            for (int i = 0; i < len; ++i) bmax = fmaxf(bmax, fabsf(v[i]));                      \
            const float in_range = fminf(triton_div(bmax, __fmul_rn(6.0f, gs)), 448.0f);        \
            float s = __fmul_rn(round_to_e4m3(in_range), gs);                                   \
            if (!(s >= 1e-5f)) s = 1.0f;                                                        \
            for (int i = 0; i < len; ++i) {                                                     \
                const float r = __fmul_rn(round_e2m1_magnitude(triton_div(fabsf(v[i]), s)), s);  \
                y[first + i] = from_f32<T>(v[i] >= 0.0f ? r : __fsub_rn(0.0f, r));              \
            }                                                                                   \
        }                                                                                       \
    }

FAKE_QUANT_NVFP4(fake_quant_nvfp4_f32, float)
FAKE_QUANT_NVFP4(fake_quant_nvfp4_bf16, __nv_bfloat16)
FAKE_QUANT_NVFP4(fake_quant_nvfp4_f16, __half)
