//! Fused RMSNorm and LayerNorm (residual add folded in), forward and backward, and the passes
//! the model runs through `ops::RmsNorm` / `ops::LayerNorm`.

use super::*;

// ---------------------------------------------------------------------------------------------
// Norms

/// Fused RMSNorm over the last dim (HF `Qwen3VLTextRMSNorm`): with `res`, normalizes
/// `h = x + res` (rounded to the dtype, the residual add of the chain) and returns it too.
/// Returns `(y, rstd [.., 1] acc, h)`.
pub fn rms_norm(x: &Tensor, res: Option<&Tensor>, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (_, dd) = rows_cols(x)?;
    if w.dims() != [dd] {
        bail!("rms_norm: weight {:?} for rows of {dd}", w.dims())
    }
    same_dtype("rms_norm", x, w)?;
    if let Some(r) = res {
        same_shape("rms_norm", x, r)?;
    }
    if !fusable(x) {
        return rms_norm_chain(x, res, w, eps);
    }
    on_cuda!(x, fused_cuda::rms_norm(x, res, w, eps));
    cpu_dtype!(x.dtype(), "rms_norm", rms_norm_cpu(x, res, w, eps))
}

/// A row-wise op's input in its arithmetic type and, with a residual, the stored sum.
type WithRes<T> = (Vec<<T as Elem>::R>, Option<Vec<T>>);

/// The normalized input of row-wise ops with a folded residual: `x`, or `T(x + res)`.
fn with_res<T: Elem>(x: &Tensor, res: Option<&Tensor>) -> Result<WithRes<T>> {
    let xv: Vec<T> = host(x)?;
    match res {
        None => Ok((xv.iter().map(|v| v.get()).collect(), None)),
        Some(r) => {
            let rv: Vec<T> = host(r)?;
            let h: Vec<T> = xv.iter().zip(&rv).map(|(a, b)| T::put(a.get() + b.get())).collect();
            Ok((h.iter().map(|v| v.get()).collect(), Some(h)))
        }
    }
}

type NormOut = (Tensor, Tensor, Option<Tensor>);

fn rms_norm_cpu<T: Elem>(x: &Tensor, res: Option<&Tensor>, w: &Tensor, eps: f64) -> Result<NormOut> {
    let (rows, dd) = rows_cols(x)?;
    let (hv, hsum) = with_res::<T>(x, res)?;
    let wv: Vec<T> = host(w)?;
    let eps = T::R::c(eps);
    let n = T::R::c(dd as f64);
    let mut y = vec![T::from_f64(0.0); rows * dd];
    let mut rstd = vec![T::R::ZERO; rows];
    rows_stat(&mut y, dd, &mut rstd, |r, yr, rs| {
        let xr = &hv[r * dd..(r + 1) * dd];
        let mut ss = Sum::default();
        for &v in xr {
            ss.add(v * v);
        }
        *rs = T::R::ONE / (ss.get() / n + eps).sqrt();
        for ((o, &v), wc) in yr.iter_mut().zip(xr).zip(&wv) {
            *o = T::put(rnd::<T>(v * *rs) * wc.get());
        }
    });
    let h = match hsum {
        Some(h) => Some(cpu(h, x.dims())?),
        None => None,
    };
    Ok((cpu(y, x.dims())?, cpu(rstd, stat_shape(x))?, h))
}

/// The op chain of [`rms_norm`] (`ops::RmsNorm::forward_chain` after the residual add).
pub fn rms_norm_chain(x: &Tensor, res: Option<&Tensor>, w: &Tensor, eps: f64) -> Result<NormOut> {
    let h = match res {
        Some(r) => Some((x + r)?),
        None => None,
    };
    let (y, rstd) = ops::RmsNorm::new(w.clone(), eps).forward_chain(h.as_ref().unwrap_or(x))?;
    Ok((y, rstd, h))
}

/// Backward of [`rms_norm`] given its (summed) input `x`, `rstd` and `dy`; `dy` may be given as
/// up to three summands (added as the chain adds them, `(dy₀ + dy₁) + dy₂` in the dtype: the
/// gradients of several projections reading the norm's output). With `res`, returns `res + dx`
/// (the chain's residual add, rounded like it).
pub fn rms_norm_backward(
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &[&Tensor],
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, dd) = rows_cols(x)?;
    if dy.is_empty() || dy.len() > 3 {
        bail!("rms_norm_backward: {} gradient summands (1 to 3)", dy.len())
    }
    for d in dy {
        same_shape("rms_norm_backward", x, d)?;
    }
    same_dtype("rms_norm_backward", x, w)?;
    if w.dims() != [dd] || rstd.elem_count() != rows || rstd.dtype() != acc_dtype(x.dtype()) {
        bail!(
            "rms_norm_backward: weight {:?} / rstd {:?} {:?} for x {:?}",
            w.dims(),
            rstd.dims(),
            rstd.dtype(),
            x.dims()
        )
    }
    if let Some(r) = res {
        same_shape("rms_norm_backward", x, r)?;
    }
    if !fusable(x) {
        return rms_norm_backward_chain(x, rstd, w, dy, res);
    }
    on_cuda!(x, fused_cuda::rms_norm_backward(x, rstd, w, dy, res));
    cpu_dtype!(x.dtype(), "rms_norm_backward", rms_norm_backward_cpu(x, rstd, w, dy, res))
}

/// The sum of gradient summands, rounded to `T` after each add as the chain does.
fn sum_dy<T: Elem>(dy: &[&Tensor]) -> Result<Vec<T::R>> {
    let mut acc: Vec<T::R> = host::<T>(dy[0])?.into_iter().map(|v| v.get()).collect();
    for d in &dy[1..] {
        for (a, v) in acc.iter_mut().zip(host::<T>(d)?) {
            *a = rnd::<T>(*a + v.get());
        }
    }
    Ok(acc)
}

fn rms_norm_backward_cpu<T: Elem>(
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &[&Tensor],
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, dd) = rows_cols(x)?;
    let xv: Vec<T> = host(x)?;
    let dyv = sum_dy::<T>(dy)?;
    let wv: Vec<T> = host(w)?;
    let rsv: Vec<T::R> = host(rstd)?;
    let rv: Option<Vec<T>> = res.map(host).transpose()?;
    let n = T::R::c(dd as f64);
    let mut dx = vec![T::from_f64(0.0); rows * dd];
    rows1(&mut dx, dd, |r, out| {
        let rs = rsv[r];
        let (xr, gr) = (&xv[r * dd..(r + 1) * dd], &dyv[r * dd..(r + 1) * dd]);
        let mut acc = Sum::default();
        for c in 0..dd {
            acc.add(gr[c] * wv[c].get() * (xr[c].get() * rs));
        }
        let m = acc.get() / n;
        for c in 0..dd {
            let g = gr[c] * wv[c].get();
            let v = (g - xr[c].get() * rs * m) * rs;
            out[c] = match &rv {
                Some(rv) => T::put(rnd::<T>(v) + rv[r * dd + c].get()),
                None => T::put(v),
            };
        }
    });
    cpu(dx, x.dims())
}

pub fn rms_norm_backward_chain(
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &[&Tensor],
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let mut g = dy[0].clone();
    for d in &dy[1..] {
        g = (g + *d)?;
    }
    let dx = ops::RmsNorm::new(w.clone(), 0.0).backward_chain(x, rstd, &g)?;
    match res {
        Some(r) => r + dx,
        None => Ok(dx),
    }
}

/// Fused LayerNorm (affine) over the last dim; with `res`, of `h = x + res` (returned too).
/// Returns `(y, mean, rstd, h)` with the statistics `[.., 1]` in the accumulation dtype.
pub fn layer_norm(
    x: &Tensor,
    res: Option<&Tensor>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
    let (_, dd) = rows_cols(x)?;
    if w.dims() != [dd] || b.dims() != [dd] {
        bail!("layer_norm: weight {:?} / bias {:?} for rows of {dd}", w.dims(), b.dims())
    }
    same_dtype("layer_norm", x, w)?;
    same_dtype("layer_norm", x, b)?;
    if let Some(r) = res {
        same_shape("layer_norm", x, r)?;
    }
    if !fusable(x) {
        return layer_norm_chain(x, res, w, b, eps);
    }
    on_cuda!(x, fused_cuda::layer_norm(x, res, w, b, eps));
    cpu_dtype!(x.dtype(), "layer_norm", layer_norm_cpu(x, res, w, b, eps))
}

type LnOut = (Tensor, Tensor, Tensor, Option<Tensor>);

fn layer_norm_cpu<T: Elem>(x: &Tensor, res: Option<&Tensor>, w: &Tensor, b: &Tensor, eps: f64) -> Result<LnOut> {
    let (rows, dd) = rows_cols(x)?;
    let (hv, hsum) = with_res::<T>(x, res)?;
    let wv: Vec<T> = host(w)?;
    let bv: Vec<T> = host(b)?;
    let eps = T::R::c(eps);
    let n = T::R::c(dd as f64);
    let mut y = vec![T::from_f64(0.0); rows * dd];
    let mut stats = vec![(T::R::ZERO, T::R::ZERO); rows];
    rows_stat(&mut y, dd, &mut stats, |r, yr, st| {
        let xr = &hv[r * dd..(r + 1) * dd];
        let mut s = Sum::default();
        for &v in xr {
            s.add(v);
        }
        let mu = s.get() / n;
        let mut ss = Sum::default();
        for &v in xr {
            ss.add((v - mu) * (v - mu));
        }
        let rs = T::R::ONE / (ss.get() / n + eps).sqrt();
        for c in 0..dd {
            yr[c] = T::put((xr[c] - mu) * rs * wv[c].get() + bv[c].get());
        }
        *st = (mu, rs);
    });
    let h = match hsum {
        Some(h) => Some(cpu(h, x.dims())?),
        None => None,
    };
    let (mean, rstd): (Vec<T::R>, Vec<T::R>) = stats.into_iter().unzip();
    Ok((cpu(y, x.dims())?, cpu(mean, stat_shape(x))?, cpu(rstd, stat_shape(x))?, h))
}

pub fn layer_norm_chain(x: &Tensor, res: Option<&Tensor>, w: &Tensor, b: &Tensor, eps: f64) -> Result<LnOut> {
    let h = match res {
        Some(r) => Some((x + r)?),
        None => None,
    };
    let (y, st) = ops::LayerNorm::new(w.clone(), b.clone(), eps).forward_chain(h.as_ref().unwrap_or(x))?;
    Ok((y, st.mean, st.rstd, h))
}

/// Backward of [`layer_norm`]; with `res`, returns `res + dx`.
pub fn layer_norm_backward(
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, dd) = rows_cols(x)?;
    same_shape("layer_norm_backward", x, dy)?;
    same_dtype("layer_norm_backward", x, w)?;
    let acc = acc_dtype(x.dtype());
    if w.dims() != [dd]
        || rstd.elem_count() != rows
        || mean.elem_count() != rows
        || rstd.dtype() != acc
        || mean.dtype() != acc
    {
        bail!(
            "layer_norm_backward: weight {:?} / mean {:?} / rstd {:?} for x {:?}",
            w.dims(),
            mean.dims(),
            rstd.dims(),
            x.dims()
        )
    }
    if let Some(r) = res {
        same_shape("layer_norm_backward", x, r)?;
    }
    if !fusable(x) {
        return layer_norm_backward_chain(x, mean, rstd, w, dy, res);
    }
    on_cuda!(x, fused_cuda::layer_norm_backward(x, mean, rstd, w, dy, res));
    cpu_dtype!(x.dtype(), "layer_norm_backward", layer_norm_backward_cpu(x, mean, rstd, w, dy, res))
}

fn layer_norm_backward_cpu<T: Elem>(
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, dd) = rows_cols(x)?;
    let xv: Vec<T> = host(x)?;
    let dyv: Vec<T> = host(dy)?;
    let wv: Vec<T> = host(w)?;
    let muv: Vec<T::R> = host(mean)?;
    let rsv: Vec<T::R> = host(rstd)?;
    let rv: Option<Vec<T>> = res.map(host).transpose()?;
    let n = T::R::c(dd as f64);
    let mut dx = vec![T::from_f64(0.0); rows * dd];
    rows1(&mut dx, dd, |r, out| {
        let (mu, rs) = (muv[r], rsv[r]);
        let (xr, gr) = (&xv[r * dd..(r + 1) * dd], &dyv[r * dd..(r + 1) * dd]);
        let (mut sg, mut sgx) = (Sum::default(), Sum::default());
        for c in 0..dd {
            let g = gr[c].get() * wv[c].get();
            sg.add(g);
            sgx.add(g * ((xr[c].get() - mu) * rs));
        }
        let (mg, mgx) = (sg.get() / n, sgx.get() / n);
        for c in 0..dd {
            let g = gr[c].get() * wv[c].get();
            let xh = (xr[c].get() - mu) * rs;
            let v = (g - mg - xh * mgx) * rs;
            out[c] = match &rv {
                Some(rv) => T::put(rnd::<T>(v) + rv[r * dd + c].get()),
                None => T::put(v),
            };
        }
    });
    cpu(dx, x.dims())
}

pub fn layer_norm_backward_chain(
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let b = w.zeros_like()?;
    let st = ops::LnStats { mean: mean.clone(), rstd: rstd.clone() };
    let dx = ops::LayerNorm::new(w.clone(), b, 0.0).backward_chain(x, &st, dy)?;
    match res {
        Some(r) => r + dx,
        None => Ok(dx),
    }
}

// ---------------------------------------------------------------------------------------------
// The model's norms, fused: `ops::RmsNorm` and `ops::LayerNorm` hold the weights and the op
// chains (`forward_chain`, `backward_chain`); the passes the model runs are defined here, so that
// `ops` depends on nothing fused (fused → ops, never the reverse).

impl RmsNorm {
    /// Returns `(y, rstd)`; `rstd` is `[.., 1]` in the accumulation dtype (kept for backward).
    /// Fused ([`rms_norm`]).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (y, rstd, _) = rms_norm(x, None, self.weight(), self.eps())?;
        Ok((y, rstd))
    }

    /// The norm of the residual sum `h = x + res`: returns `(h, y, rstd)`, one fused pass.
    pub fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (y, rstd, h) = rms_norm(x, Some(res), self.weight(), self.eps())?;
        match h {
            Some(h) => Ok((h, y, rstd)),
            None => candle_core::bail!("internal: rms_norm without its residual sum"),
        }
    }

    /// ∂/∂x given the forward input `x`, its `rstd` and `dy` (fused).
    pub fn backward(&self, x: &Tensor, rstd: &Tensor, dy: &Tensor) -> Result<Tensor> {
        rms_norm_backward(x, rstd, self.weight(), &[dy], None)
    }

    /// `res + ∂/∂x` for `dy = Σ dys` (up to three summands, added in order): the backward of a
    /// residual branch `res` around this norm whose output feeds several projections, one pass.
    pub fn backward_add(&self, x: &Tensor, rstd: &Tensor, dys: &[&Tensor], res: &Tensor) -> Result<Tensor> {
        rms_norm_backward(x, rstd, self.weight(), dys, Some(res))
    }
}

impl LayerNorm {
    /// Fused ([`layer_norm`]).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, LnStats)> {
        let (y, mean, rstd, _) = layer_norm(x, None, self.weight(), self.bias(), self.eps())?;
        Ok((y, LnStats { mean, rstd }))
    }

    /// The norm of the residual sum `h = x + res`: returns `(h, y, stats)`, one fused pass.
    pub fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<(Tensor, Tensor, LnStats)> {
        let (y, mean, rstd, h) = layer_norm(x, Some(res), self.weight(), self.bias(), self.eps())?;
        match h {
            Some(h) => Ok((h, y, LnStats { mean, rstd })),
            None => candle_core::bail!("internal: layer_norm without its residual sum"),
        }
    }

    /// Fused.
    pub fn backward(&self, x: &Tensor, st: &LnStats, dy: &Tensor) -> Result<Tensor> {
        layer_norm_backward(x, &st.mean, &st.rstd, self.weight(), dy, None)
    }

    /// `res + ∂/∂x`, one fused pass.
    pub fn backward_add(&self, x: &Tensor, st: &LnStats, dy: &Tensor, res: &Tensor) -> Result<Tensor> {
        layer_norm_backward(x, &st.mean, &st.rstd, self.weight(), dy, Some(res))
    }
}
