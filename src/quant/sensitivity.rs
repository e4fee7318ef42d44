//! ModelOpt's per-layer gradient sensitivity, `Σ clamp((Y_q − Y) ⊙ ∂L/∂Y, ±1e10)²`, computed in
//! f32 (`_get_auto_quantize_score`). One fused pass over the three tensors on CUDA
//! (`kernels/quant.cu`); on CPU the sum is accumulated in f64.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// The gradient score of one layer as an f32 scalar tensor on the inputs' device (no host sync).
/// `dy`, `y`, `yq` must have the same shape and dtype.
pub fn gradient_score(dy: &Tensor, y: &Tensor, yq: &Tensor) -> Result<Tensor> {
    if dy.shape() != y.shape() || y.shape() != yq.shape() {
        candle_core::bail!("gradient score: shapes differ ({:?}, {:?}, {:?})", dy.shape(), y.shape(), yq.shape());
    }
    if dy.dtype() != y.dtype() || y.dtype() != yq.dtype() {
        candle_core::bail!("gradient score: dtypes differ ({:?}, {:?}, {:?})", dy.dtype(), y.dtype(), yq.dtype());
    }
    let (dy, y, yq) = (dy.contiguous()?, y.contiguous()?, yq.contiguous()?);
    dy.apply_op3_no_bwd(&y, &yq, &GradientScore)?.reshape(())
}

/// `clamp(p, ±1e10)²` of one product, as ModelOpt clamps before squaring.
#[inline]
fn term(p: f32) -> f64 {
    let p = p.clamp(-1e10, 1e10) as f64;
    p * p
}

pub struct GradientScore;

impl GradientScore {
    fn cpu<T: Copy + Send + Sync>(dy: &[T], y: &[T], yq: &[T], f: impl Fn(T) -> f32 + Sync) -> f32 {
        dy.iter().zip(y).zip(yq).map(|((&g, &a), &b)| term((f(b) - f(a)) * f(g))).sum::<f64>() as f32
    }
}

impl CustomOp3 for GradientScore {
    fn name(&self) -> &'static str {
        "gradient-score"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let range = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("gradient score: non-contiguous input".into()))
        };
        let ((a0, a1), (b0, b1), (c0, c1)) = (range(l1)?, range(l2)?, range(l3)?);
        let v = match (s1, s2, s3) {
            (CpuStorage::F32(g), CpuStorage::F32(y), CpuStorage::F32(q)) => {
                Self::cpu(&g[a0..a1], &y[b0..b1], &q[c0..c1], |x| x)
            }
            (CpuStorage::F64(g), CpuStorage::F64(y), CpuStorage::F64(q)) => {
                Self::cpu(&g[a0..a1], &y[b0..b1], &q[c0..c1], |x| x as f32)
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(y), CpuStorage::BF16(q)) => {
                Self::cpu(&g[a0..a1], &y[b0..b1], &q[c0..c1], bf16::to_f32)
            }
            (CpuStorage::F16(g), CpuStorage::F16(y), CpuStorage::F16(q)) => {
                Self::cpu(&g[a0..a1], &y[b0..b1], &q[c0..c1], f16::to_f32)
            }
            _ => candle_core::bail!("gradient score: unsupported dtype {:?}", s1.dtype()),
        };
        Ok((CpuStorage::F32(vec![v]), Shape::from(1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::gradient_score(s1, l1, s2, l2, s3, l3)
    }
}

/// The unfused reference (candle ops), for tests.
pub fn gradient_score_reference(dy: &Tensor, y: &Tensor, yq: &Tensor) -> Result<Tensor> {
    let diff = (yq.to_dtype(DType::F32)? - y.to_dtype(DType::F32)?)?;
    let prod = (dy.to_dtype(DType::F32)? * diff)?.clamp(-1e10f32, 1e10f32)?;
    prod.sqr()?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, cols) in [(1, 1), (7, 13), (274, 96)] {
            let dy = Tensor::randn(0f32, 1e-3, (rows, cols), &dev)?;
            let y = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
            let yq = (&y + Tensor::randn(0f32, 1e-2, (rows, cols), &dev)?)?;
            for dt in [DType::F32, DType::BF16, DType::F64] {
                let (dy, y, yq) = (dy.to_dtype(dt)?, y.to_dtype(dt)?, yq.to_dtype(dt)?);
                let got = gradient_score(&dy, &y, &yq)?.to_scalar::<f32>()?;
                let want = gradient_score_reference(&dy, &y, &yq)?.to_scalar::<f32>()?;
                assert!((got - want).abs() <= 1e-5 * want.abs(), "{dt:?} {rows}x{cols}: {got} vs {want}");
            }
        }
        // Known value: ((3 − 1)·2)² + ((0 − 0)·5)² = 16.
        let t = |v: &[f32]| Tensor::new(v, &dev);
        assert_eq!(gradient_score(&t(&[2., 5.])?, &t(&[1., 0.])?, &t(&[3., 0.])?)?.to_scalar::<f32>()?, 16.0);
        // Clamped before squaring, as ModelOpt.
        assert_eq!(gradient_score(&t(&[1e6])?, &t(&[0.])?, &t(&[1e6])?)?.to_scalar::<f32>()?, 1e20);
        assert!(gradient_score(&t(&[1.])?, &t(&[1., 2.])?, &t(&[1.])?).is_err());
        Ok(())
    }
}
