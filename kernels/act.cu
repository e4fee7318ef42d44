// Fused elementwise activations and their backwards (f32 math, one rounding per stored value):
// - gelu_tanh_bwd:  dx = dy·gelu'(x) for gelu(x, approximate="tanh");
// - gelu_erf_bwd:   dx = dy·(Φ(x) + x·φ(x));
// - swiglu_fwd:     out = T(T(silu(g))·u) (HF `act_fn(gate) * up`, silu rounded like torch);
// - swiglu_bwd:     dg = dm·u·silu'(g), du = dm·silu(g).
// Grid-stride loops over n elements of contiguous inputs.
#include "common.cuh"

// The op chain's constants, products formed in f64 and rounded once to f32 (as candle's affine
// rounds its f64 multipliers): c = sqrt(2/pi), c·0.044715, ½·c·3·0.044715, ½·c, 1/sqrt(2), 1/sqrt(2pi).
#define GELU_K0 7.978845835e-01f
#define GELU_K1 3.567740694e-02f
#define GELU_K2 5.351611227e-02f
#define GELU_K3 3.989422917e-01f
#define FRAC_1_SQRT_2 7.071067691e-01f
#define INV_SQRT_2PI 3.989422917e-01f

#define GRID_LOOP(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)blockDim.x * gridDim.x)

// Same order of operations as ops::gelu_tanh_backward.
template <typename T>
__device__ void gelu_tanh_bwd(const T *__restrict__ x, const T *__restrict__ dy, T *__restrict__ dx, const size_t n) {
    GRID_LOOP(i, n) {
        const float v = to_f32(x[i]);
        const float v2 = mul(v, v);
        const float t = tanhf(mul(add(mul(v2, GELU_K1), GELU_K0), v));
        const float left = add(mul(t, 0.5f), 0.5f);
        const float du = add(mul(v2, GELU_K2), GELU_K3);
        const float right = mul(mul(add(mul(mul(t, t), -1.0f), 1.0f), v), du);
        dx[i] = from_f32<T>(mul(add(left, right), to_f32(dy[i])));
    }
}

template <typename T>
__device__ void gelu_erf_bwd(const T *__restrict__ x, const T *__restrict__ dy, T *__restrict__ dx, const size_t n) {
    GRID_LOOP(i, n) {
        const float v = to_f32(x[i]);
        const float cdf = add(mul(erff(mul(v, FRAC_1_SQRT_2)), 0.5f), 0.5f);
        const float pdf = mul(expf(mul(mul(v, v), -0.5f)), INV_SQRT_2PI);
        dx[i] = from_f32<T>(mul(add(cdf, mul(v, pdf)), to_f32(dy[i])));
    }
}

template <typename T>
__device__ void swiglu_fwd(const T *__restrict__ g, const T *__restrict__ u, T *__restrict__ out, const size_t n) {
    GRID_LOOP(i, n) {
        const float gv = to_f32(g[i]);
        const float silu = rnd<T>(__fdiv_rn(gv, add(1.0f, expf(-gv))));
        out[i] = from_f32<T>(mul(silu, to_f32(u[i])));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T *__restrict__ g, const T *__restrict__ u, const T *__restrict__ dm,
                           T *__restrict__ dg, T *__restrict__ du, const size_t n) {
    GRID_LOOP(i, n) {
        const float gv = to_f32(g[i]), uv = to_f32(u[i]), d = to_f32(dm[i]);
        const float s = __fdiv_rn(1.0f, add(expf(-gv), 1.0f));
        const float silu = mul(gv, s);
        const float dsilu = mul(s, add(mul(gv, add(mul(s, -1.0f), 1.0f)), 1.0f));
        du[i] = from_f32<T>(mul(d, silu));
        dg[i] = from_f32<T>(mul(mul(d, uv), dsilu));
    }
}

#define ACT_OPS(T, SUF)                                                                                           \
    extern "C" __global__ void gelu_tanh_bwd_##SUF(const T *x, const T *dy, T *dx, const size_t n) {            \
        gelu_tanh_bwd<T>(x, dy, dx, n);                                                                           \
    }                                                                                                             \
    extern "C" __global__ void gelu_erf_bwd_##SUF(const T *x, const T *dy, T *dx, const size_t n) {             \
        gelu_erf_bwd<T>(x, dy, dx, n);                                                                            \
    }                                                                                                             \
    extern "C" __global__ void swiglu_fwd_##SUF(const T *g, const T *u, T *out, const size_t n) {               \
        swiglu_fwd<T>(g, u, out, n);                                                                              \
    }                                                                                                             \
    extern "C" __global__ void swiglu_bwd_##SUF(const T *g, const T *u, const T *dm, T *dg, T *du,              \
                                                const size_t n) {                                                 \
        swiglu_bwd<T>(g, u, dm, dg, du, n);                                                                       \
    }

ACT_OPS(float, f32)
ACT_OPS(__nv_bfloat16, bf16)
ACT_OPS(__half, f16)
