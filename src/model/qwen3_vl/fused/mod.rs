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
//!
//! By op family: [`attention`] (the softmax with its log-sum-exp and backward, and the chunked
//! attention around it), [`norm`] (RMSNorm, LayerNorm, and the passes of `ops::RmsNorm` /
//! `ops::LayerNorm`), [`rope`] (text q/k norm + MRoPE, vision qkv + 2-D rotary), [`activation`]
//! (GELU, SwiGLU). This file holds what they share: the CPU scalar plumbing, the on/off switch,
//! the argument checks and the CUDA dispatch. Dependencies run fused → ops, fused → fused_cuda.

use candle_core::{bail, DType, Device, Result, Tensor, WithDType, D};
use half::{bf16, f16};
use rayon::prelude::*;

use super::ops::{self, acc_dtype, AttnSpec, LayerNorm, LnStats, RmsNorm};

#[cfg(feature = "cuda")]
use super::fused_cuda;

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
    fused_cuda::set_debug(poison, sync_check);
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

pub mod activation;
pub mod attention;
pub mod norm;
pub mod rope;

pub use activation::*;
pub use attention::*;
pub use norm::*;
pub use rope::*;

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
