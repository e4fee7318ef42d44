// evaluate's per-row next-token metrics in one kernel (src/evaluate/cuda.rs launches it; the CPU
// reference is src/evaluate/metrics.rs, with the same definitions): for row r of the unquantized
// logits p and a recipe's logits q, both [rows, vocab] f32, in f64 arithmetic,
//   log p = p − max p − log Σ exp(p − max p)     (the same for q)
//   KL_r  = Σ_i exp(log p_i) (log p_i − log q_i)
//   nll_r = −log q[target_r]                      (0 where target_r < 0: the row has no label)
//   top1  = the lowest index holding the row maximum (torch.argmax's rule), of p and of q.
// One block per row. p and q go through the same reductions in the same order, so identical
// logits give identical log-probabilities and a KL of exactly 0.
#include <cuda_bf16.h>
#include <stdint.h>

constexpr int THREADS = 512;
constexpr int WARPS = THREADS / 32;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets the total (`shm` holds WARPS doubles).
__device__ double block_sum(double v, double *shm) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    double t = lane < WARPS ? shm[lane] : 0.0;
    return warp_sum(t);
}

// (max, first index of the max) of two candidates; NaN never wins (as a comparison skips it).
__device__ __forceinline__ void better(double &v, uint32_t &i, double ov, uint32_t oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

__device__ void block_argmax(double &v, uint32_t &i, double *shm_v, uint32_t *shm_i) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        double ov = __shfl_xor_sync(0xffffffffu, v, o);
        uint32_t oi = __shfl_xor_sync(0xffffffffu, i, o);
        better(v, i, ov, oi);
    }
    __syncthreads();
    if (lane == 0) {
        shm_v[warp] = v;
        shm_i[warp] = i;
    }
    __syncthreads();
    v = lane < WARPS ? shm_v[lane] : -INFINITY;
    i = lane < WARPS ? shm_i[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        double ov = __shfl_xor_sync(0xffffffffu, v, o);
        uint32_t oi = __shfl_xor_sync(0xffffffffu, i, o);
        better(v, i, ov, oi);
    }
}

// out[r] = {KL_r, nll_r, top1 of p, top1 of q} (indices as f64: exact below 2^53).
extern "C" __global__ void row_metrics_f32(const float *p, const float *q, const int32_t *targets,
                                           const uint32_t vocab, double *out) {
    __shared__ double shm_v[WARPS];
    __shared__ uint32_t shm_i[WARPS];
    const size_t r = blockIdx.x;
    const float *pr = p + r * vocab, *qr = q + r * vocab;

    double max_p = -INFINITY, max_q = -INFINITY;
    uint32_t top_p = 0xffffffffu, top_q = 0xffffffffu;
    for (uint32_t i = threadIdx.x; i < vocab; i += THREADS) {
        better(max_p, top_p, (double)pr[i], i);
        better(max_q, top_q, (double)qr[i], i);
    }
    block_argmax(max_p, top_p, shm_v, shm_i);
    block_argmax(max_q, top_q, shm_v, shm_i);

    double sum_p = 0.0, sum_q = 0.0;
    for (uint32_t i = threadIdx.x; i < vocab; i += THREADS) {
        sum_p += exp((double)pr[i] - max_p);
        sum_q += exp((double)qr[i] - max_q);
    }
    const double lse_p = log(block_sum(sum_p, shm_v));
    const double lse_q = log(block_sum(sum_q, shm_v));

    double kl = 0.0;
    for (uint32_t i = threadIdx.x; i < vocab; i += THREADS) {
        const double lp = ((double)pr[i] - max_p) - lse_p;
        const double lq = ((double)qr[i] - max_q) - lse_q;
        kl += exp(lp) * (lp - lq);
    }
    kl = block_sum(kl, shm_v);

    if (threadIdx.x == 0) {
        const int32_t t = targets[r];
        out[4 * r + 0] = kl;
        out[4 * r + 1] = t >= 0 ? -(((double)qr[t] - max_q) - lse_q) : 0.0;
        out[4 * r + 2] = (double)top_p;
        out[4 * r + 3] = (double)top_q;
    }
}

// score-layers' kl_div: per row r of new logits z (bf16 or f32, [rows, vocab]) and the unquantized
// probabilities p (f32, [rows, vocab]), out[r] = {max z, Σ exp(z − max z), Σ p·z, Σ p} in f64
// (src/score/kl_cuda.rs launches it; the CPU reference is `RowKlSums` in src/score/kl.rs). With the
// same sums of the unquantized logits, KL_r = (Σ p·x − Σ p·z) + (lse z − lse x)·Σ p: one read of z
// and p per group and format, and exactly 0 for unchanged logits (both sides summed alike).
__device__ __forceinline__ float as_f32(float x) { return x; }
__device__ __forceinline__ float as_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Max over the block (NaN skipped, as fmaxf skips it); every thread gets it.
__device__ float block_max(float v, float *shm) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    v = lane < WARPS ? shm[lane] : -INFINITY;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <typename T>
__device__ void row_kl_sums(const T *z, const float *p, const uint32_t vocab, double *out) {
    __shared__ double shm[WARPS];
    __shared__ float shm_max[WARPS];
    const size_t r = blockIdx.x;
    const T *zr = z + r * vocab;
    const float *pr = p + r * vocab;
    float m = -INFINITY;
    bool nan = false;
    for (uint32_t i = threadIdx.x; i < vocab; i += THREADS) {
        const float zi = as_f32(zr[i]);
        nan |= isnan(zi);
        m = fmaxf(m, zi);
    }
    m = block_max(m, shm_max);
    double sum_exp = 0.0, dot = 0.0, sum_p = 0.0;
    if (isfinite(m)) {
        for (uint32_t i = threadIdx.x; i < vocab; i += THREADS) {
            const float zi = as_f32(zr[i]);
            sum_exp += (double)expf(zi - m);
            dot += (double)pr[i] * (double)zi;
            sum_p += (double)pr[i];
        }
    } else {
        dot = NAN;
    }
    // A NaN logit makes the row's KL NaN (as the CPU path's dot product does).
    if (nan) dot = NAN;
    sum_exp = block_sum(sum_exp, shm);
    dot = block_sum(dot, shm);
    sum_p = block_sum(sum_p, shm);
    if (threadIdx.x == 0) {
        out[4 * r + 0] = (double)m;
        out[4 * r + 1] = sum_exp;
        out[4 * r + 2] = dot;
        out[4 * r + 3] = sum_p;
    }
}

extern "C" __global__ void row_kl_sums_f32(const float *z, const float *p, const uint32_t vocab, double *out) {
    row_kl_sums(z, p, vocab, out);
}
extern "C" __global__ void row_kl_sums_bf16(const __nv_bfloat16 *z, const float *p, const uint32_t vocab,
                                           double *out) {
    row_kl_sums(z, p, vocab, out);
}
