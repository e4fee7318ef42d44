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

/// The `(scale, 1/scale)` pair of ModelOpt's eager path (`_fp8_eager`), taken when the amax has
/// more than one non-trivial dimension: `448.0 / amax` on a tensor is `reciprocal(amax) · 448`,
/// two roundings, which differ from [`scales`]' one division in the last bit when `1/amax` is
/// subnormal.
pub fn scales_eager(amax: f32) -> (f32, f32) {
    let epsilon = 1.0f32 / (1u32 << 24) as f32;
    let safe_amax = if amax <= epsilon { 1.0 } else { amax };
    let scale = (1.0 / safe_amax) * E4M3_MAX;
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

/// Fake-quantizes a slice against one amax (the slice form of [`fake_quant_tensor`]).
pub fn fake_quant_slice(values: &mut [f32], amax: f32) {
    let (scale, inv_scale) = scales(amax);
    for v in values {
        *v = fake_quant(*v, scale, inv_scale);
    }
}

/// Per output channel (`axis: 0`, `fake_e4m3fy_with_axis`): each slice along dim 0 of a
/// tensor of shape `dims` against its own max |x| (weights are max-calibrated on themselves).
pub fn fake_quant_per_channel(values: &mut [f32], dims: &[usize]) {
    let (_, row_len) = super::host::rows_of_first_dim(dims);
    super::host::for_each_chunk_amax(values, row_len, fake_quant_slice);
}

/// Per token (dynamic, `block_sizes: {-1: None}`): each row along the last dimension against
/// its own max |x|, computed at run time.
pub fn fake_quant_per_token(values: &mut [f32], dims: &[usize]) {
    let (_, cols) = super::host::rows_of_last_dim(dims);
    super::host::for_each_chunk_amax(values, cols, fake_quant_slice);
}

/// 2-D blocks of `block × block` over the last two dimensions (`block_sizes: {-1: b, -2: b}`,
/// static): each tile, partial tiles at the edges included, against its own max |x|. ModelOpt
/// pads partial tiles with zeros, which leaves their max unchanged. Its scale depends on the
/// shape of the amax tensor (`scaled_e4m3_impl`): with more than one dimension of size > 1 after
/// squeezing (e.g. a weight of more than 128 rows and 128 columns) it takes `_fp8_eager`
/// ([`scales_eager`]), otherwise the CUDA extension's division ([`scales`]).
pub fn fake_quant_2d_blocks(values: &mut [f32], dims: &[usize], block: usize) {
    let cols = dims.last().copied().unwrap_or(1).max(1);
    let rows = if dims.len() >= 2 { dims[dims.len() - 2].max(1) } else { 1 };
    let leading = dims.len().saturating_sub(2);
    let amax_dims = dims[..leading].iter().filter(|&&d| d > 1).count()
        + usize::from(rows.div_ceil(block) > 1)
        + usize::from(cols.div_ceil(block) > 1);
    let scales = if amax_dims > 1 { scales_eager } else { scales };
    for matrix in values.chunks_mut(rows * cols) {
        for r0 in (0..rows).step_by(block) {
            for c0 in (0..cols).step_by(block) {
                let (r1, c1) = ((r0 + block).min(rows), (c0 + block).min(cols));
                let amax =
                    (r0..r1).fold(0f32, |m, r| m.max(super::host::max_abs(&matrix[r * cols + c0..r * cols + c1])));
                let (scale, inv_scale) = scales(amax);
                for r in r0..r1 {
                    for v in &mut matrix[r * cols + c0..r * cols + c1] {
                        *v = fake_quant(*v, scale, inv_scale);
                    }
                }
            }
        }
    }
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

/// The per-tensor scale a deployable checkpoint stores for a calibrated `amax`: `amax / 448` in
/// f32, as ModelOpt's exporter writes `weight_scale` and `input_scale` (amax ≤ 2^-24 is taken as
/// 1, as the fake quantization above does, so that the scale is never 0).
pub fn checkpoint_scale(amax: f32) -> f32 {
    let epsilon = 1.0f32 / (1u32 << 24) as f32;
    let safe_amax = if amax <= epsilon { 1.0 } else { amax };
    safe_amax / E4M3_MAX
}

/// The E4M3FN bit pattern of a value that is already exactly representable (the output of
/// [`round_to_e4m3`]): sign, 4 exponent bits (bias 7), 3 mantissa bits; subnormals have exponent 0.
#[inline]
pub fn e4m3_bits(r: f32) -> u8 {
    let sign = if r.is_sign_negative() { 0x80 } else { 0 };
    let a = r.abs();
    if a.is_nan() {
        return 0x7f | sign;
    }
    let magnitude = if a < E4M3_MIN_NORMAL {
        // a = m · 2^-9 with m in 0..8: exact.
        (a / E4M3_SUBNORMAL_STEP) as u8
    } else {
        let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        let mantissa = ((a.to_bits() >> 20) & 7) as u8;
        (((exp + 7) as u8) << 3) | mantissa
    };
    sign | magnitude
}

/// The value of an E4M3FN bit pattern (0x7f / 0xff are NaN).
#[inline]
pub fn e4m3_value(bits: u8) -> f32 {
    let exp = ((bits >> 3) & 0xf) as i32;
    let mantissa = (bits & 7) as f32;
    let magnitude = if bits & 0x7f == 0x7f {
        f32::NAN
    } else if exp == 0 {
        mantissa * E4M3_SUBNORMAL_STEP
    } else {
        (1.0 + mantissa / 8.0) * f32::from_bits(((exp - 7 + 127) as u32) << 23)
    };
    if bits & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Quantizes weights for a checkpoint as ModelOpt's exporter does (`(w / weight_scale).to(float8_e4m3fn)`):
/// `e4m3(clamp(w / scale, ±448))`, round-to-nearest-even, the division in f32. Returns the bit
/// patterns; dequantized, each is `e4m3_value(bits) · scale`.
pub fn quantize_to_e4m3(weights: &[f32], scale: f32) -> Vec<u8> {
    use rayon::prelude::*;
    let mut out = vec![0u8; weights.len()];
    out.par_chunks_mut(1 << 16).zip(weights.par_chunks(1 << 16)).for_each(|(o, w)| {
        for (o, &w) in o.iter_mut().zip(w) {
            *o = e4m3_code(w, scale);
        }
    });
    out
}

/// One weight's checkpoint code ([`quantize_to_e4m3`]).
#[inline]
pub fn e4m3_code(w: f32, scale: f32) -> u8 {
    e4m3_bits(round_to_e4m3((w / scale).clamp(-E4M3_MAX, E4M3_MAX)))
}

/// What a served FP8 layer computes from a per-tensor `scale`, as fake quantization on any device
/// and dtype: `e4m3(clamp(x / scale, ±448)) · scale`. For weights this is exactly the checkpoint's
/// dequantized weight ([`quantize_to_e4m3`], then `· scale`); for inputs it is the static input
/// quantization of the serving kernels.
pub fn fake_quant_with_scale(x: &Tensor, scale: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&ServedFakeQuantE4M3 { scale })
}

/// One value of [`fake_quant_with_scale`]: `e4m3(clamp(x / scale, ±448)) · scale` in f32.
#[inline]
pub fn served_fake_quant(x: f32, scale: f32) -> f32 {
    round_to_e4m3((x / scale).clamp(-E4M3_MAX, E4M3_MAX)) * scale
}

/// The fused scale → saturate → round to E4M3 → rescale op.
#[derive(Debug, Clone, Copy)]
pub struct FakeQuantE4M3 {
    pub scale: f32,
    pub inv_scale: f32,
}

/// An elementwise op's CPU side: `f` in f32 over a contiguous storage (f32, f64, bf16, f16; the
/// narrower ones widened exactly), each result rounded back to the storage's dtype.
fn map_cpu(name: &str, storage: &CpuStorage, layout: &Layout, f: impl Fn(f32) -> f32) -> Result<(CpuStorage, Shape)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name}: input must be contiguous");
    };
    fn map<T: Copy>(xs: &[T], f: impl Fn(f32) -> f32, to: impl Fn(T) -> f32, from: impl Fn(f32) -> T) -> Vec<T> {
        xs.iter().map(|&x| from(f(to(x)))).collect()
    }
    let out = match storage {
        CpuStorage::F32(v) => CpuStorage::F32(map(&v[start..end], f, |x| x, |y| y)),
        CpuStorage::F64(v) => CpuStorage::F64(map(&v[start..end], f, |x| x as f32, |y| y as f64)),
        CpuStorage::BF16(v) => CpuStorage::BF16(map(&v[start..end], f, bf16::to_f32, bf16::from_f32)),
        CpuStorage::F16(v) => CpuStorage::F16(map(&v[start..end], f, f16::to_f32, f16::from_f32)),
        other => candle_core::bail!("{name}: unsupported dtype {:?}", other.dtype()),
    };
    Ok((out, layout.shape().clone()))
}

impl CustomOp1 for FakeQuantE4M3 {
    fn name(&self) -> &'static str {
        "fake-quant-e4m3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        map_cpu(self.name(), storage, layout, |x| fake_quant(x, self.scale, self.inv_scale))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::quant::cuda::fake_quant_e4m3(self.scale, self.inv_scale, storage, layout)
    }
}

/// A served layer's static FP8 quantization ([`served_fake_quant`]), one op (one kernel on CUDA).
#[derive(Debug, Clone, Copy)]
pub struct ServedFakeQuantE4M3 {
    pub scale: f32,
}

impl CustomOp1 for ServedFakeQuantE4M3 {
    fn name(&self) -> &'static str {
        "served-fake-quant-e4m3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        map_cpu(self.name(), storage, layout, |x| served_fake_quant(x, self.scale))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::quant::cuda::served_fake_quant_e4m3(self.scale, storage, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
    fn served_quantization_is_one_op_equal_to_divide_round_multiply() {
        let scale = 0.0123f32;
        let xs: Vec<f32> = (-3000..3000).map(|i| i as f32 * 0.00377).chain([0.0, -0.0, 1e9, -1e9]).collect();
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let chain = {
                let s = Tensor::new(scale, &Device::Cpu).unwrap();
                let q = x.to_dtype(DType::F32).unwrap().broadcast_div(&s).unwrap();
                let q = q.apply_op1_no_bwd(&FakeQuantE4M3 { scale: 1.0, inv_scale: 1.0 }).unwrap();
                q.broadcast_mul(&s).unwrap().to_dtype(dtype).unwrap()
            };
            let fused = fake_quant_with_scale(&x, scale).unwrap();
            let bits = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(bits(&fused), bits(&chain), "{dtype:?}");
            if dtype == DType::F32 {
                assert_eq!(bits(&fused).last().copied(), Some(-448.0 * scale), "saturates");
            }
        }
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

    #[test]
    fn bit_patterns_round_trip() {
        for bits in 0u8..=255 {
            let v = e4m3_value(bits);
            if bits & 0x7f == 0x7f {
                assert!(v.is_nan());
                continue;
            }
            // -0 and +0 keep their sign bit.
            assert_eq!(e4m3_bits(v), bits, "{bits:#04x} = {v}");
        }
        // Independent decoding of every finite pattern (all_e4m3_values walks them in order).
        let mut decoded = Vec::new();
        for bits in 0u8..=0x7e {
            decoded.push(e4m3_value(bits));
            decoded.push(e4m3_value(bits | 0x80));
        }
        assert_eq!(decoded, all_e4m3_values());
    }

    #[test]
    fn checkpoint_weights_dequantize_to_the_fake_quant_of_their_scale() -> Result<()> {
        let w: Vec<f32> = (0..4096).map(|i| ((i as f32) * 0.731).sin() * 0.05).collect();
        let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = checkpoint_scale(amax);
        assert_eq!(scale, amax / 448.0);
        let bits = quantize_to_e4m3(&w, scale);
        let t = Tensor::from_vec(w.clone(), w.len(), &candle_core::Device::Cpu)?;
        let fake = fake_quant_with_scale(&t, scale)?.to_vec1::<f32>()?;
        for ((b, f), x) in bits.iter().zip(&fake).zip(&w) {
            assert_eq!(e4m3_value(*b) * scale, *f, "{x}");
            // Each code is the nearest E4M3 value of w / scale, computed here in f64.
            let exact = (*x as f64) / (scale as f64);
            let err = (e4m3_value(*b) as f64 - exact).abs();
            let neighbours = [-1i32, 1].map(|d| e4m3_value((*b as i32 + d).clamp(0, 255) as u8));
            for n in neighbours.iter().filter(|n| n.is_finite() && n.signum() == e4m3_value(*b).signum()) {
                assert!(err <= (*n as f64 - exact).abs() + 1e-12, "{x}: {} vs neighbour {n}", e4m3_value(*b));
            }
        }
        // The largest magnitude maps to ±448 exactly.
        let i = w.iter().position(|v| v.abs() == amax).unwrap();
        assert_eq!(e4m3_value(bits[i]).abs(), 448.0);
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
