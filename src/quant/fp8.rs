//! FP8 E4M3 fake quantization, exactly as ModelOpt computes it (`tensor_quant._fp8_eager` on CPU,
//! `fake_e4m3fy` on CUDA):
//!
//! ```text
//! amax' = 1 if amax <= 2^-24 else amax        (all in f32)
//! s     = 448 / amax'
//! q     = e4m3fn(clamp(x·s, -448, 448))       round-to-nearest-even
//! y     = f32(q) · (1/s)                      then cast back to the compute dtype
//! ```
//! This is the one home of FP8 numerics: the CPU path below and the CUDA kernel
//! (`kernels/quant.cu`, feature `cuda`) implement the same arithmetic.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// Largest finite E4M3FN value.
pub const E4M3_MAX: f32 = 448.0;

/// Smallest normal E4M3 magnitude, 2^-6; below it the spacing is constant (subnormals).
const E4M3_MIN_NORMAL: f32 = 1.0 / 64.0;
/// Spacing of E4M3 subnormals, 2^-9.
const E4M3_SUBNORMAL_STEP: f32 = 1.0 / 512.0;

/// The `(scale, 1/scale)` pair ModelOpt derives from an amax, both in f32.
pub fn scales(amax: f32) -> (f32, f32) {
    let epsilon = 1.0f32 / (1u32 << 24) as f32;
    let safe_amax = if amax <= epsilon { 1.0 } else { amax };
    let scale = E4M3_MAX / safe_amax;
    (scale, 1.0 / scale)
}

/// Rounds an f32 to the nearest E4M3FN value (ties to even). `v` must already be within ±448
/// (callers clamp first); NaN stays NaN.
#[inline]
pub fn round_to_e4m3(v: f32) -> f32 {
    let a = v.abs();
    if !a.is_finite() {
        return v;
    }
    // Spacing of representable values around `a`: 2^(e-3) for normals (3 mantissa bits).
    let step = if a < E4M3_MIN_NORMAL {
        E4M3_SUBNORMAL_STEP
    } else {
        let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        f32::from_bits(((exp - 3 + 127) as u32) << 23)
    };
    // a/step and r·step are exact: both are power-of-two scalings within f32's range.
    let r = (a / step).round_ties_even() * step;
    r.copysign(v)
}

/// Fake-quantizes one f32 value with precomputed scales.
#[inline]
pub fn fake_quant(x: f32, scale: f32, inv_scale: f32) -> f32 {
    round_to_e4m3((x * scale).clamp(-E4M3_MAX, E4M3_MAX)) * inv_scale
}

/// Fake-quantizes a tensor (any float dtype, any device) against `amax`; same dtype and shape.
pub fn fake_quant_tensor(x: &Tensor, amax: f32) -> Result<Tensor> {
    let (scale, inv_scale) = scales(amax);
    x.apply_op1_no_bwd(&FakeQuantE4M3 { scale, inv_scale })
}

/// max |x| over all elements, as an f32 scalar tensor on x's device (no host sync).
///
/// Reduced in two stages (rows, then the row maxima): a single reduction over millions of
/// elements runs on one CUDA block and costs a millisecond per layer.
pub fn amax(x: &Tensor) -> Result<Tensor> {
    let last = x.dims().last().copied().unwrap_or(1).max(1);
    let rows = x.elem_count() / last;
    x.abs()?.reshape((rows, last))?.max(1)?.max(0)?.to_dtype(DType::F32)
}

/// Max calibration step: `amax[slot] = max(amax[slot], max |x|)`, in place on an f32 vector of
/// per-layer amax on x's device — one kernel per layer and sample, no allocation, no host sync.
pub fn update_amax(amax: &Tensor, slot: usize, x: &Tensor) -> Result<()> {
    if amax.dtype() != DType::F32 || amax.rank() != 1 || slot >= amax.dim(0)? {
        candle_core::bail!(
            "update_amax: need an f32 vector with slot {slot}, got {:?} {:?}",
            amax.dtype(),
            amax.shape()
        );
    }
    amax.inplace_op2(&x.contiguous()?, &AmaxUpdate { slot })
}

/// The in-place op behind [`update_amax`].
#[derive(Debug, Clone, Copy)]
pub struct AmaxUpdate {
    pub slot: usize,
}

impl candle_core::InplaceOp2 for AmaxUpdate {
    fn name(&self) -> &'static str {
        "amax-update"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (Some((a0, _)), Some((x0, x1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("amax-update: inputs must be contiguous");
        };
        fn max_abs<T: Copy>(xs: &[T], f: impl Fn(T) -> f32) -> f32 {
            xs.iter().fold(0f32, |m, &x| m.max(f(x).abs()))
        }
        let m = match s2 {
            CpuStorage::F32(v) => max_abs(&v[x0..x1], |x| x),
            CpuStorage::F64(v) => max_abs(&v[x0..x1], |x| x as f32),
            CpuStorage::BF16(v) => max_abs(&v[x0..x1], bf16::to_f32),
            CpuStorage::F16(v) => max_abs(&v[x0..x1], f16::to_f32),
            other => candle_core::bail!("amax-update: unsupported dtype {:?}", other.dtype()),
        };
        let CpuStorage::F32(acc) = s1 else { candle_core::bail!("amax-update: amax must be f32") };
        let slot = &mut acc[a0 + self.slot];
        *slot = slot.max(m);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::quant::cuda::amax_update(self.slot, s1, l1, s2, l2)
    }
}

/// The fused scale → saturate → round to E4M3 → rescale op.
#[derive(Debug, Clone, Copy)]
pub struct FakeQuantE4M3 {
    pub scale: f32,
    pub inv_scale: f32,
}

impl FakeQuantE4M3 {
    fn map<T: Copy>(&self, xs: &[T], to: impl Fn(T) -> f32, from: impl Fn(f32) -> T) -> Vec<T> {
        xs.iter().map(|&x| from(fake_quant(to(x), self.scale, self.inv_scale))).collect()
    }
}

impl CustomOp1 for FakeQuantE4M3 {
    fn name(&self) -> &'static str {
        "fake-quant-e4m3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fake-quant-e4m3: input must be contiguous");
        };
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.map(&v[start..end], |x| x, |y| y)),
            CpuStorage::F64(v) => CpuStorage::F64(self.map(&v[start..end], |x| x as f32, |y| y as f64)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.map(&v[start..end], bf16::to_f32, bf16::from_f32)),
            CpuStorage::F16(v) => CpuStorage::F16(self.map(&v[start..end], f16::to_f32, f16::from_f32)),
            other => candle_core::bail!("fake-quant-e4m3: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::quant::cuda::fake_quant_e4m3(self, storage, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every E4M3FN finite value, decoded from its 8-bit pattern independently of the rounding
    /// code above.
    fn all_e4m3_values() -> Vec<f32> {
        let mut v = Vec::new();
        for bits in 0u8..=0x7e {
            let exp = (bits >> 3) as i32;
            let man = (bits & 7) as f32;
            let mag = if exp == 0 { man / 8.0 * 2f32.powi(-6) } else { (1.0 + man / 8.0) * 2f32.powi(exp - 7) };
            v.push(mag);
            v.push(-mag);
        }
        v
    }

    #[test]
    fn representable_values_are_fixed_points() {
        for v in all_e4m3_values() {
            assert_eq!(round_to_e4m3(v), v, "{v}");
        }
        assert_eq!(*all_e4m3_values().iter().max_by(|a, b| a.total_cmp(b)).unwrap(), 448.0);
    }

    #[test]
    fn rounds_to_nearest_even() {
        let mut grid = all_e4m3_values();
        grid.sort_by(f32::total_cmp);
        grid.dedup();
        // Midpoints between neighbours go to the one with an even mantissa; points just off
        // the midpoint go to the nearer neighbour.
        for w in grid.windows(2) {
            let (lo, hi) = (w[0], w[1]);
            let mid = (lo + hi) / 2.0;
            let even = |v: f32| {
                let step = if v.abs() < E4M3_MIN_NORMAL {
                    E4M3_SUBNORMAL_STEP
                } else {
                    f32::from_bits(((((v.abs().to_bits() >> 23) & 0xff) as i32 - 127 - 3 + 127) as u32) << 23)
                };
                ((v.abs() / step) as i64) % 2 == 0
            };
            if lo != 0.0 || hi != 0.0 {
                let expect = if even(lo) { lo } else { hi };
                assert_eq!(round_to_e4m3(mid), expect, "midpoint of {lo} and {hi}");
            }
            let eps = (hi - lo) * 0.01;
            assert_eq!(round_to_e4m3(mid - eps), lo);
            assert_eq!(round_to_e4m3(mid + eps), hi);
        }
    }

    #[test]
    fn amax_update_is_a_running_max() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let acc = Tensor::zeros(3, DType::F32, &dev)?;
        let x = Tensor::new(&[[0.5f32, -3.0], [2.0, 1.0]], &dev)?;
        update_amax(&acc, 1, &x)?;
        update_amax(&acc, 1, &(x.clone() * 0.5)?)?;
        update_amax(&acc, 2, &x.to_dtype(DType::BF16)?.t()?)?;
        assert_eq!(acc.to_vec1::<f32>()?, vec![0.0, 3.0, 3.0]);
        assert_eq!(amax(&x)?.to_scalar::<f32>()?, 3.0);
        assert!(update_amax(&acc, 3, &x).is_err());
        Ok(())
    }

    #[test]
    fn saturates_and_handles_tiny_amax() {
        let (s, inv) = scales(2.0);
        assert_eq!(s, 224.0);
        assert_eq!(fake_quant(100.0, s, inv), 2.0);
        assert_eq!(fake_quant(-100.0, s, inv), -2.0);
        // amax <= 2^-24 is treated as 1
        assert_eq!(scales(0.0), (448.0, 1.0 / 448.0));
        assert_eq!(scales(1.0 / (1u32 << 24) as f32), (448.0, 1.0 / 448.0));
    }

    #[test]
    fn tensor_op_matches_scalar_path() -> Result<()> {
        let xs: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let t = Tensor::from_vec(xs.clone(), (10, 100), &candle_core::Device::Cpu)?;
        let amax = 2.5f32;
        let (s, inv) = scales(amax);
        let got = fake_quant_tensor(&t, amax)?.flatten_all()?.to_vec1::<f32>()?;
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(*g, fake_quant(*x, s, inv));
        }
        // bf16 input: computed in f32, rounded back to bf16
        let tb = t.to_dtype(DType::BF16)?;
        let gb = fake_quant_tensor(&tb, amax)?.flatten_all()?.to_vec1::<bf16>()?;
        let xb = tb.flatten_all()?.to_vec1::<bf16>()?;
        for (x, g) in xb.iter().zip(&gb) {
            assert_eq!(*g, bf16::from_f32(fake_quant(x.to_f32(), s, inv)));
        }
        Ok(())
    }

    /// candle's F8E4M3 dtype (the float8 crate) is an independent E4M3 implementation: our
    /// rounding must agree with its round-to-nearest-even cast on in-range inputs.
    #[test]
    fn agrees_with_candle_f8e4m3_cast() -> Result<()> {
        let mut state = 0x1234_5678u32;
        let xs: Vec<f32> = (0..200_000)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let u = (state as f32 / u32::MAX as f32) * 2.0 - 1.0;
                u * 448.0 * if i % 3 == 0 { 1e-3 } else { 1.0 }
            })
            .collect();
        let t = Tensor::from_vec(xs.clone(), xs.len(), &candle_core::Device::Cpu)?;
        let theirs = t.to_dtype(DType::F8E4M3)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (x, t) in xs.iter().zip(&theirs) {
            assert_eq!(round_to_e4m3(*x), *t, "{x}");
        }
        Ok(())
    }
}
