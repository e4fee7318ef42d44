//! Fused rotary embeddings: the text q/k (per-head RMSNorm + interleaved MRoPE) and the vision
//! qkv (split + 2-D rotary), each into the head-major layout attention reads, and backward.

use super::*;

// ---------------------------------------------------------------------------------------------
// Text q/k: per-head RMSNorm + interleaved MRoPE + head-major layout

fn check_qk(op: &str, x: &Tensor, w: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<(usize, usize)> {
    let (l, hd) = x.dims2()?;
    if heads == 0 || hd % heads != 0 {
        bail!("{op}: {hd} columns are not {heads} heads")
    }
    let d = hd / heads;
    if d % 2 != 0 || w.dims() != [d] || cos.dims() != [l, d / 2] || sin.dims() != [l, d / 2] {
        bail!("{op}: head dim {d}, weight {:?}, cos {:?}, sin {:?} for {l} rows", w.dims(), cos.dims(), sin.dims())
    }
    same_dtype(op, x, w)?;
    same_dtype(op, x, cos)?;
    same_dtype(op, x, sin)?;
    Ok((l, d))
}

/// Text attention's q (or k) path: `x` `[L, H·d]` → per-head RMSNorm (weight `w` `[d]`) → rotary
/// with cos/sin `[L, d/2]` (model dtype, HF's `q·cos + rotate_half(q)·sin` with every product and
/// sum in the model dtype) → `[H, L, d]`. Returns `(rotated, rstd [L·H, 1])`.
pub fn qk_norm_rope(
    x: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    check_qk("qk_norm_rope", x, w, cos, sin, heads)?;
    if !fusable(x) {
        return qk_norm_rope_chain(x, w, cos, sin, heads, eps);
    }
    on_cuda!(x, fused_cuda::qk_norm_rope(x, w, cos, sin, heads, eps));
    cpu_dtype!(x.dtype(), "qk_norm_rope", qk_norm_rope_cpu(x, w, cos, sin, heads, eps))
}

fn qk_norm_rope_cpu<T: Elem>(
    x: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (l, hd) = x.dims2()?;
    let (h, d) = (heads, hd / heads);
    let half = d / 2;
    let xv: Vec<T> = host(x)?;
    let wv: Vec<T> = host(w)?;
    let cv: Vec<T> = host(cos)?;
    let sv: Vec<T> = host(sin)?;
    let eps = T::R::c(eps);
    let n = T::R::c(d as f64);
    let mut out = vec![T::from_f64(0.0); h * l * d];
    let mut rstd = vec![T::R::ZERO; l * h];
    // Output rows are head-major: chunk `hi·L + li` of `out`.
    let rs_of = |r: usize| -> T::R {
        let mut ss = Sum::default();
        for &v in &xv[r * d..(r + 1) * d] {
            ss.add(v.get() * v.get());
        }
        T::R::ONE / (ss.get() / n + eps).sqrt()
    };
    for (r, rs) in rstd.iter_mut().enumerate() {
        *rs = rs_of(r);
    }
    rows1(&mut out, d, |o_row, o| {
        let (hi, li) = (o_row / l, o_row % l);
        let r = li * h + hi;
        let rs = rstd[r];
        let xr = &xv[r * d..(r + 1) * d];
        let xn = |c: usize| rnd::<T>(rnd::<T>(xr[c].get() * rs) * wv[c].get());
        for c in 0..half {
            let (x1, x2) = (xn(c), xn(c + half));
            let (co, si) = (cv[li * half + c].get(), sv[li * half + c].get());
            o[c] = T::put(rnd::<T>(x1 * co) - rnd::<T>(x2 * si));
            o[c + half] = T::put(rnd::<T>(x1 * si) + rnd::<T>(x2 * co));
        }
    });
    Ok((cpu(out, (h, l, d))?, cpu(rstd, (l * h, 1))?))
}

/// The op chain of [`qk_norm_rope`] (the decoder layer's former steps 2).
pub fn qk_norm_rope_chain(
    x: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (l, hd) = x.dims2()?;
    let d = hd / heads;
    let (xn, rstd) = ops::RmsNorm::new(w.clone(), eps).forward_chain(&x.reshape((l * heads, d))?)?;
    let rot = candle_nn::rotary_emb::rope_thd(&xn.reshape((1, l, heads, d))?, cos, sin)?;
    Ok((rot.reshape((l, heads, d))?.transpose(0, 1)?.contiguous()?, rstd))
}

/// Backward of [`qk_norm_rope`]: `g` `[H, L, d]` (gradient of the rotated output), the forward's
/// input `x` `[L, H·d]` and `rstd` → `dx` `[L, H·d]`.
pub fn qk_norm_rope_backward(
    g: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let heads = g.dim(0)?;
    let (l, d) = check_qk("qk_norm_rope_backward", x, w, cos, sin, heads)?;
    same_dtype("qk_norm_rope_backward", x, g)?;
    if g.dims() != [heads, l, d] || rstd.elem_count() != l * heads || rstd.dtype() != acc_dtype(x.dtype()) {
        bail!("qk_norm_rope_backward: g {:?}, rstd {:?} {:?} for x {:?}", g.dims(), rstd.dims(), rstd.dtype(), x.dims())
    }
    if !fusable(x) {
        return qk_norm_rope_backward_chain(g, x, rstd, w, cos, sin);
    }
    on_cuda!(x, fused_cuda::qk_norm_rope_backward(g, x, rstd, w, cos, sin));
    cpu_dtype!(x.dtype(), "qk_norm_rope_backward", qk_norm_rope_backward_cpu(g, x, rstd, w, cos, sin))
}

fn qk_norm_rope_backward_cpu<T: Elem>(
    g: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (h, l, d) = g.dims3()?;
    let half = d / 2;
    let gv: Vec<T> = host(g)?;
    let xv: Vec<T> = host(x)?;
    let rsv: Vec<T::R> = host(rstd)?;
    let wv: Vec<T> = host(w)?;
    let cv: Vec<T> = host(cos)?;
    let sv: Vec<T> = host(sin)?;
    let n = T::R::c(d as f64);
    let mut dx = vec![T::from_f64(0.0); l * h * d];
    rows1(&mut dx, d, |r, o| {
        let (li, hi) = (r / h, r % h);
        let gr = &gv[(hi * l + li) * d..(hi * l + li + 1) * d];
        let xr = &xv[r * d..(r + 1) * d];
        let rs = rsv[r];
        // Inverse rotation (rope with −sin), rounded like the rope op.
        let mut u = vec![T::R::ZERO; d];
        for c in 0..half {
            let (co, si) = (cv[li * half + c].get(), sv[li * half + c].get());
            let (g1, g2) = (gr[c].get(), gr[c + half].get());
            u[c] = rnd::<T>(rnd::<T>(g1 * co) + rnd::<T>(g2 * si));
            u[c + half] = rnd::<T>(rnd::<T>(g2 * co) - rnd::<T>(g1 * si));
        }
        let mut acc = Sum::default();
        for c in 0..d {
            acc.add(u[c] * wv[c].get() * (xr[c].get() * rs));
        }
        let m = acc.get() / n;
        for c in 0..d {
            o[c] = T::put((u[c] * wv[c].get() - xr[c].get() * rs * m) * rs);
        }
    });
    cpu(dx, (l, h * d))
}

pub fn qk_norm_rope_backward_chain(
    g: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (h, l, d) = g.dims3()?;
    let un = candle_nn::rotary_emb::rope(&g.reshape((1, h, l, d))?, cos, &sin.neg()?)?
        .reshape((h, l, d))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((l * h, d))?;
    ops::RmsNorm::new(w.clone(), 0.0).backward_chain(&x.reshape((l * h, d))?, rstd, &un)?.reshape((l, h * d))
}

// ---------------------------------------------------------------------------------------------
// Vision qkv: split + 2-D rotary in the accumulation dtype + head-major layout

fn check_vqkv(op: &str, dt: DType, n: usize, d: usize, cos: &Tensor, sin: &Tensor) -> Result<()> {
    if d % 2 != 0 || cos.dims() != [n, d / 2] || sin.dims() != [n, d / 2] {
        bail!("{op}: head dim {d}, cos {:?}, sin {:?} for {n} rows", cos.dims(), sin.dims())
    }
    let acc = acc_dtype(dt);
    if cos.dtype() != acc || sin.dtype() != acc {
        bail!("{op}: cos/sin must be {acc:?}")
    }
    Ok(())
}

/// Vision attention's input: `qkv` `[N, 3·H·d]` → `[3, H, N, d]` with q and k rotated in the
/// accumulation dtype (cos/sin `[N, d/2]` acc; HF rotates vision q/k in f32) and rounded once.
pub fn vision_qkv_rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, c3) = qkv.dims2()?;
    if heads == 0 || c3 % (3 * heads) != 0 {
        bail!("vision_qkv_rope: {c3} columns are not 3 × {heads} heads")
    }
    let d = c3 / (3 * heads);
    check_vqkv("vision_qkv_rope", qkv.dtype(), n, d, cos, sin)?;
    if !fusable(qkv) {
        return vision_qkv_rope_chain(qkv, cos, sin, heads);
    }
    on_cuda!(qkv, fused_cuda::vision_qkv_rope(qkv, cos, sin, heads));
    cpu_dtype!(qkv.dtype(), "vision_qkv_rope", vision_qkv_rope_cpu(qkv, cos, sin, heads))
}

fn vision_qkv_rope_cpu<T: Elem>(qkv: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, c3) = qkv.dims2()?;
    let (h, d) = (heads, c3 / (3 * heads));
    let half = d / 2;
    let xv: Vec<T> = host(qkv)?;
    let cv: Vec<T::R> = host(cos)?;
    let sv: Vec<T::R> = host(sin)?;
    let mut out = vec![T::from_f64(0.0); 3 * h * n * d];
    // Output row (which, hi, ni) ← input row (ni, which, hi).
    rows1(&mut out, d, |o_row, o| {
        let (which, hi, ni) = (o_row / (h * n), (o_row / n) % h, o_row % n);
        let src = &xv[((ni * 3 + which) * h + hi) * d..((ni * 3 + which) * h + hi + 1) * d];
        if which == 2 {
            o.copy_from_slice(src);
            return;
        }
        for c in 0..half {
            let (co, si) = (cv[ni * half + c], sv[ni * half + c]);
            let (x1, x2) = (src[c].get(), src[c + half].get());
            o[c] = T::put(x1 * co - x2 * si);
            o[c + half] = T::put(x1 * si + x2 * co);
        }
    });
    cpu(out, (3, h, n, d))
}

/// The op chain of [`vision_qkv_rope`] (the vision block's former rotation).
pub fn vision_qkv_rope_chain(qkv: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, c3) = qkv.dims2()?;
    let (h, d) = (heads, c3 / (3 * heads));
    let dt = qkv.dtype();
    let qkv4 = qkv.reshape((n, 3, h, d))?;
    let rotate = |i: usize| -> Result<Tensor> {
        let t = qkv4.narrow(1, i, 1)?.to_dtype(acc_dtype(dt))?.contiguous()?.reshape((1, n, h, d))?;
        candle_nn::rotary_emb::rope_thd(&t, cos, sin)?.to_dtype(dt)?.reshape((n, h, d))?.transpose(0, 1)?.contiguous()
    };
    let v = qkv4.narrow(1, 2, 1)?.reshape((n, h, d))?.transpose(0, 1)?.contiguous()?;
    Tensor::stack(&[rotate(0)?, rotate(1)?, v], 0)
}

/// Backward of [`vision_qkv_rope`]: `dq`, `dk`, `dv` `[H, N, d]` → `dqkv` `[N, 3·H·d]` (dq, dk
/// rotated back in the accumulation dtype).
pub fn vision_qkv_rope_backward(dq: &Tensor, dk: &Tensor, dv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, n, d) = dq.dims3()?;
    same_shape("vision_qkv_rope_backward", dq, dk)?;
    same_shape("vision_qkv_rope_backward", dq, dv)?;
    check_vqkv("vision_qkv_rope_backward", dq.dtype(), n, d, cos, sin)?;
    if !fusable(dq) {
        return vision_qkv_rope_backward_chain(dq, dk, dv, cos, sin);
    }
    on_cuda!(dq, fused_cuda::vision_qkv_rope_backward(dq, dk, dv, cos, sin));
    cpu_dtype!(dq.dtype(), "vision_qkv_rope_backward", vision_qkv_rope_backward_cpu(dq, dk, dv, cos, sin))
}

fn vision_qkv_rope_backward_cpu<T: Elem>(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (h, n, d) = dq.dims3()?;
    let half = d / 2;
    let srcs: [Vec<T>; 3] = [host(dq)?, host(dk)?, host(dv)?];
    let cv: Vec<T::R> = host(cos)?;
    let sv: Vec<T::R> = host(sin)?;
    let mut out = vec![T::from_f64(0.0); n * 3 * h * d];
    // Output row (ni, which, hi) ← row (hi, ni) of source `which`.
    rows1(&mut out, d, |o_row, o| {
        let (ni, which, hi) = (o_row / (3 * h), (o_row / h) % 3, o_row % h);
        let src = &srcs[which][(hi * n + ni) * d..(hi * n + ni + 1) * d];
        if which == 2 {
            o.copy_from_slice(src);
            return;
        }
        for c in 0..half {
            let (co, si) = (cv[ni * half + c], sv[ni * half + c]);
            let (g1, g2) = (src[c].get(), src[c + half].get());
            o[c] = T::put(g1 * co + g2 * si);
            o[c + half] = T::put(g2 * co - g1 * si);
        }
    });
    cpu(out, (n, 3 * h * d))
}

pub fn vision_qkv_rope_backward_chain(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (h, n, d) = dq.dims3()?;
    let dt = dq.dtype();
    let neg_sin = sin.neg()?;
    let unrotate = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(acc_dtype(dt))?.reshape((1, h, n, d))?;
        candle_nn::rotary_emb::rope(&t, cos, &neg_sin)?.to_dtype(dt)?.reshape((h, n, d))?.transpose(0, 1)
    };
    Tensor::stack(&[unrotate(dq)?, unrotate(dk)?, dv.transpose(0, 1)?], 1)?.reshape((n, 3 * h * d))
}
