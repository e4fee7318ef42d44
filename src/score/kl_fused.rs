//! kl_div's KL on a GPU: one kernel per group and format ([`RowKlSums`], `kernels/metrics.cu`)
//! reads the new logits and the unquantized probabilities once and gives per row
//! `(max z, Σ exp(z − max z), Σ p·z, Σ p)` in f64; with the same sums of the unquantized logits
//! `x`, made once per input,
//!
//! ```text
//! KL_t = (Σ p·x − Σ p·z) + (lse z − lse x)·Σ p
//! ```
//!
//! (the identity of `kl.rs`' CPU path). The candle-op form makes and walks about ten `[rows,
//! vocab]` f32 temporaries per group and format instead, 1.3 GB each for 2,048 packed tokens.
//! Unchanged logits give exactly 0: both sides are summed by the same kernel.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;

/// The unquantized distributions of one input: probabilities `p` (f32 `[rows, vocab]`) and per
/// row (f64 `[rows]`) `Σ p·x`, `lse x` and `Σ p`.
pub struct FusedBase {
    p: Tensor,
    dot: Tensor,
    lse: Tensor,
    sum_p: Tensor,
}

impl FusedBase {
    /// From the unquantized logits `[rows, vocab]` (f32 or bf16) and their probabilities `p`
    /// (f32, as `kl.rs` makes them for every path).
    pub fn new(logits: &Tensor, p: Tensor) -> Result<Self> {
        let sums = row_kl_sums(logits, &p)?;
        let (dot, lse, sum_p) = (column(&sums, 2)?, lse(&sums)?, column(&sums, 3)?);
        Ok(FusedBase { p, dot, lse, sum_p })
    }

    /// Per row, `KL(P_t ‖ softmax(z_t))` (f64 `[rows]`, on the logits' device).
    pub fn kl_rows(&self, logits: &Tensor) -> Result<Tensor> {
        if logits.dims() != self.p.dims() {
            candle_core::bail!("kl: logits {:?}, base {:?}", logits.dims(), self.p.dims());
        }
        let sums = row_kl_sums(logits, &self.p)?;
        (&self.dot - column(&sums, 2)?)? + ((lse(&sums)? - &self.lse)? * &self.sum_p)?
    }
}

fn column(sums: &Tensor, k: usize) -> Result<Tensor> {
    sums.narrow(1, k, 1)?.squeeze(1)
}

/// `max + ln Σ exp(z − max)` per row of [`RowKlSums`]' output.
fn lse(sums: &Tensor) -> Result<Tensor> {
    column(sums, 0)? + column(sums, 1)?.log()?
}

/// [`RowKlSums`] of `logits` (f32 or bf16; others are cast to f32) against `p`.
pub fn row_kl_sums(logits: &Tensor, p: &Tensor) -> Result<Tensor> {
    let z = match logits.dtype() {
        DType::F32 | DType::BF16 => logits.contiguous()?,
        _ => logits.to_dtype(DType::F32)?,
    };
    z.apply_op2_no_bwd(&p.contiguous()?, &RowKlSums)
}

/// Per row of logits `z` (`[rows, vocab]`, f32 or bf16) and probabilities `p` (f32, same shape):
/// f64 `[rows, 4]` = `(max z, Σ exp(z − max z), Σ p·z, Σ p)`; `exp` in f32, sums in f64; NaN
/// skipped by the max, a NaN logit makes the row's `Σ p·z` NaN.
pub struct RowKlSums;

impl RowKlSums {
    fn row(z: impl Iterator<Item = f32> + Clone, p: &[f32]) -> [f64; 4] {
        let m = z.clone().fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
        let nan = z.clone().any(f32::is_nan);
        if !m.is_finite() || nan {
            let sum_p = p.iter().map(|&v| v as f64).sum();
            return [m as f64, 0.0, f64::NAN, sum_p];
        }
        let (mut sum_exp, mut dot, mut sum_p) = (0.0, 0.0, 0.0);
        for (zi, &pi) in z.zip(p) {
            sum_exp += (zi - m).exp() as f64;
            dot += pi as f64 * zi as f64;
            sum_p += pi as f64;
        }
        [m as f64, sum_exp, dot, sum_p]
    }
}

impl CustomOp2 for RowKlSums {
    fn name(&self) -> &'static str {
        "row-kl-sums"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l1.shape().dims2()?;
        if l2.shape().dims() != [rows, vocab] {
            candle_core::bail!("row-kl-sums: logits {:?}, probabilities {:?}", l1.shape(), l2.shape());
        }
        let (Some((z0, _)), Some((p0, _))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("row-kl-sums: inputs must be contiguous");
        };
        let CpuStorage::F32(p) = s2 else { candle_core::bail!("row-kl-sums: probabilities must be f32") };
        let mut out = Vec::with_capacity(4 * rows);
        for r in 0..rows {
            let pr = &p[p0 + r * vocab..][..vocab];
            let sums = match s1 {
                CpuStorage::F32(z) => Self::row(z[z0 + r * vocab..][..vocab].iter().copied(), pr),
                CpuStorage::BF16(z) => Self::row(z[z0 + r * vocab..][..vocab].iter().map(|v| bf16::to_f32(*v)), pr),
                _ => candle_core::bail!("row-kl-sums: logits must be f32 or bf16"),
            };
            out.extend_from_slice(&sums);
        }
        Ok((CpuStorage::F64(out), Shape::from((rows, 4))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::kl_cuda::row_kl_sums(s1, l1, s2, l2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused rows agree with the definition (f64 log-softmax), and unchanged logits give 0.
    #[test]
    fn fused_rows_match_the_definition() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, vocab) = (5, 3001);
        let x = (Tensor::randn(0f32, 3.0, (rows, vocab), &dev)?).to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let z = (&x + Tensor::randn(0f32, 0.1, (rows, vocab), &dev)?)?;
        let base = FusedBase::new(&x, log_softmax64(&x)?.exp()?.to_dtype(DType::F32)?)?;
        let got = base.kl_rows(&z)?.to_vec1::<f64>()?;
        let (lp, lq) = (log_softmax64(&x)?, log_softmax64(&z)?);
        let want = (lp.exp()? * (&lp - &lq)?)?.sum(1)?.to_vec1::<f64>()?;
        // Both log-sum-exps sum f32 exponentials (≤ 2 ulp each, 1.2e-7): ≤ 2.5e-7 per row.
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 2.5e-7, "fused {g:e}, definition {w:e}");
        }
        assert!(base.kl_rows(&x)?.to_vec1::<f64>()?.iter().all(|&v| v == 0.0));
        // bf16 logits of the same values give the same sums as their f32 copy.
        let same = base.kl_rows(&x.to_dtype(DType::BF16)?)?.to_vec1::<f64>()?;
        assert!(same.iter().all(|&v| v == 0.0), "{same:?}");
        assert!(base.kl_rows(&z.narrow(1, 0, 100)?).is_err());
        Ok(())
    }

    fn log_softmax64(x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F64)?;
        let lse = x.exp()?.sum_keepdim(1)?.log()?;
        x.broadcast_sub(&lse)
    }

    /// A NaN logit makes its row NaN; the others are unaffected.
    #[test]
    fn nan_logits_give_a_nan_row() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 64), &dev)?;
        let base = FusedBase::new(&x, log_softmax64(&x)?.exp()?.to_dtype(DType::F32)?)?;
        let mut z = x.to_vec2::<f32>()?;
        z[1][3] = f32::NAN;
        let rows = base.kl_rows(&Tensor::new(z, &dev)?)?.to_vec1::<f64>()?;
        assert_eq!(rows[0], 0.0);
        assert!(rows[1].is_nan());
        Ok(())
    }
}
