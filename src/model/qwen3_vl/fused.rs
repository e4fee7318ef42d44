//! Fused versions of the model's hot non-matmul op chains: one pass over memory (one kernel on
//! CUDA: `kernels/{attention,norm,act}.cu`) instead of a chain of candle ops each launching a
//! kernel and allocating a temporary. The matmuls stay in candle (cuBLAS / gemm).
//!
//! Every op has three implementations of the same math:
//! - a CPU loop (f32, f64, bf16, f16 storage; arithmetic in f32, or f64 for f64), here;
//! - a CUDA kernel (f32, bf16, f16 storage; arithmetic in f32), `fused_cuda.rs`;
//! - the op chain it replaces (`*_chain`), the reference of the tests and the fallback where no
//!   kernel exists (f64 on CUDA, other devices).
//!
//! Numerics follow the chains: reductions and derivative formulas in the accumulation dtype
//! ([`acc_dtype`]), each stored value rounded once to the storage dtype, except where HF (and
//! the chain) round an intermediate to the model dtype (RMSNorm before its weight, SwiGLU's silu,
//! the text rotary), which the fused ops round too. Row sums run in the arithmetic type on the
//! CPU (f32, as HF's; f64 for f64 storage) and as f32 lane/warp trees on the GPU.
//!
//! `QSENS_FUSED=0` in the environment (or [`set_enabled`]) runs the chains instead, for A/B runs.

use candle_core::{bail, DType, Device, Result, Tensor, WithDType, D};
use half::{bf16, f16};
use rayon::prelude::*;

use super::ops::{self, acc_dtype, AttnSpec, LayerNorm, LnStats, RmsNorm};
use crate::model::linear::matmul;

// ---------------------------------------------------------------------------------------------
// Scalar plumbing of the CPU paths

/// Arithmetic type of a CPU path: f32, or f64 for f64 storage.
pub(crate) trait Real:
    WithDType + std::ops::Neg<Output = Self> + std::ops::Add<Output = Self> + std::fmt::Debug
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn c(v: f64) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn max(self, o: Self) -> Self;
}

macro_rules! real {
    ($t:ty, $erf:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn c(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
        }
    };
}
real!(f32, candle_core::cpu::erf::erf_f32);
real!(f64, candle_core::cpu::erf::erf_f64);

/// A storage type and its arithmetic type.
pub(crate) trait Elem: WithDType {
    type R: Real;
    fn get(self) -> Self::R;
    fn put(v: Self::R) -> Self;
}

macro_rules! elem {
    ($t:ty, $r:ty, $get:expr, $put:expr) => {
        impl Elem for $t {
            type R = $r;
            #[inline(always)]
            fn get(self) -> $r {
                $get(self)
            }
            #[inline(always)]
            fn put(v: $r) -> Self {
                $put(v)
            }
        }
    };
}
elem!(f32, f32, |x| x, |v| v);
elem!(f64, f64, |x| x, |v| v);
elem!(bf16, f32, bf16::to_f32, bf16::from_f32);
elem!(f16, f32, f16::to_f32, f16::from_f32);

/// A row sum of the CPU paths, accumulated in the arithmetic type (f32, or f64 for f64 storage)
/// as HF's f32 reductions are: an f64 accumulator is more accurate, but drifts further from the
/// f32 model HF runs (the FP8 calibration amax, compared with ModelOpt at 1e-6, moved to 1.2e-6).
#[derive(Clone, Copy)]
struct Sum<R>(R);

impl<R: Real> Default for Sum<R> {
    fn default() -> Self {
        Sum(R::ZERO)
    }
}

impl<R: Real> Sum<R> {
    #[inline(always)]
    fn add(&mut self, v: R) {
        self.0 += v;
    }

    #[inline(always)]
    fn get(self) -> R {
        self.0
    }
}

/// `v` rounded to the storage type `T` (what a `T`-typed op stores).
#[inline(always)]
fn rnd<T: Elem>(v: T::R) -> T::R {
    T::put(v).get()
}

/// Runs `$f::<T>(args)` for the storage type of `$dt` (CPU).
macro_rules! cpu_dtype {
    ($dt:expr, $op:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dt {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            dt => bail!("{}: unsupported dtype {dt:?}", $op),
        }
    };
}

/// The elements of `t` in row-major order (a copy; strided views are gathered).
fn host<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

fn cpu<T: WithDType, S: Into<candle_core::Shape>>(v: Vec<T>, shape: S) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// 0: not yet read from the environment, 1: fused ops on, 2: off.
static ENABLED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the fused ops run at all: on unless the environment sets `QSENS_FUSED=0` (then every
/// op runs its chain: an A/B switch for profiling) or [`set_enabled`] said otherwise.
pub fn enabled() -> bool {
    use std::sync::atomic::Ordering;
    match ENABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("QSENS_FUSED").map(|v| v != "0").unwrap_or(true);
            ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Overrides `QSENS_FUSED` for this process.
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Below this many elements the CPU loops run on the calling thread (handing work to rayon's
/// pool costs more than small ops take).
const PAR_MIN: usize = 1 << 15;

/// `f(row, out_row, stat)` over the rows (`width` wide) of `out` with one statistic per row.
fn rows_stat<T: Send, S: Send>(
    out: &mut [T],
    width: usize,
    stats: &mut [S],
    f: impl Fn(usize, &mut [T], &mut S) + Sync,
) {
    let width = width.max(1);
    if out.len() < PAR_MIN {
        out.chunks_mut(width).zip(stats.iter_mut()).enumerate().for_each(|(r, (o, s))| f(r, o, s));
    } else {
        out.par_chunks_mut(width).zip(stats.par_iter_mut()).enumerate().for_each(|(r, (o, s))| f(r, o, s));
    }
}

/// `f(row, a_row, b_row)` over the rows of two outputs.
fn rows2<T: Send>(a: &mut [T], b: &mut [T], width: usize, f: impl Fn(usize, &mut [T], &mut [T]) + Sync) {
    let width = width.max(1);
    if a.len() < PAR_MIN {
        a.chunks_mut(width).zip(b.chunks_mut(width)).enumerate().for_each(|(r, (x, y))| f(r, x, y));
    } else {
        a.par_chunks_mut(width).zip(b.par_chunks_mut(width)).enumerate().for_each(|(r, (x, y))| f(r, x, y));
    }
}

/// `f(row, out_row)` over the rows of `out`.
fn rows1<T: Send>(out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let width = width.max(1);
    if out.len() < PAR_MIN {
        out.chunks_mut(width).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        out.par_chunks_mut(width).enumerate().for_each(|(r, o)| f(r, o));
    }
}

/// Whether `t`'s dtype and device have a fused implementation (else the op chain runs).
pub fn fusable(t: &Tensor) -> bool {
    if !enabled() {
        return false;
    }
    match t.device() {
        Device::Cpu => matches!(t.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16),
        Device::Cuda(_) => cfg!(feature = "cuda") && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16),
        _ => false,
    }
}

fn same_dtype(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!("{op}: dtype mismatch {:?} vs {:?}", a.dtype(), b.dtype())
    }
    if !a.device().same_device(b.device()) {
        bail!("{op}: tensors on different devices")
    }
    Ok(())
}

fn same_shape(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        bail!("{op}: shape mismatch {:?} vs {:?}", a.dims(), b.dims())
    }
    same_dtype(op, a, b)
}

/// `t` as `[rows, cols]` over its last dim.
fn rows_cols(t: &Tensor) -> Result<(usize, usize)> {
    let cols = t.dim(D::Minus1)?;
    Ok((t.elem_count() / cols.max(1), cols))
}

/// `[.., D]` → `[.., 1]`: the shape of per-row statistics.
fn stat_shape(t: &Tensor) -> Vec<usize> {
    let mut s = t.dims().to_vec();
    if let Some(last) = s.last_mut() {
        *last = 1;
    }
    s
}

/// Switches for the GPU self-test: `poison` fills every fused output with NaN bytes before the
/// kernel runs (so an element a kernel forgets to write is caught); `sync_check` synchronizes
/// after every launch and reports an asynchronous error with the kernel's name. No-op on CPU.
/// (`QSENS_FUSED_DEBUG=1` in the environment turns both on for a whole run.)
pub fn set_debug(poison: bool, sync_check: bool) {
    #[cfg(feature = "cuda")]
    super::fused_cuda::set_debug(poison, sync_check);
    #[cfg(not(feature = "cuda"))]
    let _ = (poison, sync_check);
}

macro_rules! on_cuda {
    ($t:expr, $call:expr) => {
        if $t.device().is_cuda() {
            #[cfg(feature = "cuda")]
            {
                return $call;
            }
            #[cfg(not(feature = "cuda"))]
            bail!("built without the cuda feature")
        }
    };
}

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
    fn for_kernel(self) -> super::fused_cuda::MaskRows {
        super::fused_cuda::MaskRows { n: self.n, q0: self.q0, causal: self.causal }
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
    on_cuda!(s, super::fused_cuda::softmax_lse(s, scale, rows.for_kernel()));
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
    on_cuda!(s, super::fused_cuda::softmax_backward(s, dp, lse, delta, scale, rows.for_kernel()));
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
    on_cuda!(a, super::fused_cuda::row_dot(a, b));
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
    on_cuda!(dattn, super::fused_cuda::attention_bwd_prep(dattn, attn, heads));
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
    on_cuda!(x, super::fused_cuda::rms_norm(x, res, w, eps));
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
    on_cuda!(x, super::fused_cuda::rms_norm_backward(x, rstd, w, dy, res));
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
    on_cuda!(x, super::fused_cuda::layer_norm(x, res, w, b, eps));
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
    on_cuda!(x, super::fused_cuda::layer_norm_backward(x, mean, rstd, w, dy, res));
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
    on_cuda!(x, super::fused_cuda::qk_norm_rope(x, w, cos, sin, heads, eps));
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
    on_cuda!(x, super::fused_cuda::qk_norm_rope_backward(g, x, rstd, w, cos, sin));
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
    on_cuda!(qkv, super::fused_cuda::vision_qkv_rope(qkv, cos, sin, heads));
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
    on_cuda!(dq, super::fused_cuda::vision_qkv_rope_backward(dq, dk, dv, cos, sin));
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

// ---------------------------------------------------------------------------------------------
// Activations

macro_rules! binary_api {
    ($(#[$doc:meta])* $name:ident($a:ident, $b:ident), $chain:path, $cpu:ident) => {
        $(#[$doc])*
        pub fn $name($a: &Tensor, $b: &Tensor) -> Result<Tensor> {
            same_shape(stringify!($name), $a, $b)?;
            if !fusable($a) {
                return $chain($a, $b);
            }
            on_cuda!($a, super::fused_cuda::$name($a, $b));
            cpu_dtype!($a.dtype(), stringify!($name), $cpu($a, $b))
        }
    };
}

binary_api!(
    /// `dy · gelu'(x)` for `gelu(x, approximate="tanh")` (chain: [`ops::gelu_tanh_backward`]).
    gelu_tanh_backward(x, dy), ops::gelu_tanh_backward, gelu_tanh_backward_cpu
);
binary_api!(
    /// `dy · (Φ(x) + x·φ(x))` for the exact gelu (chain: [`ops::gelu_erf_backward`]).
    gelu_erf_backward(x, dy), ops::gelu_erf_backward, gelu_erf_backward_cpu
);
binary_api!(
    /// `silu(gate) · up` with silu rounded to the dtype first, as HF (chain: [`ops::swiglu`]).
    swiglu(gate, up), ops::swiglu, swiglu_cpu
);

fn map2<T: Elem>(a: &Tensor, b: &Tensor, f: impl Fn(T::R, T::R) -> T::R + Sync) -> Result<Tensor> {
    let av: Vec<T> = host(a)?;
    let bv: Vec<T> = host(b)?;
    let g = |(x, y): (&T, &T)| T::put(f(x.get(), y.get()));
    let out: Vec<T> = if av.len() < PAR_MIN {
        av.iter().zip(&bv).map(g).collect()
    } else {
        av.par_iter().zip(bv.par_iter()).map(g).collect()
    };
    cpu(out, a.dims())
}

/// The chain's f64 constants as the accumulation type rounds them (candle's affine does too).
fn k<T: Elem>(v: f64) -> T::R {
    T::R::c(v)
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044715;

fn gelu_tanh_backward_cpu<T: Elem>(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (k0, k1) = (k::<T>(SQRT_2_OVER_PI), k::<T>(SQRT_2_OVER_PI * GELU_C));
    let (k2, k3) = (k::<T>(0.5 * SQRT_2_OVER_PI * 3.0 * GELU_C), k::<T>(0.5 * SQRT_2_OVER_PI));
    let (half, one) = (k::<T>(0.5), k::<T>(1.0));
    map2::<T>(x, dy, |v, d| {
        let v2 = v * v;
        let t = ((v2 * k1 + k0) * v).tanh();
        let left = t * half + half;
        let du = v2 * k2 + k3;
        let right = (t * t * -one + one) * v * du;
        (left + right) * d
    })
}

fn gelu_erf_backward_cpu<T: Elem>(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let r2 = k::<T>(std::f64::consts::FRAC_1_SQRT_2);
    let inv = k::<T>(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    let half = k::<T>(0.5);
    map2::<T>(x, dy, |v, d| {
        let cdf = (v * r2).erf() * half + half;
        let pdf = (v * v * -half).exp() * inv;
        (cdf + v * pdf) * d
    })
}

/// `T(T(silu(g))·u)`: HF `act_fn(gate) * up` (silu computed in f32 and rounded, as torch does).
fn swiglu_cpu<T: Elem>(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let one = k::<T>(1.0);
    map2::<T>(g, u, |gv, uv| rnd::<T>(gv / (one + (-gv).exp())) * uv)
}

/// Backward of [`swiglu`]: `(dg, du)`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    same_shape("swiglu_backward", gate, up)?;
    same_shape("swiglu_backward", gate, dm)?;
    if !fusable(gate) {
        return ops::swiglu_backward(gate, up, dm);
    }
    on_cuda!(gate, super::fused_cuda::swiglu_backward(gate, up, dm));
    cpu_dtype!(gate.dtype(), "swiglu_backward", swiglu_backward_cpu(gate, up, dm))
}

fn swiglu_backward_cpu<T: Elem>(gate: &Tensor, up: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    let gv: Vec<T> = host(gate)?;
    let uv: Vec<T> = host(up)?;
    let dv: Vec<T> = host(dm)?;
    let one = k::<T>(1.0);
    let g = |((g, u), d): ((&T, &T), &T)| {
        let (g, u, d) = (g.get(), u.get(), d.get());
        let s = one / ((-g).exp() + one);
        let silu = g * s;
        let dsilu = s * (g * (s * -one + one) + one);
        (T::put(d * u * dsilu), T::put(d * silu))
    };
    let (dg, du): (Vec<T>, Vec<T>) = if gv.len() < PAR_MIN {
        gv.iter().zip(&uv).zip(&dv).map(g).unzip()
    } else {
        gv.par_iter().zip(uv.par_iter()).zip(dv.par_iter()).map(g).unzip()
    };
    Ok((cpu(dg, gate.dims())?, cpu(du, gate.dims())?))
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

#[cfg(test)]
mod tests {
    //! Every fused op against the op chain it replaces, on random inputs: bit-for-bit up to
    //! summation order in f64, within a few ulps in f32, and in bf16/f16 no less accurate than the
    //! chain against an f64 ground truth.
    use super::*;
    use rand::SeedableRng;
    use rand_distr::Distribution;

    fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                let z: f64 = rand_distr::StandardNormal.sample(&mut rng);
                std * z
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    /// (‖a − b‖ / ‖b‖, max |a − b|)
    fn err(a: &Tensor, b: &Tensor) -> (f64, f64) {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (f64s(a), f64s(b));
        let (mut d2, mut b2, mut mx) = (0.0, 0.0, 0f64);
        for (x, y) in a.iter().zip(&b) {
            assert!(x.is_finite(), "non-finite output {x}");
            d2 += (x - y) * (x - y);
            b2 += y * y;
            mx = mx.max((x - y).abs());
        }
        ((d2 / b2.max(1e-300)).sqrt(), mx)
    }

    /// Allowed relative error of a fused result against its chain, per storage dtype.
    fn tol(dt: DType) -> f64 {
        match dt {
            DType::F64 => 1e-12,
            DType::F32 => 2e-6,
            _ => 2e-2,
        }
    }

    const DTYPES: [DType; 4] = [DType::F64, DType::F32, DType::BF16, DType::F16];

    /// Fused vs chain for each dtype; for 16-bit dtypes also: no less accurate than the chain
    /// against the f64 result (a small slack covers ties of single-rounding differences).
    fn compare<F>(what: &str, inputs: &[Tensor], f: F)
    where
        F: Fn(&[Tensor], bool) -> Vec<Tensor>,
    {
        let truth = f(inputs, true);
        for dt in DTYPES {
            let xs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dt).unwrap()).collect();
            let fused = f(&xs, true);
            let chain = f(&xs, false);
            let worst = fused
                .iter()
                .zip(&chain)
                .map(|(a, b)| err(a, b))
                .fold((0f64, 0f64), |w, e| (w.0.max(e.0), w.1.max(e.1)));
            eprintln!("{what:20} {dt:?}: fused vs chain, worst output rel {:.2e} max|Δ| {:.2e}", worst.0, worst.1);
            for (i, ((a, b), t)) in fused.iter().zip(&chain).zip(&truth).enumerate() {
                let (rel, _) = err(a, b);
                assert!(rel <= tol(dt), "{what} output {i} {dt:?}: fused vs chain rel {rel:.3e}");
                if matches!(dt, DType::BF16 | DType::F16) {
                    let (ef, _) = err(a, t);
                    let (ec, _) = err(b, t);
                    assert!(ef <= 1.1 * ec + 1e-4, "{what} output {i} {dt:?}: fused err {ef:.3e} > chain err {ec:.3e}");
                }
            }
        }
    }

    /// Score rows as the attention uses them: `[Hkv, G·n, K]`.
    fn score_cases() -> Vec<(usize, usize, ScoreRows, usize)> {
        let mut v = Vec::new();
        for g in [1, 4] {
            // The last case is large enough for the rows to run in parallel (PAR_MIN).
            for (n, q0, causal) in
                [(1, 0, true), (7, 0, true), (33, 5, true), (7, 0, false), (33, 0, false), (100, 90, true)]
            {
                let k = if causal { q0 + n } else { n + 6 };
                v.push((2, g, ScoreRows { n, q0, causal }, k));
            }
        }
        v
    }

    #[test]
    fn softmax_forward_and_backward_match_chain() {
        for (ci, &(hkv, g, rows, k)) in score_cases().iter().enumerate() {
            let shape = [hkv, g * rows.n, k];
            let s = randn(&shape, 10 + ci as u64, 3.0);
            compare("softmax_lse", std::slice::from_ref(&s), |x, fused| {
                let (p, lse) =
                    if fused { softmax_lse(&x[0], 0.7, rows) } else { softmax_lse_chain(&x[0], 0.7, rows) }.unwrap();
                vec![p, lse]
            });
            // Statistics as wider [H, L] views (ld > columns) of which the chunk reads q0..q0+n.
            let heads = hkv * g;
            let lse = (softmax_lse_chain(&s, 0.7, rows)
                .unwrap()
                .1
                .reshape((heads, rows.n))
                .unwrap()
                .pad_with_zeros(1, rows.q0, 3))
            .unwrap();
            let delta = randn(&[heads, rows.q0 + rows.n + 3], 50 + ci as u64, 1.0);
            let dp = randn(&shape, 90 + ci as u64, 1.0);
            compare("softmax_backward", &[s, dp], |x, fused| {
                let acc = acc_dtype(x[0].dtype());
                let (l, d) = (lse.to_dtype(acc).unwrap(), delta.to_dtype(acc).unwrap());
                let f = if fused { softmax_backward } else { softmax_backward_chain };
                let (p, ds) = f(&x[0], &x[1], &l, &d, 0.7, rows).unwrap();
                vec![p, ds]
            });
        }
    }

    #[test]
    fn row_dot_reads_strided_views() {
        let a = randn(&[3, 11, 8], 1, 1.0);
        let o = randn(&[11, 3, 8], 2, 1.0);
        compare("row_dot", &[a, o], |x, fused| {
            let ov = x[1].transpose(0, 1).unwrap();
            vec![if fused { row_dot(&x[0], &ov) } else { row_dot_chain(&x[0], &ov) }.unwrap()]
        });
    }

    #[test]
    fn attention_bwd_prep_matches_chain() {
        for (l, h, d) in [(11, 3, 8), (274, 4, 64)] {
            let g = randn(&[l, h * d], 1, 1.0);
            let o = randn(&[l, h * d], 2, 1.0);
            compare("attention_bwd_prep", &[g, o], |x, fused| {
                let f = if fused { attention_bwd_prep } else { attention_bwd_prep_chain };
                let (do_, delta) = f(&x[0], &x[1], h).unwrap();
                vec![do_, delta]
            });
        }
    }

    #[test]
    fn attention_matches_chain() {
        let dev = Device::Cpu;
        for (h, g, l, d) in [(4, 1, 37, 8), (8, 4, 29, 16), (2, 2, 5, 4)] {
            for causal in [true, false] {
                for rows in [16, 64] {
                    let q = randn(&[h, l, d], 1, 1.0);
                    let k = randn(&[h / g, l, d], 2, 1.0);
                    let v = randn(&[h / g, l, d], 3, 1.0);
                    let w = randn(&[h, l, d], 4, 1.0);
                    compare("attention", &[q, k, v, w], |x, fused| {
                        let m = ops::CausalMask::with_rows(l, rows, acc_dtype(x[0].dtype()), &dev).unwrap();
                        let spec = AttnSpec {
                            groups: g,
                            scale: 0.35,
                            causal: causal.then_some(&m),
                            rows: if causal { m.rows() } else { rows },
                        };
                        let (o, lse) = if fused {
                            attention_forward(&x[0], &x[1], &x[2], &spec)
                        } else {
                            ops::attention_forward(&x[0], &x[1], &x[2], &spec)
                        }
                        .unwrap();
                        let (dq, dk, dv) = if fused {
                            let delta = row_dot(&x[3], &o).unwrap();
                            attention_backward(&x[0], &x[1], &x[2], &lse, &delta, &x[3], &spec)
                        } else {
                            ops::attention_backward(&x[0], &x[1], &x[2], &o, &lse, &x[3], &spec)
                        }
                        .unwrap();
                        vec![o, lse, dq, dk, dv]
                    });
                }
            }
        }
    }

    #[test]
    fn norms_match_chain() {
        for (shape, seed) in
            [(vec![5, 7], 1u64), (vec![3, 600], 2), (vec![2, 3, 64], 3), (vec![1, 1], 4), (vec![64, 600], 5)]
        {
            let dd = *shape.last().unwrap();
            let x = randn(&shape, seed, 1.5).affine(1.0, 0.3).unwrap();
            let r = randn(&shape, seed + 10, 1.0);
            let dy = randn(&shape, seed + 20, 1.0);
            let w = randn(&[dd], seed + 30, 0.1).affine(1.0, 1.0).unwrap();
            let b = randn(&[dd], seed + 40, 0.1);
            for with_res in [false, true] {
                compare("rms_norm", &[x.clone(), r.clone(), w.clone(), dy.clone()], |t, fused| {
                    let res = with_res.then_some(&t[1]);
                    let f = if fused { rms_norm } else { rms_norm_chain };
                    let (y, rstd, h) = f(&t[0], res, &t[2], 1e-6).unwrap();
                    let hx = h.clone().unwrap_or_else(|| t[0].clone());
                    let fb = if fused { rms_norm_backward } else { rms_norm_backward_chain };
                    let dx = fb(&hx, &rstd, &t[2], &[&t[3]], res).unwrap();
                    // Three gradient summands (the q/k/v projections' input gradients).
                    let dx3 = fb(&hx, &rstd, &t[2], &[&t[3], &t[1], &t[0]], res).unwrap();
                    let mut out = vec![y, rstd, dx, dx3];
                    out.extend(h);
                    out
                });
                compare("layer_norm", &[x.clone(), r.clone(), w.clone(), b.clone(), dy.clone()], |t, fused| {
                    let res = with_res.then_some(&t[1]);
                    let f = if fused { layer_norm } else { layer_norm_chain };
                    let (y, mean, rstd, h) = f(&t[0], res, &t[2], &t[3], 1e-6).unwrap();
                    let hx = h.clone().unwrap_or_else(|| t[0].clone());
                    let fb = if fused { layer_norm_backward } else { layer_norm_backward_chain };
                    let dx = fb(&hx, &mean, &rstd, &t[2], &t[4], res).unwrap();
                    let mut out = vec![y, mean, rstd, dx];
                    out.extend(h);
                    out
                });
            }
        }
    }

    #[test]
    fn text_qk_norm_rope_matches_chain() {
        for (l, h, d) in [(9, 4, 32), (1, 2, 8), (13, 3, 128), (70, 4, 128)] {
            let x = randn(&[l, h * d], 1, 2.0);
            let w = randn(&[d], 2, 0.2).affine(1.0, 1.0).unwrap();
            let ang = randn(&[l, d / 2], 3, 3.0);
            let g = randn(&[h, l, d], 4, 1.0);
            compare("qk_norm_rope", &[x, w, ang.cos().unwrap(), ang.sin().unwrap(), g], |t, fused| {
                let (y, rstd) = if fused {
                    qk_norm_rope(&t[0], &t[1], &t[2], &t[3], h, 1e-6)
                } else {
                    qk_norm_rope_chain(&t[0], &t[1], &t[2], &t[3], h, 1e-6)
                }
                .unwrap();
                let f = if fused { qk_norm_rope_backward } else { qk_norm_rope_backward_chain };
                let dx = f(&t[4], &t[0], &rstd, &t[1], &t[2], &t[3]).unwrap();
                vec![y, rstd, dx]
            });
        }
    }

    #[test]
    fn vision_qkv_rope_matches_chain() {
        for (n, h, d) in [(12, 2, 16), (7, 3, 8), (64, 4, 64)] {
            let qkv = randn(&[n, 3 * h * d], 1, 1.0);
            let ang = randn(&[n, d / 2], 2, 3.0);
            let gs = [randn(&[h, n, d], 3, 1.0), randn(&[h, n, d], 4, 1.0), randn(&[h, n, d], 5, 1.0)];
            compare("vision_qkv_rope", &[qkv, gs[0].clone(), gs[1].clone(), gs[2].clone()], |t, fused| {
                let acc = acc_dtype(t[0].dtype());
                let (c, s) = (ang.cos().unwrap().to_dtype(acc).unwrap(), ang.sin().unwrap().to_dtype(acc).unwrap());
                let y = if fused { vision_qkv_rope(&t[0], &c, &s, h) } else { vision_qkv_rope_chain(&t[0], &c, &s, h) };
                let f = if fused { vision_qkv_rope_backward } else { vision_qkv_rope_backward_chain };
                vec![y.unwrap(), f(&t[1], &t[2], &t[3], &c, &s).unwrap()]
            });
        }
    }

    #[test]
    fn activations_match_chain() {
        for shape in [vec![5, 7], vec![3, 1000], vec![40, 1000]] {
            let x = randn(&shape, 1, 2.0);
            let u = randn(&shape, 2, 1.0);
            let dy = randn(&shape, 3, 1.0);
            compare("activations", &[x, u, dy], |t, fused| {
                if fused {
                    let (dg, du) = swiglu_backward(&t[0], &t[1], &t[2]).unwrap();
                    vec![
                        gelu_tanh_backward(&t[0], &t[2]).unwrap(),
                        gelu_erf_backward(&t[0], &t[2]).unwrap(),
                        swiglu(&t[0], &t[1]).unwrap(),
                        dg,
                        du,
                    ]
                } else {
                    let (dg, du) = ops::swiglu_backward(&t[0], &t[1], &t[2]).unwrap();
                    vec![
                        ops::gelu_tanh_backward(&t[0], &t[2]).unwrap(),
                        ops::gelu_erf_backward(&t[0], &t[2]).unwrap(),
                        ops::swiglu(&t[0], &t[1]).unwrap(),
                        dg,
                        du,
                    ]
                }
            });
        }
    }

    #[test]
    fn bad_shapes_and_dtypes_are_errors() {
        let x = randn(&[4, 8], 1, 1.0).to_dtype(DType::F32).unwrap();
        let w = randn(&[7], 2, 1.0).to_dtype(DType::F32).unwrap();
        assert!(rms_norm(&x, None, &w, 1e-6).is_err());
        assert!(rms_norm(&x, None, &w.to_dtype(DType::F64).unwrap(), 1e-6).is_err());
        let s = randn(&[2, 6, 5], 3, 1.0).to_dtype(DType::F32).unwrap();
        assert!(softmax_lse(&s, 1.0, ScoreRows { n: 4, q0: 0, causal: false }).is_err());
        assert!(softmax_lse(&s, 1.0, ScoreRows { n: 6, q0: 0, causal: true }).is_err());
        assert!(swiglu(&x, &s).is_err());
        let q = randn(&[4, 5, 8], 4, 1.0);
        let kv = randn(&[3, 5, 8], 5, 1.0);
        assert!(attention_forward(&q, &kv, &kv, &AttnSpec::full(2, 1.0, 4, 5)).is_err());
    }
}
