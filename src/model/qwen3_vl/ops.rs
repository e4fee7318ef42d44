//! Building blocks with a hand-written backward: RMSNorm, LayerNorm, the activations, chunked
//! (flash-style) softmax attention and the causal-LM cross-entropy.
//!
//! These are the op-chain implementations (one candle op per step); the model runs the fused
//! equivalents of the hot ones ([`super::fused`]), which keep these as their test reference and
//! as the fallback where no fused kernel exists. The norms' `forward`/`backward` are fused and
//! live in `fused/norm.rs` beside the kernels they call: this module depends on nothing fused.
//!
//! Reductions and the derivative formulas run in the *accumulation dtype* (`acc`: F32, or F64 for
//! an F64 model), like HF which upcasts norms, softmax and the loss to f32. Matmuls run in the
//! model dtype ([`matmul`]: f32 products over more than 512 terms accumulated in f64 on the CPU).

use candle_core::{DType, Device, Result, Tensor, D};

use crate::model::linear::matmul;

/// Accumulation dtype for reductions: f64 for an f64 model, f32 otherwise.
pub fn acc_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `Qwen3VLTextRMSNorm`: `w * (x_f32 * rsqrt(mean(x²) + eps)).to(dtype)` over the last dim.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The op chain of [`RmsNorm::forward`] (reference and fallback).
    pub fn forward_chain(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let dt = x.dtype();
        let xf = x.to_dtype(acc_dtype(dt))?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (ms + self.eps)?.sqrt()?.recip()?;
        let y = xf.broadcast_mul(&rstd)?.to_dtype(dt)?.broadcast_mul(&self.weight)?;
        Ok((y, rstd))
    }

    /// The op chain of [`RmsNorm::backward`] (reference and fallback).
    pub fn backward_chain(&self, x: &Tensor, rstd: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let acc = acc_dtype(dt);
        let xhat = x.to_dtype(acc)?.broadcast_mul(rstd)?;
        let g = dy.to_dtype(acc)?.broadcast_mul(&self.weight.to_dtype(acc)?)?;
        let m = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = (g - xhat.broadcast_mul(&m)?)?.broadcast_mul(rstd)?;
        dx.to_dtype(dt)
    }
}

/// `nn.LayerNorm(dim, eps)` with affine weight and bias, computed in the accumulation dtype.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// Per-row statistics a LayerNorm keeps for its backward.
#[derive(Debug, Clone)]
pub struct LnStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        LayerNorm { weight, bias, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The op chain of [`LayerNorm::forward`] (reference and fallback).
    pub fn forward_chain(&self, x: &Tensor) -> Result<(Tensor, LnStats)> {
        let dt = x.dtype();
        let acc = acc_dtype(dt);
        let xf = x.to_dtype(acc)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let y = xc
            .broadcast_mul(&rstd)?
            .broadcast_mul(&self.weight.to_dtype(acc)?)?
            .broadcast_add(&self.bias.to_dtype(acc)?)?
            .to_dtype(dt)?;
        Ok((y, LnStats { mean, rstd }))
    }

    /// The op chain of [`LayerNorm::backward`] (reference and fallback).
    pub fn backward_chain(&self, x: &Tensor, st: &LnStats, dy: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let acc = acc_dtype(dt);
        let xhat = x.to_dtype(acc)?.broadcast_sub(&st.mean)?.broadcast_mul(&st.rstd)?;
        let g = dy.to_dtype(acc)?.broadcast_mul(&self.weight.to_dtype(acc)?)?;
        let mg = g.mean_keepdim(D::Minus1)?;
        let mgx = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = g.broadcast_sub(&mg)?.sub(&xhat.broadcast_mul(&mgx)?)?.broadcast_mul(&st.rstd)?;
        dx.to_dtype(dt)
    }
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044715;

/// Backward of `gelu(x, approximate="tanh")`: `dy · gelu'(x)`.
pub fn gelu_tanh_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let acc = acc_dtype(dt);
    let x = x.to_dtype(acc)?;
    let x2 = x.sqr()?;
    // u = c·(x + 0.044715·x³), t = tanh(u)
    let t = (x2.affine(SQRT_2_OVER_PI * GELU_C, SQRT_2_OVER_PI)? * &x)?.tanh()?;
    // gelu' = ½(1 + t) + ½·x·(1 − t²)·c·(1 + 3·0.044715·x²)
    let left = t.affine(0.5, 0.5)?;
    let du = x2.affine(0.5 * SQRT_2_OVER_PI * 3.0 * GELU_C, 0.5 * SQRT_2_OVER_PI)?;
    let right = ((t.sqr()?.affine(-1.0, 1.0)? * x)? * du)?;
    ((left + right)? * dy.to_dtype(acc)?)?.to_dtype(dt)
}

/// Backward of exact `gelu(x) = x·Φ(x)`: `dy · (Φ(x) + x·φ(x))`.
pub fn gelu_erf_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let acc = acc_dtype(dt);
    let x = x.to_dtype(acc)?;
    let cdf = x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()?.affine(0.5, 0.5)?;
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    let pdf = x.sqr()?.affine(-0.5, 0.0)?.exp()?.affine(inv_sqrt_2pi, 0.0)?;
    ((cdf + (x * pdf)?)? * dy.to_dtype(acc)?)?.to_dtype(dt)
}

/// `silu(g) · u` (HF `act_fn(gate_proj(x)) * up_proj(x)`), in the model dtype.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Backward of `silu(g) · u`: returns `(dg, du)`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    let dt = gate.dtype();
    let acc = acc_dtype(dt);
    let g = gate.to_dtype(acc)?;
    let u = up.to_dtype(acc)?;
    let dm = dm.to_dtype(acc)?;
    let s = g.neg()?.exp()?.affine(1.0, 1.0)?.recip()?; // sigmoid(g)
    let silu = (&g * &s)?;
    // silu'(g) = s·(1 + g·(1 − s))
    let dsilu = (&s * (g * s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
    let du = (&dm * silu)?;
    let dg = ((dm * u)? * dsilu)?;
    Ok((dg.to_dtype(dt)?, du.to_dtype(dt)?))
}

/// Largest number of score elements (heads × query rows × keys) one attention chunk may hold.
pub const ATTN_CHUNK_ELEMS: usize = 1 << 24;

/// Query rows per chunk for `heads` heads over `keys` keys.
pub fn chunk_rows(heads: usize, keys: usize, len: usize) -> usize {
    (ATTN_CHUNK_ELEMS / (heads * keys.max(1)).max(1)).clamp(16, len.max(16))
}

/// The causal mask of one sequence, built once and shared by every layer: a lower-triangular
/// `[rows, rows]` block of 0 / −∞ (acc dtype). Chunk `[q0, q0+n)` uses its top-left `[n, n]`
/// corner left-padded with `q0` zero columns.
#[derive(Debug, Clone)]
pub struct CausalMask {
    tri: Tensor,
    rows: usize,
}

impl CausalMask {
    /// For a sequence of `len` tokens attended by `heads` query heads.
    pub fn new(heads: usize, len: usize, dtype: DType, device: &Device) -> Result<Self> {
        Self::with_rows(len, chunk_rows(heads, len, len), dtype, device)
    }

    /// With `rows` query rows per chunk (tests force several chunks with it).
    pub fn with_rows(len: usize, rows: usize, dtype: DType, device: &Device) -> Result<Self> {
        let rows = rows.min(len.max(1)).max(1);
        let mut tri = vec![0f32; rows * rows];
        for i in 0..rows {
            for v in &mut tri[i * rows + i + 1..(i + 1) * rows] {
                *v = f32::NEG_INFINITY;
            }
        }
        let tri = Tensor::from_vec(tri, (rows, rows), device)?.to_dtype(dtype)?;
        Ok(CausalMask { tri, rows })
    }

    /// Query rows per chunk.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn chunk(&self, q0: usize, n: usize) -> Result<Tensor> {
        let m = self.tri.narrow(0, 0, n)?.narrow(1, 0, n)?;
        if q0 == 0 {
            Ok(m)
        } else {
            m.pad_with_zeros(1, q0, 0)
        }
    }
}

/// Attention geometry: `q` is `[H, L, d]`, `k`/`v` are `[Hkv, L, d]` with `H = Hkv·groups`
/// (query head `h` reads kv head `h / groups`, as HF `repeat_kv`). Causal when a mask is given.
/// Queries are processed `rows` at a time.
#[derive(Debug, Clone, Copy)]
pub struct AttnSpec<'a> {
    pub groups: usize,
    pub scale: f64,
    pub causal: Option<&'a CausalMask>,
    pub rows: usize,
}

impl<'a> AttnSpec<'a> {
    /// Causal attention with the chunking of `mask`.
    pub fn causal(groups: usize, scale: f64, mask: &'a CausalMask) -> Self {
        AttnSpec { groups, scale, causal: Some(mask), rows: mask.rows }
    }

    /// Full (bidirectional) attention of `heads` heads over `len` tokens.
    pub fn full(groups: usize, scale: f64, heads: usize, len: usize) -> Self {
        AttnSpec { groups, scale, causal: None, rows: chunk_rows(heads, len, len) }
    }
}

/// Scaled (and masked) scores of one query chunk in the accumulation dtype:
/// `q_c` `[Hkv, G·n, d]`, `k` `[Hkv, kl, d]` → `[Hkv, G·n, kl]`.
fn chunk_scores(q_c: &Tensor, k: &Tensor, spec: &AttnSpec, q0: usize, n: usize) -> Result<Tensor> {
    let acc = acc_dtype(q_c.dtype());
    let s = q_c.matmul(&k.t()?)?.to_dtype(acc)?.affine(spec.scale, 0.0)?;
    let Some(causal) = spec.causal else {
        return Ok(s);
    };
    let (hkv, gn, kl) = s.dims3()?;
    let mask = causal.chunk(q0, n)?;
    s.reshape((hkv, spec.groups, n, kl))?.broadcast_add(&mask)?.reshape((hkv, gn, kl))
}

/// Rows `[q0, q0+n)` of `[H, L, d]` as `[Hkv, G·n, d]` (contiguous).
fn query_chunk(q: &Tensor, groups: usize, q0: usize, n: usize) -> Result<Tensor> {
    let (h, l, d) = q.dims3()?;
    if q0 == 0 && n == l {
        return q.reshape((h / groups, groups * n, d));
    }
    q.reshape((h / groups, groups, l, d))?.narrow(2, q0, n)?.contiguous()?.reshape((h / groups, groups * n, d))
}

/// Softmax attention forward. Returns `(o [H, L, d], lse [H, L] acc)`; never materializes more
/// than [`ATTN_CHUNK_ELEMS`] scores at once.
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<(Tensor, Tensor)> {
    let (h, l, d) = q.dims3()?;
    let hkv = h / spec.groups;
    let dt = q.dtype();
    let rows = spec.rows;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let mut q0 = 0;
    while q0 < l {
        let n = rows.min(l - q0);
        let kl = if spec.causal.is_some() { q0 + n } else { l };
        let q_c = query_chunk(q, spec.groups, q0, n)?;
        let k_c = k.narrow(1, 0, kl)?;
        let v_c = v.narrow(1, 0, kl)?;
        let s = chunk_scores(&q_c, &k_c, spec, q0, n)?;
        // 2. Softmax with its log-sum-exp (rows always see key 0, so max is finite).
        let m = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&m)?.exp()?;
        let z = e.sum_keepdim(D::Minus1)?;
        let p = e.broadcast_div(&z)?;
        let lse = (m + z.log()?)?;
        // 3. P·V in the model dtype: [Hkv, G·n, kl] x [Hkv, kl, d]
        let o = matmul(&p.to_dtype(dt)?, &v_c)?;
        outs.push(o.reshape((hkv, spec.groups, n, d))?);
        lses.push(lse.reshape((hkv, spec.groups, n))?);
        q0 += n;
    }
    let o = Tensor::cat(&outs, 2)?.reshape((h, l, d))?;
    let lse = Tensor::cat(&lses, 2)?.reshape((h, l))?;
    Ok((o, lse))
}

/// Softmax attention backward from `do_` (`[H, L, d]`): returns `(dq, dk, dv)` with the shapes
/// of `q`, `k`, `v`. Probabilities are recomputed per query chunk from `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    do_: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let acc = acc_dtype(q.dtype());
    // D_i = Σ_d dO·O  [H, L]
    let delta = (do_.to_dtype(acc)? * o.to_dtype(acc)?)?.sum(D::Minus1)?;
    attention_backward_delta(q, k, v, lse, &delta, do_, spec)
}

/// [`attention_backward`] given `delta = Σ_d dO∘O` `[H, L]` (acc) instead of `o`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_delta(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    do_: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (h, l, d) = q.dims3()?;
    let hkv = h / spec.groups;
    let dt = q.dtype();
    let acc = acc_dtype(dt);
    let rows = spec.rows;
    let mut dqs = Vec::new();
    let mut dk = Tensor::zeros((hkv, l, d), acc, q.device())?;
    let mut dv = Tensor::zeros((hkv, l, d), acc, q.device())?;
    let mut q0 = 0;
    while q0 < l {
        let n = rows.min(l - q0);
        let kl = if spec.causal.is_some() { q0 + n } else { l };
        let q_c = query_chunk(q, spec.groups, q0, n)?;
        let do_c = query_chunk(do_, spec.groups, q0, n)?;
        let k_c = k.narrow(1, 0, kl)?;
        let v_c = v.narrow(1, 0, kl)?;
        let lse_c = query_chunk(&lse.unsqueeze(2)?, spec.groups, q0, n)?;
        let delta_c = query_chunk(&delta.unsqueeze(2)?, spec.groups, q0, n)?;
        let s = chunk_scores(&q_c, &k_c, spec, q0, n)?;
        let p = s.broadcast_sub(&lse_c)?.exp()?; // [Hkv, G·n, kl]
        let p_dt = p.to_dtype(dt)?;
        // dV += Pᵀ·dO   [Hkv, kl, d]
        let dv_c = p_dt.t()?.matmul(&do_c)?.to_dtype(acc)?;
        // dP = dO·Vᵀ; dS = P∘(dP − D)·scale
        let dp = do_c.matmul(&v_c.t()?)?.to_dtype(acc)?;
        let ds = (p * dp.broadcast_sub(&delta_c)?)?.affine(spec.scale, 0.0)?.to_dtype(dt)?;
        let dq_c = ds.matmul(&k_c)?; // [Hkv, G·n, d]
        let dk_c = ds.t()?.matmul(&q_c)?.to_dtype(acc)?; // [Hkv, kl, d]
        if kl == l {
            dk = (dk + dk_c)?;
            dv = (dv + dv_c)?;
        } else {
            dk = (dk + dk_c.pad_with_zeros(1, 0, l - kl)?)?;
            dv = (dv + dv_c.pad_with_zeros(1, 0, l - kl)?)?;
        }
        dqs.push(dq_c.reshape((hkv, spec.groups, n, d))?);
        q0 += n;
    }
    let dq = Tensor::cat(&dqs, 2)?.reshape((h, l, d))?;
    Ok((dq, dk.to_dtype(dt)?, dv.to_dtype(dt)?))
}

/// Causal-LM cross-entropy over rows of logits (already shifted: row r predicts `targets[r]`).
/// `logits` `[n, V]` in the accumulation dtype, `targets` u32 `[n]`. Returns `(loss, lse [n])`,
/// loss = mean NLL (HF `reduction="mean"` over the non-ignored labels), or with `weights` (acc
/// `[n]`) `Σ weight·NLL` (packed samples: each sample's rows weigh 1 / its label count).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let m = logits.max_keepdim(D::Minus1)?;
    let z = logits.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?;
    let lse = (m + z.log()?)?; // [n, 1]
    let tgt = logits.gather(&targets.unsqueeze(1)?, 1)?; // [n, 1]
    let nll = (lse.clone() - tgt)?;
    let loss = match weights {
        None => nll.mean_all()?,
        Some(w) => (nll.squeeze(1)? * w)?.sum_all()?,
    };
    Ok((loss, lse.squeeze(1)?))
}

/// ∂loss/∂logits for [`cross_entropy`]: `(softmax − onehot) / n`, or `· weight` per row, in the
/// logits' dtype.
pub fn cross_entropy_backward(
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let p = logits.broadcast_sub(&lse.unsqueeze(1)?)?.exp()?;
    let (p, minus) = match weights {
        None => {
            let inv_n = 1.0 / n as f64;
            (p.affine(inv_n, 0.0)?, Tensor::full(-inv_n, (n, 1), logits.device())?.to_dtype(logits.dtype())?)
        }
        Some(w) => {
            let w = w.to_dtype(logits.dtype())?.unsqueeze(1)?;
            (p.broadcast_mul(&w)?, w.neg()?)
        }
    };
    p.scatter_add(&targets.unsqueeze(1)?, &minus, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: plain (unchunked) attention with an explicit mask, in f64.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<Tensor> {
        let (h, l, d) = q.dims3()?;
        let mut outs = Vec::new();
        for hi in 0..h {
            let qh = q.get(hi)?;
            let kh = k.get(hi / spec.groups)?;
            let vh = v.get(hi / spec.groups)?;
            let mut s = (qh.matmul(&kh.t()?)? * spec.scale)?;
            if spec.causal.is_some() {
                let mask = CausalMask::new(1, l, DType::F64, q.device())?.chunk(0, l)?;
                s = (s + mask)?;
            }
            let p = candle_nn::ops::softmax_last_dim(&s)?;
            outs.push(p.matmul(&vh)?);
        }
        Tensor::stack(&outs, 0)?.reshape((h, l, d))
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn chunked_attention_matches_naive_and_gradients_match_fd() -> Result<()> {
        let dev = Device::Cpu;
        let (h, g, l, d) = (4, 2, 37, 8);
        let q = Tensor::randn(0f64, 1.0, (h, l, d), &dev)?;
        let k = Tensor::randn(0f64, 1.0, (h / g, l, d), &dev)?;
        let v = Tensor::randn(0f64, 1.0, (h / g, l, d), &dev)?;
        // A tiny chunk budget forces several query chunks.
        let mask = CausalMask { rows: 16, ..CausalMask::new(h, l, DType::F64, &dev)? };
        for causal in [true, false] {
            let spec = AttnSpec { groups: g, scale: 0.35, causal: causal.then_some(&mask), rows: 16 };
            let (o, lse) = attention_forward(&q, &k, &v, &spec)?;
            assert!(max_abs(&o, &naive(&q, &k, &v, &spec)?) < 1e-12);
            // Gradient of L = <o, w> by finite differences along a random direction.
            let w = Tensor::randn(0f64, 1.0, (h, l, d), &dev)?;
            let (dq, dk, dv) = attention_backward(&q, &k, &v, &o, &lse, &w, &spec)?;
            let dirs = [
                Tensor::randn(0f64, 1.0, q.shape(), &dev)?,
                Tensor::randn(0f64, 1.0, k.shape(), &dev)?,
                Tensor::randn(0f64, 1.0, v.shape(), &dev)?,
            ];
            let eps = 1e-6;
            let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
                let (o, _) = attention_forward(q, k, v, &spec).unwrap();
                (o * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
            };
            let analytic = [&dq, &dk, &dv]
                .iter()
                .zip(dirs.iter())
                .map(|(g, u)| (*g * u).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap())
                .collect::<Vec<_>>();
            let fd = [
                (loss(&(&q + (&dirs[0] * eps)?)?, &k, &v) - loss(&(&q - (&dirs[0] * eps)?)?, &k, &v)) / (2.0 * eps),
                (loss(&q, &(&k + (&dirs[1] * eps)?)?, &v) - loss(&q, &(&k - (&dirs[1] * eps)?)?, &v)) / (2.0 * eps),
                (loss(&q, &k, &(&v + (&dirs[2] * eps)?)?) - loss(&q, &k, &(&v - (&dirs[2] * eps)?)?)) / (2.0 * eps),
            ];
            for (a, f) in analytic.iter().zip(fd.iter()) {
                assert!((a - f).abs() <= 1e-6 * f.abs().max(1.0), "causal={causal}: {a} vs {f}");
            }
        }
        Ok(())
    }

    #[test]
    fn chunking_is_exercised() {
        // 4096 keys × 8 heads → 512 rows per chunk; a long sequence takes several chunks.
        assert_eq!(chunk_rows(8, 4096, 4096), 512);
        assert!(chunk_rows(2, 100, 100) >= 100);
    }

    fn fd_check(f: impl Fn(&Tensor) -> Tensor, b: impl Fn(&Tensor, &Tensor) -> Tensor, shape: (usize, usize)) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.5, shape, &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, f(&x).shape(), &dev).unwrap();
        let u = Tensor::randn(0f64, 1.0, shape, &dev).unwrap();
        let eps = 1e-6;
        let l = |x: &Tensor| (f(x) * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let fd = (l(&(&x + (&u * eps).unwrap()).unwrap()) - l(&(&x - (&u * eps).unwrap()).unwrap())) / (2.0 * eps);
        let an = (b(&x, &w) * &u).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!((fd - an).abs() <= 1e-6 * fd.abs().max(1.0), "{fd} vs {an}");
    }

    #[test]
    fn elementwise_and_norm_backwards_match_fd() {
        let dev = Device::Cpu;
        fd_check(|x| x.gelu().unwrap(), |x, dy| gelu_tanh_backward(x, dy).unwrap(), (5, 7));
        fd_check(|x| x.gelu_erf().unwrap(), |x, dy| gelu_erf_backward(x, dy).unwrap(), (5, 7));
        let u = Tensor::randn(0f64, 1.0, (5, 7), &dev).unwrap();
        fd_check(|x| swiglu(x, &u).unwrap(), |x, dy| swiglu_backward(x, &u, dy).unwrap().0, (5, 7));
        fd_check(|x| swiglu(&u, x).unwrap(), |x, dy| swiglu_backward(&u, x, dy).unwrap().1, (5, 7));
        let w = Tensor::randn(1f64, 0.1, 7, &dev).unwrap();
        let bias = Tensor::randn(0f64, 0.1, 7, &dev).unwrap();
        let rms = RmsNorm::new(w.clone(), 1e-6);
        fd_check(
            |x| rms.forward(x).unwrap().0,
            |x, dy| rms.backward(x, &rms.forward(x).unwrap().1, dy).unwrap(),
            (5, 7),
        );
        let ln = LayerNorm::new(w, bias, 1e-6);
        fd_check(|x| ln.forward(x).unwrap().0, |x, dy| ln.backward(x, &ln.forward(x).unwrap().1, dy).unwrap(), (5, 7));
        let t = Tensor::new(&[3u32, 0, 6, 6, 1], &dev).unwrap();
        fd_check(
            |x| cross_entropy(x, &t, None).unwrap().0.reshape(1).unwrap(),
            |x, dy| {
                let (_, lse) = cross_entropy(x, &t, None).unwrap();
                cross_entropy_backward(x, &lse, &t, None).unwrap().broadcast_mul(dy).unwrap()
            },
            (5, 7),
        );
        // Packed samples: rows weighted 1/2, 1/2, 1/3, 1/3, 1/3 (two samples' mean losses).
        let wt = Tensor::new(&[0.5f64, 0.5, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0], &dev).unwrap();
        fd_check(
            |x| cross_entropy(x, &t, Some(&wt)).unwrap().0.reshape(1).unwrap(),
            |x, dy| {
                let (_, lse) = cross_entropy(x, &t, Some(&wt)).unwrap();
                cross_entropy_backward(x, &lse, &t, Some(&wt)).unwrap().broadcast_mul(dy).unwrap()
            },
            (5, 7),
        );
        let x = Tensor::randn(0f64, 1.5, (5, 7), &dev).unwrap();
        let mean_of = |rows: std::ops::Range<usize>| {
            let n = rows.len();
            let t = t.narrow(0, rows.start, n).unwrap();
            cross_entropy(&x.narrow(0, rows.start, n).unwrap(), &t, None).unwrap().0.to_scalar::<f64>().unwrap()
        };
        let packed = cross_entropy(&x, &t, Some(&wt)).unwrap().0.to_scalar::<f64>().unwrap();
        assert!((packed - (mean_of(0..2) + mean_of(2..5))).abs() < 1e-12);
    }
}
