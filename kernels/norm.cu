// Fused RMSNorm / LayerNorm forward and backward over the last dim (rows × D), optionally with
// the residual add folded in:
// - rms_fwd:  h = T(x + res) (if res) → y = T(T(h·rstd)·w) (HF Qwen3VLTextRMSNorm), rstd f32;
// - rms_bwd:  dx = T((g − xhat·mean(g·xhat))·rstd), g = dy·w, then T(dx + res) (if res); dy may
//             come as up to three summands, added like the chain adds them: T(T(dy + dy2) + dy3);
// - ln_fwd:   h as above → y = T((h − mean)·rstd·w + b) in f32, mean/rstd f32;
// - ln_bwd:   dx = T((g − mean(g) − xhat·mean(g·xhat))·rstd), then T(dx + res) (if res).
// TPR threads per row: a warp (TPR = 32, 8 rows per 256-thread block) for short rows, the whole
// block (TPR = 256) otherwise. Rows are re-read from global (L1/L2) instead of kept in registers.
#include "common.cuh"

#define NORM_THREADS 256

template <int TPR> __device__ __forceinline__ int norm_row() {
    return TPR == 32 ? blockIdx.x * (NORM_THREADS / 32) + (threadIdx.x >> 5) : blockIdx.x;
}
template <int TPR> __device__ __forceinline__ int norm_lane() { return TPR == 32 ? (threadIdx.x & 31) : threadIdx.x; }

// The normalized input: x, or T(x + res).
template <typename T> __device__ __forceinline__ float load_in(const T *x, const T *res, size_t i) {
    return res ? rnd<T>(to_f32(x[i]) + to_f32(res[i])) : to_f32(x[i]);
}

template <typename T, int TPR>
__device__ void rms_fwd(const T *__restrict__ x, const T *__restrict__ res, const T *__restrict__ w,
                        T *__restrict__ y, T *__restrict__ hsum, float *__restrict__ rstd, const int rows,
                        const int dd, const float eps) {
    __shared__ float shm[NORM_THREADS / 32];
    const int r = norm_row<TPR>(), lane = norm_lane<TPR>();
    if (r >= rows) return;
    const size_t off = (size_t)r * dd;
    float ss = 0.f;
    for (int c = lane; c < dd; c += TPR) {
        const float v = load_in(x, res, off + c);
        if (res) hsum[off + c] = from_f32<T>(v);
        ss += v * v;
    }
    ss = group_sum<TPR>(ss, shm);
    const float rs = 1.f / sqrtf(ss / (float)dd + eps);
    if (lane == 0) rstd[r] = rs;
    for (int c = lane; c < dd; c += TPR) {
        const float v = load_in(x, res, off + c);
        y[off + c] = from_f32<T>(mul(rnd<T>(mul(v, rs)), to_f32(w[c])));
    }
}

// dy, or the chain's sum of its summands T(T(dy + dy2) + dy3).
template <typename T>
__device__ __forceinline__ float load_dy(const T *dy, const T *dy2, const T *dy3, size_t i) {
    float v = to_f32(dy[i]);
    if (dy2) v = rnd<T>(v + to_f32(dy2[i]));
    if (dy3) v = rnd<T>(v + to_f32(dy3[i]));
    return v;
}

template <typename T, int TPR>
__device__ void rms_bwd(const T *__restrict__ x, const float *__restrict__ rstd, const T *__restrict__ w,
                        const T *__restrict__ dy, const T *__restrict__ dy2, const T *__restrict__ dy3,
                        const T *__restrict__ res, T *__restrict__ dx, const int rows, const int dd) {
    __shared__ float shm[NORM_THREADS / 32];
    const int r = norm_row<TPR>(), lane = norm_lane<TPR>();
    if (r >= rows) return;
    const size_t off = (size_t)r * dd;
    const float rs = rstd[r];
    float acc = 0.f;
    for (int c = lane; c < dd; c += TPR)
        acc += mul(load_dy(dy, dy2, dy3, off + c), to_f32(w[c])) * mul(to_f32(x[off + c]), rs);
    const float m = group_sum<TPR>(acc, shm) / (float)dd;
    for (int c = lane; c < dd; c += TPR) {
        const float g = mul(load_dy(dy, dy2, dy3, off + c), to_f32(w[c]));
        const float xh = mul(to_f32(x[off + c]), rs);
        float v = mul(sub(g, mul(xh, m)), rs);
        if (res) v = rnd<T>(v) + to_f32(res[off + c]);
        dx[off + c] = from_f32<T>(v);
    }
}

template <typename T, int TPR>
__device__ void ln_fwd(const T *__restrict__ x, const T *__restrict__ res, const T *__restrict__ w,
                       const T *__restrict__ b, T *__restrict__ y, T *__restrict__ hsum, float *__restrict__ mean,
                       float *__restrict__ rstd, const int rows, const int dd, const float eps) {
    __shared__ float shm[NORM_THREADS / 32];
    const int r = norm_row<TPR>(), lane = norm_lane<TPR>();
    if (r >= rows) return;
    const size_t off = (size_t)r * dd;
    float s = 0.f;
    for (int c = lane; c < dd; c += TPR) {
        const float v = load_in(x, res, off + c);
        if (res) hsum[off + c] = from_f32<T>(v);
        s += v;
    }
    const float mu = group_sum<TPR>(s, shm) / (float)dd;
    float ss = 0.f;
    for (int c = lane; c < dd; c += TPR) {
        const float v = load_in(x, res, off + c) - mu;
        ss += v * v;
    }
    const float rs = 1.f / sqrtf(group_sum<TPR>(ss, shm) / (float)dd + eps);
    if (lane == 0) {
        mean[r] = mu;
        rstd[r] = rs;
    }
    for (int c = lane; c < dd; c += TPR) {
        const float v = load_in(x, res, off + c) - mu;
        y[off + c] = from_f32<T>(add(mul(mul(v, rs), to_f32(w[c])), to_f32(b[c])));
    }
}

template <typename T, int TPR>
__device__ void ln_bwd(const T *__restrict__ x, const float *__restrict__ mean, const float *__restrict__ rstd,
                       const T *__restrict__ w, const T *__restrict__ dy, const T *__restrict__ res,
                       T *__restrict__ dx, const int rows, const int dd) {
    __shared__ float shm[NORM_THREADS / 32];
    const int r = norm_row<TPR>(), lane = norm_lane<TPR>();
    if (r >= rows) return;
    const size_t off = (size_t)r * dd;
    const float mu = mean[r], rs = rstd[r];
    float sg = 0.f, sgx = 0.f;
    for (int c = lane; c < dd; c += TPR) {
        const float g = mul(to_f32(dy[off + c]), to_f32(w[c]));
        sg += g;
        sgx += g * mul(to_f32(x[off + c]) - mu, rs);
    }
    const float mg = group_sum<TPR>(sg, shm) / (float)dd;
    const float mgx = group_sum<TPR>(sgx, shm) / (float)dd;
    for (int c = lane; c < dd; c += TPR) {
        const float g = mul(to_f32(dy[off + c]), to_f32(w[c]));
        const float xh = mul(to_f32(x[off + c]) - mu, rs);
        float v = mul(sub(sub(g, mg), mul(xh, mgx)), rs);
        if (res) v = rnd<T>(v) + to_f32(res[off + c]);
        dx[off + c] = from_f32<T>(v);
    }
}

#define NORM_OPS_TPR(T, SUF, TPR, TAG)                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                                    \
        rms_fwd_##TAG##_##SUF(const T *x, const T *res, const T *w, T *y, T *hsum, float *rstd, const int rows,  \
                              const int dd, const float eps) {                                                    \
        rms_fwd<T, TPR>(x, res, w, y, hsum, rstd, rows, dd, eps);                                                 \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                                    \
        rms_bwd_##TAG##_##SUF(const T *x, const float *rstd, const T *w, const T *dy, const T *dy2,              \
                              const T *dy3, const T *res, T *dx, const int rows, const int dd) {                  \
        rms_bwd<T, TPR>(x, rstd, w, dy, dy2, dy3, res, dx, rows, dd);                                             \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                                    \
        ln_fwd_##TAG##_##SUF(const T *x, const T *res, const T *w, const T *b, T *y, T *hsum, float *mean,       \
                             float *rstd, const int rows, const int dd, const float eps) {                        \
        ln_fwd<T, TPR>(x, res, w, b, y, hsum, mean, rstd, rows, dd, eps);                                         \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                                    \
        ln_bwd_##TAG##_##SUF(const T *x, const float *mean, const float *rstd, const T *w, const T *dy,          \
                             const T *res, T *dx, const int rows, const int dd) {                                 \
        ln_bwd<T, TPR>(x, mean, rstd, w, dy, res, dx, rows, dd);                                                  \
    }

#define NORM_OPS(T, SUF)                  \
    NORM_OPS_TPR(T, SUF, 32, warp)        \
    NORM_OPS_TPR(T, SUF, NORM_THREADS, block)

NORM_OPS(float, f32)
NORM_OPS(__nv_bfloat16, bf16)
NORM_OPS(__half, f16)
