// Fused attention pieces of the Qwen3-VL forward/backward (the matmuls stay in cuBLAS):
// - attn_softmax_fwd:  raw scores S → P = softmax(scale·S [causal]) in T and lse in f32;
// - attn_softmax_bwd:  S, dP, lse, delta → P (for dV = Pᵀ·dO) and dS = P∘(dP − delta)·scale;
// - attn_rowdot:       delta = rowsum(dO∘O), reading strided [H, L, d] views;
// - attn_bwd_prep:     dO [L, H·d] (o_proj's input gradient) → dO [H, L, d] and delta, one pass;
// - qk_norm_rope_*:    text per-head q/k RMSNorm + interleaved-MRoPE rotation + [L,H,d]→[H,L,d];
// - vis_qkv_rope_*:    vision qkv split + 2-D rotary (f32) + [N,3,H,d]→[3,H,N,d].
//
// Score rows: S is [B, R, K] with R = G·n rows per batch (GQA: G query heads share a kv head,
// n query rows each); flat row r is query head h = r / n (= b·G + g), query i = r % n at absolute
// position q0 + i. Causal rows see keys j ≤ q0 + i (every row sees key 0). One warp per row.
#include "common.cuh"

#define WARPS_PER_BLOCK 8

extern "C" __global__ void qsens_fill_u8(uint8_t *p, const size_t n, const uint8_t v) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x)
        p[i] = v;
}

__device__ __forceinline__ int visible_keys(int r, int k, int causal, int n, int q0) {
    return causal ? min(k, q0 + r % n + 1) : k;
}

// Same arithmetic as the op chain: x = f32(S)·scale; m = max x; e = exp(x − m); z = Σ e;
// P = e / z (rounded to T); lse = m + ln z. Masked keys get P = 0.
template <typename T>
__device__ void softmax_fwd(const T *__restrict__ s, T *__restrict__ p, float *__restrict__ lse, const int rows,
                            const int k, const float scale, const int causal, const int n, const int q0) {
    const int r = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const T *sr = s + (size_t)r * k;
    T *pr = p + (size_t)r * k;
    const int kv = visible_keys(r, k, causal, n, q0);
    float m = -INFINITY;
#pragma unroll 4
    for (int j = lane; j < kv; j += 32) m = fmaxf(m, mul(to_f32(sr[j]), scale));
    m = warp_max(m);
    float z = 0.f;
#pragma unroll 4
    for (int j = lane; j < kv; j += 32) z += expf(mul(to_f32(sr[j]), scale) - m);
    z = warp_sum(z);
#pragma unroll 4
    for (int j = lane; j < kv; j += 32) pr[j] = from_f32<T>(__fdiv_rn(expf(mul(to_f32(sr[j]), scale) - m), z));
    for (int j = kv + lane; j < k; j += 32) pr[j] = from_f32<T>(0.f);
    if (lane == 0) lse[r] = m + logf(z);
}

// P = exp(scale·S − lse) (f32, masked 0); outputs P rounded to T and dS = P·(dP − delta)·scale.
// lse / delta are [B·G, ld] views: row r reads [(r / n)·ld + q0 + r % n].
template <typename T>
__device__ void softmax_bwd(const T *__restrict__ s, const T *__restrict__ dp, const float *__restrict__ lse,
                            const float *__restrict__ delta, T *__restrict__ p, T *__restrict__ ds, const int rows,
                            const int k, const float scale, const int causal, const int n, const int q0,
                            const int lse_ld, const int delta_ld) {
    const int r = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const size_t off = (size_t)r * k;
    const int h = r / n, i = r % n;
    const float l = lse[(size_t)h * lse_ld + q0 + i];
    const float dl = delta[(size_t)h * delta_ld + q0 + i];
    const int kv = visible_keys(r, k, causal, n, q0);
#pragma unroll 4
    for (int j = lane; j < kv; j += 32) {
        const float pj = expf(mul(to_f32(s[off + j]), scale) - l);
        p[off + j] = from_f32<T>(pj);
        ds[off + j] = from_f32<T>(mul(mul(pj, to_f32(dp[off + j]) - dl), scale));
    }
    for (int j = kv + lane; j < k; j += 32) {
        p[off + j] = from_f32<T>(0.f);
        ds[off + j] = from_f32<T>(0.f);
    }
}

// out[h·L + l] = Σ_c a[h, l, c]·b[h, l, c] for [H, L, d] views with unit stride in c.
template <typename T>
__device__ void rowdot(const T *__restrict__ a, const T *__restrict__ b, float *__restrict__ out, const int hh,
                       const int ll, const int d, const long long sah, const long long sal, const long long sbh,
                       const long long sbl) {
    const int r = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= hh * ll) return;
    const int h = r / ll, l = r % ll;
    const T *ar = a + h * sah + l * sal;
    const T *br = b + h * sbh + l * sbl;
    float acc = 0.f;
    for (int c = lane; c < d; c += 32) acc += to_f32(ar[c]) * to_f32(br[c]);
    acc = warp_sum(acc);
    if (lane == 0) out[r] = acc;
}

// dattn, attn [L, H, d] (token-major, as o_proj sees them) → dO [H, L, d] (head-major, for the
// matmuls) and delta[h·L + l] = Σ_c dattn·attn. One warp per (l, h).
template <typename T>
__device__ void bwd_prep(const T *__restrict__ da, const T *__restrict__ o, T *__restrict__ dout,
                         float *__restrict__ delta, const int ll, const int hh, const int d) {
    const int r = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= ll * hh) return;
    const int l = r / hh, h = r % hh;
    const T *dr = da + (size_t)r * d;
    const T *orow = o + (size_t)r * d;
    T *w = dout + ((size_t)h * ll + l) * d;
    float acc = 0.f;
    for (int c = lane; c < d; c += 32) {
        const T g = dr[c];
        w[c] = g;
        acc += to_f32(g) * to_f32(orow[c]);
    }
    acc = warp_sum(acc);
    if (lane == 0) delta[(size_t)h * ll + l] = acc;
}

// Text q/k: x [L, H, d] → xn = T(T(x·rstd)·w) (HF Qwen3VLTextRMSNorm) → rotated in T like HF
// (`q·cos + rotate_half(q)·sin`, every product and sum rounded to T) → out [H, L, d]; rstd [L·H].
// One warp per (l, h) row; lane handles the pairs (c, c + d/2).
template <typename T>
__device__ void qk_norm_rope_fwd(const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ cs,
                                 const T *__restrict__ sn, T *__restrict__ out, float *__restrict__ rstd,
                                 const int ll, const int hh, const int d, const float eps) {
    const int r = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= ll * hh) return;
    const int l = r / hh, h = r % hh, half = d / 2;
    const T *xr = x + (size_t)r * d;
    float ss = 0.f;
    for (int c = lane; c < d; c += 32) {
        const float v = to_f32(xr[c]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float rs = 1.f / sqrtf(ss / (float)d + eps);
    if (lane == 0) rstd[r] = rs;
    T *o = out + ((size_t)h * ll + l) * d;
    for (int c = lane; c < half; c += 32) {
        const float x1 = rnd<T>(mul(rnd<T>(mul(to_f32(xr[c]), rs)), to_f32(w[c])));
        const float x2 = rnd<T>(mul(rnd<T>(mul(to_f32(xr[c + half]), rs)), to_f32(w[c + half])));
        const float co = to_f32(cs[(size_t)l * half + c]), si = to_f32(sn[(size_t)l * half + c]);
        o[c] = from_f32<T>(sub(rnd<T>(mul(x1, co)), rnd<T>(mul(x2, si))));
        o[c + half] = from_f32<T>(add(rnd<T>(mul(x1, si)), rnd<T>(mul(x2, co))));
    }
}

// Backward of qk_norm_rope_fwd: g [H, L, d] → inverse rotation (rounded to T like the rope op
// with −sin) → RMSNorm backward in f32 with the forward's x [L, H, d] and rstd → dx [L, H, d].
template <typename T>
__device__ void qk_norm_rope_bwd(const T *__restrict__ g, const T *__restrict__ x, const float *__restrict__ rstd,
                                 const T *__restrict__ w, const T *__restrict__ cs, const T *__restrict__ sn,
                                 T *__restrict__ dx, const int ll, const int hh, const int d) {
    const int r = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= ll * hh) return;
    const int l = r / hh, h = r % hh, half = d / 2;
    const T *gr = g + ((size_t)h * ll + l) * d;
    const T *xr = x + (size_t)r * d;
    const float rs = rstd[r];
    // Pass 1: m = mean(gw·xhat) with gw = unrotated g · w.
    float acc = 0.f;
    for (int c = lane; c < half; c += 32) {
        const float co = to_f32(cs[(size_t)l * half + c]), si = to_f32(sn[(size_t)l * half + c]);
        const float g1 = to_f32(gr[c]), g2 = to_f32(gr[c + half]);
        const float u1 = rnd<T>(add(rnd<T>(mul(g1, co)), rnd<T>(mul(g2, si))));
        const float u2 = rnd<T>(sub(rnd<T>(mul(g2, co)), rnd<T>(mul(g1, si))));
        acc += mul(u1, to_f32(w[c])) * mul(to_f32(xr[c]), rs);
        acc += mul(u2, to_f32(w[c + half])) * mul(to_f32(xr[c + half]), rs);
    }
    const float m = warp_sum(acc) / (float)d;
    // Pass 2: dx = (gw − xhat·m)·rstd.
    T *o = dx + (size_t)r * d;
    for (int c = lane; c < half; c += 32) {
        const float co = to_f32(cs[(size_t)l * half + c]), si = to_f32(sn[(size_t)l * half + c]);
        const float g1 = to_f32(gr[c]), g2 = to_f32(gr[c + half]);
        const float u1 = rnd<T>(add(rnd<T>(mul(g1, co)), rnd<T>(mul(g2, si))));
        const float u2 = rnd<T>(sub(rnd<T>(mul(g2, co)), rnd<T>(mul(g1, si))));
        const float xh1 = mul(to_f32(xr[c]), rs), xh2 = mul(to_f32(xr[c + half]), rs);
        o[c] = from_f32<T>(mul(sub(mul(u1, to_f32(w[c])), mul(xh1, m)), rs));
        o[c + half] = from_f32<T>(mul(sub(mul(u2, to_f32(w[c + half])), mul(xh2, m)), rs));
    }
}

// Vision: qkv [N, 3, H, d] → out [3, H, N, d]; q and k rotated in f32 with f32 cos/sin [N, d/2]
// (HF rotates vision q/k in float), rounded once to T; v copied. One thread per pair (c, c+d/2).
template <typename T>
__device__ void vis_qkv_rope_fwd(const T *__restrict__ qkv, const float *__restrict__ cs,
                                 const float *__restrict__ sn, T *__restrict__ out, const int nn, const int hh,
                                 const int d) {
    const int half = d / 2;
    const size_t total = (size_t)nn * 3 * hh * half;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)blockDim.x * gridDim.x) {
        const int c = t % half;
        const size_t row = t / half;  // (n, which, h)
        const int h = row % hh, which = (row / hh) % 3;
        const int n = row / (3 * hh);
        const T *src = qkv + row * d;
        T *dst = out + (((size_t)which * hh + h) * nn + n) * d;
        if (which == 2) {
            dst[c] = src[c];
            dst[c + half] = src[c + half];
        } else {
            const float co = cs[(size_t)n * half + c], si = sn[(size_t)n * half + c];
            const float x1 = to_f32(src[c]), x2 = to_f32(src[c + half]);
            dst[c] = from_f32<T>(sub(mul(x1, co), mul(x2, si)));
            dst[c + half] = from_f32<T>(add(mul(x1, si), mul(x2, co)));
        }
    }
}

// Backward: dq, dk, dv [H, N, d] → dqkv [N, 3, H, d]; dq, dk unrotated in f32 (rotation by −sin).
template <typename T>
__device__ void vis_qkv_rope_bwd(const T *__restrict__ dq, const T *__restrict__ dk, const T *__restrict__ dv,
                                 const float *__restrict__ cs, const float *__restrict__ sn, T *__restrict__ dqkv,
                                 const int nn, const int hh, const int d) {
    const int half = d / 2;
    const size_t total = (size_t)nn * 3 * hh * half;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)blockDim.x * gridDim.x) {
        const int c = t % half;
        const size_t row = t / half;  // (n, which, h) of the output
        const int h = row % hh, which = (row / hh) % 3;
        const int n = row / (3 * hh);
        const T *src = (which == 0 ? dq : which == 1 ? dk : dv) + ((size_t)h * nn + n) * d;
        T *dst = dqkv + row * d;
        if (which == 2) {
            dst[c] = src[c];
            dst[c + half] = src[c + half];
        } else {
            const float co = cs[(size_t)n * half + c], si = sn[(size_t)n * half + c];
            const float g1 = to_f32(src[c]), g2 = to_f32(src[c + half]);
            dst[c] = from_f32<T>(add(mul(g1, co), mul(g2, si)));
            dst[c + half] = from_f32<T>(sub(mul(g2, co), mul(g1, si)));
        }
    }
}

#define ATTN_OPS(T, SUF)                                                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)                                            \
        attn_softmax_fwd_##SUF(const T *s, T *p, float *lse, const int rows, const int k, const float scale,     \
                               const int causal, const int n, const int q0) {                                     \
        softmax_fwd<T>(s, p, lse, rows, k, scale, causal, n, q0);                                                 \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)                                            \
        attn_softmax_bwd_##SUF(const T *s, const T *dp, const float *lse, const float *delta, T *p, T *ds,       \
                               const int rows, const int k, const float scale, const int causal, const int n,     \
                               const int q0, const int lse_ld, const int delta_ld) {                              \
        softmax_bwd<T>(s, dp, lse, delta, p, ds, rows, k, scale, causal, n, q0, lse_ld, delta_ld);                \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)                                            \
        attn_rowdot_##SUF(const T *a, const T *b, float *out, const int hh, const int ll, const int d,           \
                          const long long sah, const long long sal, const long long sbh, const long long sbl) {   \
        rowdot<T>(a, b, out, hh, ll, d, sah, sal, sbh, sbl);                                                      \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)                                            \
        attn_bwd_prep_##SUF(const T *da, const T *o, T *dout, float *delta, const int ll, const int hh,          \
                            const int d) {                                                                        \
        bwd_prep<T>(da, o, dout, delta, ll, hh, d);                                                               \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)                                            \
        qk_norm_rope_fwd_##SUF(const T *x, const T *w, const T *cs, const T *sn, T *out, float *rstd,            \
                               const int ll, const int hh, const int d, const float eps) {                        \
        qk_norm_rope_fwd<T>(x, w, cs, sn, out, rstd, ll, hh, d, eps);                                             \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)                                            \
        qk_norm_rope_bwd_##SUF(const T *g, const T *x, const float *rstd, const T *w, const T *cs, const T *sn,  \
                               T *dx, const int ll, const int hh, const int d) {                                  \
        qk_norm_rope_bwd<T>(g, x, rstd, w, cs, sn, dx, ll, hh, d);                                                \
    }                                                                                                             \
    extern "C" __global__ void vis_qkv_rope_fwd_##SUF(const T *qkv, const float *cs, const float *sn, T *out,    \
                                                      const int nn, const int hh, const int d) {                  \
        vis_qkv_rope_fwd<T>(qkv, cs, sn, out, nn, hh, d);                                                         \
    }                                                                                                             \
    extern "C" __global__ void vis_qkv_rope_bwd_##SUF(const T *dq, const T *dk, const T *dv, const float *cs,    \
                                                      const float *sn, T *dqkv, const int nn, const int hh,       \
                                                      const int d) {                                              \
        vis_qkv_rope_bwd<T>(dq, dk, dv, cs, sn, dqkv, nn, hh, d);                                                 \
    }

ATTN_OPS(float, f32)
ATTN_OPS(__nv_bfloat16, bf16)
ATTN_OPS(__half, f16)
