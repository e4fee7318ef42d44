//! Fused attention: the score softmax with its log-sum-exp, its backward, and attention forward
//! and backward chunked over query rows around them (the matmuls in candle).

use super::*;
use crate::model::linear::matmul;

// ---------------------------------------------------------------------------------------------
// Attention softmax

/// Which query a row of a `[B, R, K]` score block belongs to: `R = G·n` rows per batch, flat row
/// `r` is query head `r / n` and query `r mod n` at absolute position `q0 + r mod n`; causal rows
/// see keys `j ≤ q0 + r mod n` (the mask is implied, never materialized).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreRows {
    pub n: usize,
    pub q0: usize,
    pub causal: bool,
}

impl ScoreRows {
    #[cfg(feature = "cuda")]
    fn for_kernel(self) -> fused_cuda::MaskRows {
        fused_cuda::MaskRows { n: self.n, q0: self.q0, causal: self.causal }
    }

    /// Keys visible to flat row `r` of `k`.
    #[inline]
    fn visible(&self, r: usize, k: usize) -> usize {
        if self.causal {
            k.min(self.q0 + r % self.n + 1)
        } else {
            k
        }
    }

    fn check(&self, op: &str, s: &Tensor) -> Result<(usize, usize, usize)> {
        let (b, r, k) = s.dims3()?;
        if self.n == 0 || r % self.n != 0 {
            bail!("{op}: {r} rows per batch are not a multiple of n = {}", self.n)
        }
        if self.causal && self.q0 + self.n > k {
            bail!("{op}: causal rows up to position {} need at least that many keys, got {k}", self.q0 + self.n)
        }
        if b * r > i32::MAX as usize || k > i32::MAX as usize || s.elem_count() > isize::MAX as usize {
            bail!("{op}: too large {:?}", s.dims())
        }
        Ok((b, r, k))
    }

    /// The additive 0 / −∞ mask `[n, k]` of the op chain (acc dtype).
    fn mask(&self, k: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut m = vec![0f32; self.n * k];
        for i in 0..self.n {
            for v in &mut m[i * k + (self.q0 + i + 1).min(k)..(i + 1) * k] {
                *v = f32::NEG_INFINITY;
            }
        }
        Tensor::from_vec(m, (self.n, k), device)?.to_dtype(dtype)
    }
}

/// Softmax of raw scores `s` `[B, R, K]` (any float dtype, e.g. the model-dtype output of `Q·Kᵀ`)
/// scaled by `scale`, masked per `rows`: returns `P` `[B, R, K]` in `s`'s dtype and the log-sum-exp
/// `[B·R]` in the accumulation dtype. Masked entries of `P` are 0.
pub fn softmax_lse(s: &Tensor, scale: f64, rows: ScoreRows) -> Result<(Tensor, Tensor)> {
    rows.check("softmax_lse", s)?;
    if !fusable(s) {
        return softmax_lse_chain(s, scale, rows);
    }
    on_cuda!(s, fused_cuda::softmax_lse(s, scale, rows.for_kernel()));
    cpu_dtype!(s.dtype(), "softmax_lse", softmax_lse_cpu(s, scale, rows))
}

fn softmax_lse_cpu<T: Elem>(s: &Tensor, scale: f64, rows: ScoreRows) -> Result<(Tensor, Tensor)> {
    let (b, r, k) = s.dims3()?;
    let sv: Vec<T> = host(s)?;
    let scale = T::R::c(scale);
    let mut p = vec![T::from_f64(0.0); b * r * k];
    let mut lse = vec![T::R::ZERO; b * r];
    rows_stat(&mut p, k, &mut lse, |row, pr, l| {
        let x = &sv[row * k..(row + 1) * k];
        let kv = rows.visible(row, k);
        let mut m = T::R::NEG_INF;
        for &v in &x[..kv] {
            m = m.max(v.get() * scale);
        }
        let mut z = Sum::default();
        for &v in &x[..kv] {
            z.add((v.get() * scale - m).exp());
        }
        let z: T::R = z.get();
        for (o, &v) in pr[..kv].iter_mut().zip(&x[..kv]) {
            *o = T::put((v.get() * scale - m).exp() / z);
        }
        *l = m + z.ln();
    });
    Ok((cpu(p, (b, r, k))?, cpu(lse, b * r)?))
}

/// The op chain [`softmax_lse`] replaces (`ops::attention_forward`'s steps 1–2).
pub fn softmax_lse_chain(s: &Tensor, scale: f64, rows: ScoreRows) -> Result<(Tensor, Tensor)> {
    let (b, r, k) = rows.check("softmax_lse", s)?;
    let acc = acc_dtype(s.dtype());
    let mut x = s.to_dtype(acc)?.affine(scale, 0.0)?;
    if rows.causal {
        let mask = rows.mask(k, acc, s.device())?;
        x = x.reshape((b, r / rows.n, rows.n, k))?.broadcast_add(&mask)?.reshape((b, r, k))?;
    }
    let m = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    let z = e.sum_keepdim(D::Minus1)?;
    let p = e.broadcast_div(&z)?;
    let lse = (m + z.log()?)?;
    Ok((p.to_dtype(s.dtype())?, lse.flatten_all()?))
}

/// Checks a `[heads, ≥ q0+n]` statistic view (lse, delta) against the score rows.
fn check_stat(op: &str, t: &Tensor, heads: usize, rows: ScoreRows) -> Result<()> {
    let (h, l) = t.dims2()?;
    if h != heads || l < rows.q0 + rows.n {
        bail!(
            "{op}: statistic of shape {:?} does not cover {heads} heads × rows {}..{}",
            t.dims(),
            rows.q0,
            rows.q0 + rows.n
        )
    }
    Ok(())
}

/// Attention backward core for one block of score rows: from the raw scores `s`, `dP = dO·Vᵀ`
/// (both `[B, R, K]`, same dtype), the forward's log-sum-exp and `delta = rowsum(dO∘O)` given as
/// `[B·R/n, L]` per-head views (acc dtype; this block reads columns `q0..q0+n`), computes
/// `P = exp(scale·S − lse)` and `dS = P∘(dP − delta)·scale`, both in `s`'s dtype (masked: 0).
pub fn softmax_backward(
    s: &Tensor,
    dp: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    scale: f64,
    rows: ScoreRows,
) -> Result<(Tensor, Tensor)> {
    let (b, r, _) = rows.check("softmax_backward", s)?;
    same_shape("softmax_backward", s, dp)?;
    check_stat("softmax_backward", lse, b * r / rows.n, rows)?;
    check_stat("softmax_backward", delta, b * r / rows.n, rows)?;
    if lse.dtype() != acc_dtype(s.dtype()) || delta.dtype() != lse.dtype() {
        bail!("softmax_backward: lse/delta must be {:?}", acc_dtype(s.dtype()))
    }
    if !fusable(s) {
        return softmax_backward_chain(s, dp, lse, delta, scale, rows);
    }
    on_cuda!(s, fused_cuda::softmax_backward(s, dp, lse, delta, scale, rows.for_kernel()));
    cpu_dtype!(s.dtype(), "softmax_backward", softmax_backward_cpu(s, dp, lse, delta, scale, rows))
}

fn softmax_backward_cpu<T: Elem>(
    s: &Tensor,
    dp: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    scale: f64,
    rows: ScoreRows,
) -> Result<(Tensor, Tensor)> {
    let (b, r, k) = s.dims3()?;
    let sv: Vec<T> = host(s)?;
    let dpv: Vec<T> = host(dp)?;
    let ld = lse.dim(1)?;
    let lv: Vec<T::R> = host(lse)?;
    let dv: Vec<T::R> = host(delta)?;
    let scale = T::R::c(scale);
    let mut p = vec![T::from_f64(0.0); b * r * k];
    let mut ds = vec![T::from_f64(0.0); b * r * k];
    rows2(&mut p, &mut ds, k, |row, pr, dsr| {
        let at = (row / rows.n) * ld + rows.q0 + row % rows.n;
        let (l, dl) = (lv[at], dv[at]);
        let kv = rows.visible(row, k);
        for j in 0..kv {
            let pj = (sv[row * k + j].get() * scale - l).exp();
            pr[j] = T::put(pj);
            dsr[j] = T::put(pj * (dpv[row * k + j].get() - dl) * scale);
        }
    });
    Ok((cpu(p, (b, r, k))?, cpu(ds, (b, r, k))?))
}

/// The op chain [`softmax_backward`] replaces (`ops::attention_backward`'s elementwise steps).
pub fn softmax_backward_chain(
    s: &Tensor,
    dp: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    scale: f64,
    rows: ScoreRows,
) -> Result<(Tensor, Tensor)> {
    let (b, r, k) = rows.check("softmax_backward", s)?;
    let dt = s.dtype();
    let acc = acc_dtype(dt);
    let col = |t: &Tensor| t.narrow(1, rows.q0, rows.n)?.reshape((b, r, 1));
    let mut x = s.to_dtype(acc)?.affine(scale, 0.0)?;
    if rows.causal {
        let mask = rows.mask(k, acc, s.device())?;
        x = x.reshape((b, r / rows.n, rows.n, k))?.broadcast_add(&mask)?.reshape((b, r, k))?;
    }
    let p = x.broadcast_sub(&col(lse)?)?.exp()?;
    let ds = (&p * dp.to_dtype(acc)?.broadcast_sub(&col(delta)?)?)?.affine(scale, 0.0)?.to_dtype(dt)?;
    Ok((p.to_dtype(dt)?, ds))
}

/// `delta[h, l] = Σ_c a[h, l, c]·b[h, l, c]` over `[H, L, d]` tensors (strided views allowed; the
/// CUDA path needs unit stride in `c`), in the accumulation dtype: the attention backward's
/// `rowsum(dO∘O)`.
pub fn row_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.dims3()?;
    same_shape("row_dot", a, b)?;
    if !fusable(a) {
        return row_dot_chain(a, b);
    }
    on_cuda!(a, fused_cuda::row_dot(a, b));
    cpu_dtype!(a.dtype(), "row_dot", row_dot_cpu(a, b))
}

fn row_dot_cpu<T: Elem>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (h, l, d) = a.dims3()?;
    let av: Vec<T> = host(a)?;
    let bv: Vec<T> = host(b)?;
    let out: Vec<T::R> = (0..h * l)
        .map(|r| {
            let mut acc = Sum::default();
            for c in 0..d {
                acc.add(av[r * d + c].get() * bv[r * d + c].get());
            }
            acc.get()
        })
        .collect();
    cpu(out, (h, l))
}

pub fn row_dot_chain(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let acc = acc_dtype(a.dtype());
    (a.to_dtype(acc)? * b.to_dtype(acc)?)?.sum(D::Minus1)
}

/// The attention backward's inputs from o_proj's: `dattn` and `attn` `[L, H·d]` (token-major) →
/// `(dO [H, L, d], delta [H, L] acc)` with `delta = rowsum(dO∘O)`, one pass.
pub fn attention_bwd_prep(dattn: &Tensor, attn: &Tensor, heads: usize) -> Result<(Tensor, Tensor)> {
    let (_, hd) = dattn.dims2()?;
    same_shape("attention_bwd_prep", dattn, attn)?;
    if heads == 0 || hd % heads != 0 {
        bail!("attention_bwd_prep: {hd} columns are not {heads} heads")
    }
    if !fusable(dattn) {
        return attention_bwd_prep_chain(dattn, attn, heads);
    }
    on_cuda!(dattn, fused_cuda::attention_bwd_prep(dattn, attn, heads));
    cpu_dtype!(dattn.dtype(), "attention_bwd_prep", attention_bwd_prep_cpu(dattn, attn, heads))
}

fn attention_bwd_prep_cpu<T: Elem>(dattn: &Tensor, attn: &Tensor, heads: usize) -> Result<(Tensor, Tensor)> {
    let (l, hd) = dattn.dims2()?;
    let (h, d) = (heads, hd / heads);
    let gv: Vec<T> = host(dattn)?;
    let ov: Vec<T> = host(attn)?;
    let mut out = vec![T::from_f64(0.0); l * hd];
    let mut delta = vec![T::R::ZERO; h * l];
    // Output row (hi, li) ← input row (li, hi).
    rows_stat(&mut out, d, &mut delta, |o_row, o, dl| {
        let r = (o_row % l) * h + o_row / l;
        let (g, x) = (&gv[r * d..(r + 1) * d], &ov[r * d..(r + 1) * d]);
        o.copy_from_slice(g);
        let mut acc = Sum::default();
        for c in 0..d {
            acc.add(g[c].get() * x[c].get());
        }
        *dl = acc.get();
    });
    Ok((cpu(out, (h, l, d))?, cpu(delta, (h, l))?))
}

pub fn attention_bwd_prep_chain(dattn: &Tensor, attn: &Tensor, heads: usize) -> Result<(Tensor, Tensor)> {
    let (l, hd) = dattn.dims2()?;
    let to_hld = |t: &Tensor| t.reshape((l, heads, hd / heads))?.transpose(0, 1);
    let do_ = to_hld(dattn)?.contiguous()?;
    let delta = row_dot_chain(&do_, &to_hld(attn)?)?;
    Ok((do_, delta))
}

// ---------------------------------------------------------------------------------------------
// Attention around the fused softmax (chunked over query rows as `ops::attention_forward`)

/// Rows `[q0, q0+n)` of `[H, L, d]` as `[Hkv, G·n, d]`.
fn query_chunk(q: &Tensor, groups: usize, q0: usize, n: usize) -> Result<Tensor> {
    let (h, l, d) = q.dims3()?;
    if q0 == 0 && n == l {
        return q.contiguous()?.reshape((h / groups, groups * n, d));
    }
    q.reshape((h / groups, groups, l, d))?.narrow(2, q0, n)?.contiguous()?.reshape((h / groups, groups * n, d))
}

fn check_attn(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<()> {
    let (h, l, d) = q.dims3()?;
    let (hkv, lk, dk) = k.dims3()?;
    if spec.groups == 0 || h != hkv * spec.groups || lk != l || dk != d || k.dims() != v.dims() {
        bail!("attention: q {:?}, k {:?}, v {:?} with {} groups", q.dims(), k.dims(), v.dims(), spec.groups)
    }
    same_dtype("attention", q, k)?;
    same_dtype("attention", q, v)
}

/// Softmax attention forward (same contract as [`ops::attention_forward`]): `(o [H, L, d],
/// lse [H, L] acc)`, per query chunk `S = Q·Kᵀ` (matmul) → [`softmax_lse`] → `P·V` (matmul).
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttnSpec) -> Result<(Tensor, Tensor)> {
    check_attn(q, k, v, spec)?;
    if !fusable(q) {
        return ops::attention_forward(q, k, v, spec);
    }
    let (h, l, d) = q.dims3()?;
    let (g, hkv) = (spec.groups, h / spec.groups);
    let causal = spec.causal.is_some();
    let rows = spec.rows.max(1);
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let mut q0 = 0;
    while q0 < l {
        let n = rows.min(l - q0);
        let kl = if causal { q0 + n } else { l };
        let q_c = query_chunk(q, g, q0, n)?;
        let s = q_c.matmul(&k.narrow(1, 0, kl)?.t()?)?; // [Hkv, G·n, kl]
        let (p, lse) = softmax_lse(&s, spec.scale, ScoreRows { n, q0, causal })?;
        let o = matmul(&p, &v.narrow(1, 0, kl)?)?; // [Hkv, G·n, d]
        if n == l {
            return Ok((o.reshape((h, l, d))?, lse.reshape((h, l))?));
        }
        outs.push(o.reshape((hkv, g, n, d))?);
        lses.push(lse.reshape((hkv, g, n))?);
        q0 += n;
    }
    Ok((Tensor::cat(&outs, 2)?.reshape((h, l, d))?, Tensor::cat(&lses, 2)?.reshape((h, l))?))
}

/// Softmax attention backward from `do_` `[H, L, d]`, the forward's `lse` and
/// `delta = `[`row_dot`]`(do_, o)` (both `[H, L]` acc, views allowed): `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    do_: &Tensor,
    spec: &AttnSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_attn(q, k, v, spec)?;
    if do_.dims() != q.dims() {
        bail!("attention_backward: do {:?} vs q {:?}", do_.dims(), q.dims())
    }
    if !fusable(q) {
        return ops::attention_backward_delta(q, k, v, lse, delta, do_, spec);
    }
    let (h, l, d) = q.dims3()?;
    let (g, hkv) = (spec.groups, h / spec.groups);
    let dt = q.dtype();
    let acc = acc_dtype(dt);
    let causal = spec.causal.is_some();
    let rows = spec.rows.max(1);
    let mut dqs = Vec::new();
    let mut dk: Option<Tensor> = None;
    let mut dv: Option<Tensor> = None;
    let mut q0 = 0;
    while q0 < l {
        let n = rows.min(l - q0);
        let kl = if causal { q0 + n } else { l };
        let q_c = query_chunk(q, g, q0, n)?;
        let do_c = query_chunk(do_, g, q0, n)?;
        let k_c = k.narrow(1, 0, kl)?;
        let v_c = v.narrow(1, 0, kl)?;
        let s = q_c.matmul(&k_c.t()?)?; // [Hkv, G·n, kl]
        let dp = do_c.matmul(&v_c.t()?)?;
        let (p, ds) = softmax_backward(&s, &dp, lse, delta, spec.scale, ScoreRows { n, q0, causal })?;
        let dv_c = p.t()?.matmul(&do_c)?; // [Hkv, kl, d]
        let dq_c = ds.matmul(&k_c)?; // [Hkv, G·n, d]
        let dk_c = ds.t()?.matmul(&q_c)?; // [Hkv, kl, d]
        if n == l {
            return Ok((dq_c.reshape((h, l, d))?, dk_c, dv_c));
        }
        // Several chunks: dk/dv summed over chunks in the accumulation dtype.
        let pad = |t: Tensor| -> Result<Tensor> {
            let t = t.to_dtype(acc)?;
            if kl == l {
                Ok(t)
            } else {
                t.pad_with_zeros(1, 0, l - kl)
            }
        };
        let (dk_c, dv_c) = (pad(dk_c)?, pad(dv_c)?);
        dk = Some(match dk {
            None => dk_c,
            Some(a) => (a + dk_c)?,
        });
        dv = Some(match dv {
            None => dv_c,
            Some(a) => (a + dv_c)?,
        });
        dqs.push(dq_c.reshape((hkv, g, n, d))?);
        q0 += n;
    }
    let (Some(dk), Some(dv)) = (dk, dv) else { bail!("attention_backward: empty sequence") };
    let dq = Tensor::cat(&dqs, 2)?.reshape((h, l, d))?;
    Ok((dq, dk.to_dtype(dt)?, dv.to_dtype(dt)?))
}

// ---------------------------------------------------------------------------------------------
// Segments: several sequences side by side (an image's frames, packed samples)

/// Rows `[start, start+len)` of a `[H, L, ·]` or `[H, L]` tensor (the tensor itself when that is all
/// of it).
fn segment(t: &Tensor, (start, len): (usize, usize)) -> Result<Tensor> {
    if start == 0 && len == t.dim(1)? {
        Ok(t.clone())
    } else {
        t.narrow(1, start, len)?.contiguous()
    }
}

/// Concatenates per-segment results along the rows (dim 1).
fn join(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        Ok(parts.swap_remove(0))
    } else {
        Tensor::cat(&parts, 1)
    }
}

/// [`attention_forward`] of each segment `(start, len)` of the rows on its own, no row attending
/// outside its segment; `spec(len)` gives a segment's geometry. `(o [H, L, d], lse [H, L])`.
pub fn segmented_attention_forward<'a>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
    spec: impl Fn(usize) -> AttnSpec<'a>,
) -> Result<(Tensor, Tensor)> {
    let (mut os, mut lses) = (Vec::with_capacity(segments.len()), Vec::with_capacity(segments.len()));
    for &seg in segments {
        let (o, lse) = attention_forward(&segment(q, seg)?, &segment(k, seg)?, &segment(v, seg)?, &spec(seg.1))?;
        os.push(o);
        lses.push(lse);
    }
    Ok((join(os)?, join(lses)?))
}

/// [`attention_backward`] of each segment, as [`segmented_attention_forward`] ran them:
/// `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn segmented_attention_backward<'a>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    do_: &Tensor,
    segments: &[(usize, usize)],
    spec: impl Fn(usize) -> AttnSpec<'a>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
    for &seg in segments {
        let (dq, dk, dv) = attention_backward(
            &segment(q, seg)?,
            &segment(k, seg)?,
            &segment(v, seg)?,
            &lse.narrow(1, seg.0, seg.1)?,
            &delta.narrow(1, seg.0, seg.1)?,
            &segment(do_, seg)?,
            &spec(seg.1),
        )?;
        dqs.push(dq);
        dks.push(dk);
        dvs.push(dv);
    }
    Ok((join(dqs)?, join(dks)?, join(dvs)?))
}
