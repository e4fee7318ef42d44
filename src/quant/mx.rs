//! MXFP8 and MXFP4 fake quantization (ModelOpt `MXFP8_DEFAULT_CFG`, `MXFP4_DEFAULT_CFG`), as
//! ModelOpt 0.47 computes it on CUDA: the extension kernel `amax_and_convert_kernel`
//! (`modelopt/torch/kernels/quantization/gemm/tensor_quant_mx.cu:240-294`), built with
//! `--use_fast_math` (`quantization/extensions.py:69`), reached from
//! `TensorQuantizer._fake_quantize` (`nn/modules/tensor_quantizer.py:898-920`, no amax for MX
//! formats) via `tensor_quant._dynamic_block_quantize_impl` (`tensor_quant.py:169-191`,
//! `fused_amax_convert(x, 32, E4M3|E2M1, E8M0, None)`).
//!
//! Configs (`modelopt_recipes/configs/numerics/mxfp8.yaml`, `mxfp4.yaml`): `num_bits: e4m3` or
//! `e2m1`, `block_sizes: {-1: 32, type: dynamic, scale_bits: e8m0}`, no calibration; weights and
//! inputs are both quantized dynamically. Blocks of 32 run along the last dim from each row's
//! start; a partial last block is zero-padded (`tensor_quant_mx.cu:277`).
//!
//! ```text
//! amax  = max over the block of min(|x|, FLT_MAX)        .cu:190-201  (inf counts as FLT_MAX)
//! if amax == 0 or NaN:  scale = unscale = 1              .cu:142-143
//! else:
//!   ratio = amax ⊘ dmax           dmax = 448 (E4M3) | 6 (E2M1)            .cu:114
//!   e     = ceil(log2(ratio)) read from ratio's bits:                     .cu:125-131
//!           biased_exp - 127 if the significand is 0 (a power of two), else biased_exp - 126
//!   scale = 2^-e, unscale = 2^e                                           .cu:133-134
//! y = sign(x) · elem(|x| · scale) · unscale               .cu:36-55
//!   elem = E4M3: RNE, saturating to ±448, NaN → NaN      tensor_quant_mx.h:72-74 (__nv_fp8_e4m3)
//!        | E2M1: ≤0.25→0 <0.75→0.5 ≤1.25→1 <1.75→1.5 ≤2.5→2 <3.5→3 ≤5→4 else 6 (ties to even,
//!                saturating; inf and NaN → 6)         tensor_quant_mx.h:42-43, 104-141
//! ```
//! The result (f32) is rounded once to the input dtype; MX values have at most 4 significant
//! bits, so that rounding is exact unless the result leaves the dtype's range.
//!
//! What `--use_fast_math` and the kernel's C++ imply, modelled here and matched bit for bit on an
//! H200 (nvcc 13.0, a copy of the kernel built with ModelOpt's flags; the PTX has
//! `div.approx.ftz.f32` and `abs.ftz.f32`):
//! - `⊘` is an approximate division (`-prec-div=false`), modelled as `amax · RN(1/dmax)`. For
//!   bf16 inputs this equals IEEE division wherever it matters (an exact power-of-two ratio stays
//!   exact); for f32 inputs a ratio a few ulp above a power of two may round down to it, giving
//!   the floor instead of the ceil (the kernel's own TODO, .cu:106-108, notes the same for RNE);
//! - flush-to-zero (`-ftz=true`): subnormal f32 inputs, ratios and results are flushed to ±0
//!   (so a subnormal x is quantized like a zero, sign included);
//! - the sign: `int sign;` is only assigned for `x < 0` and `x > 0` (.cu:39-43), so for ±0 and
//!   NaN it is uninitialized. LLVM folds the first assignment's undefined arm to -1, making it
//!   `sign = x > 0 ? 1 : -1`: zeros (both signs) come out as `-0.0`, and NaN as NaN (E4M3) or
//!   `-6 · unscale` (E2M1).
//!
//! ModelOpt's real-quantization path (`qtensor/mxfp8_tensor.py:43-66`, `mxfp4_tensor.py:72-75`,
//! used for export, not for fake quantization) computes the exponent as `ceil(log2(amax/dmax))`
//! with torch's IEEE division and clamps it to [-127, 127]; it agrees with the kernel except for
//! the ratio-rounding and subnormal cases above. ModelOpt has no CPU fake-quant path for MX.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::format::{Format, WeightStats};
use super::fp8;
use super::nvfp4;

/// Elements per MX block (along the last dim).
pub const BLOCK_SIZE: usize = 32;

/// The element type of an MX format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MxElement {
    /// FP8 E4M3 (MXFP8).
    E4M3,
    /// FP4 E2M1 (MXFP4).
    E2M1,
}

impl MxElement {
    /// Largest magnitude of the element type (`get_format_max`, tensor_quant_mx.h:189-213).
    pub fn max(self) -> f32 {
        match self {
            MxElement::E4M3 => fp8::E4M3_MAX,
            MxElement::E2M1 => nvfp4::E2M1_MAX,
        }
    }

    /// Rounds a non-negative scaled magnitude to the element grid (`convert_to_types`).
    #[inline]
    pub fn round(self, a: f32) -> f32 {
        match self {
            // __nv_fp8_e4m3(float): RNE with __NV_SATFINITE (inf → 448), NaN stays NaN.
            MxElement::E4M3 => {
                if a.is_nan() {
                    a
                } else {
                    fp8::round_to_e4m3(a.min(fp8::E4M3_MAX))
                }
            }
            // convert_to_table_types: inf and NaN saturate to 6; the table matches NVFP4's.
            MxElement::E2M1 => {
                if a.is_nan() || a.is_infinite() {
                    nvfp4::E2M1_MAX
                } else {
                    nvfp4::round_e2m1_magnitude(a)
                }
            }
        }
    }
}

/// Flush-to-zero of a subnormal f32 (the kernel is built with `--use_fast_math`).
#[inline]
fn ftz(v: f32) -> f32 {
    if v.is_subnormal() {
        0f32.copysign(v)
    } else {
        v
    }
}

/// The unbiased E8M0 exponent `e` (`unscale = 2^e`) for a positive, finite, non-zero block amax:
/// `ceil(log2(amax / dmax))` read off the bits of the f32 ratio (`compute_scale_e8m0_NV`).
pub fn e8m0_exponent(amax: f32, element: MxElement) -> i32 {
    let ratio = ftz(amax * (1.0 / element.max()));
    let bits = ratio.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32;
    let significand = bits & 0x7f_ffff;
    if significand > 0 && exp != 0xfe && !(exp == 0 && significand <= 0x40_0000) {
        exp - 126
    } else {
        exp - 127
    }
}

/// `(scale, unscale)` for a block amax: powers of two, or `(1, 1)` for amax 0, inf or NaN
/// (`compute_scale`, tensor_quant_mx.cu:141-156).
pub fn scales(amax: f32, element: MxElement) -> (f32, f32) {
    if amax == 0.0 || !amax.is_finite() {
        return (1.0, 1.0);
    }
    let e = e8m0_exponent(amax, element);
    // ldexpf(1, ±e); e is in [-127, 127], so 2^±e is a normal f32 except 2^-127 (flushed).
    (ftz(pow2(-e)), ftz(pow2(e)))
}

/// 2^e as f32 for e in [-149, 127].
fn pow2(e: i32) -> f32 {
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (e + 149))
    }
}

/// Fake-quantizes one value with its block's `(scale, unscale)`.
#[inline]
pub fn fake_quant(x: f32, scale: f32, unscale: f32, element: MxElement) -> f32 {
    let a = ftz(ftz(x.abs()) * scale);
    let r = ftz(element.round(a) * unscale);
    // `sign` is -1 unless x > 0 (the uninitialized-variable fold, see the module docs); the
    // comparison flushes a subnormal x to 0 first.
    if ftz(x) > 0.0 {
        r
    } else {
        -r
    }
}

/// Fake-quantizes one row (any length; blocks of 32 from its start, the last one may be short).
pub fn fake_quant_row(row: &[f32], element: MxElement, out: &mut [f32]) {
    assert_eq!(row.len(), out.len(), "mx: row and output lengths differ");
    for (x, o) in row.chunks(BLOCK_SIZE).zip(out.chunks_mut(BLOCK_SIZE)) {
        // fmaxf reduction of `|x| > FLT_MAX ? FLT_MAX : |x|` (NaN passes the clamp, and fmaxf
        // ignores it); an all-NaN block keeps NaN, which gives scale 1 like amax 0, so starting
        // from 0 changes nothing.
        let amax = x.iter().fold(0f32, |m, v| {
            let a = ftz(v.abs());
            m.max(if a > f32::MAX { f32::MAX } else { a })
        });
        let (scale, unscale) = scales(amax, element);
        for (x, o) in x.iter().zip(o.iter_mut()) {
            *o = fake_quant(*x, scale, unscale, element);
        }
    }
}

/// Fake-quantizes a row-major matrix of `cols` columns (`values.len()` a multiple of `cols`) to
/// an MX format, in f32, writing `out`. Rows run in parallel.
pub fn fake_quant_rows(values: &[f32], cols: usize, element: MxElement, out: &mut [f32]) {
    assert!(cols > 0 && values.len() % cols == 0, "mx: {} values are not rows of {cols}", values.len());
    assert_eq!(values.len(), out.len(), "mx: input and output lengths differ");
    out.par_chunks_mut(cols).zip(values.par_chunks(cols)).for_each(|(o, x)| fake_quant_row(x, element, o));
}

/// MX fake quantization of a tensor (f32, bf16 or f16, CPU) along its last dim; same shape and
/// dtype.
pub fn fake_quant_tensor(x: &Tensor, element: MxElement) -> Result<Tensor> {
    if !x.device().is_cpu() {
        candle_core::bail!("mx fake quantization has no CUDA kernel yet: move the tensor to the CPU");
    }
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1_no_bwd(&FakeQuantMx { element })
}

/// The MX fake-quantization op (CPU only for now).
#[derive(Debug, Clone, Copy)]
pub struct FakeQuantMx {
    pub element: MxElement,
}

impl CustomOp1 for FakeQuantMx {
    fn name(&self) -> &'static str {
        "fake-quant-mx"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        nvfp4::map_rows_cpu(self.name(), storage, layout, |x, cols, out| fake_quant_rows(x, cols, self.element, out))
    }
}

/// MXFP8 weights and inputs, both dynamic: ModelOpt's `MXFP8_DEFAULT_CFG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mxfp8;

impl Format for Mxfp8 {
    fn name(&self) -> &'static str {
        "MXFP8"
    }
    fn modelopt_name(&self) -> &'static str {
        "MXFP8_DEFAULT_CFG"
    }
    fn true_bits(&self) -> f64 {
        8.0 + 8.0 / 32.0
    }
    fn effective_bits(&self) -> f64 {
        // No `effective_bits` in numerics/mxfp8.yaml: algorithms.py:estimate_quant_compression
        // falls back to (E + M + 1) = 4 + 3 + 1 (the E8M0 scale is not counted).
        8.0
    }
    fn weight_description(&self) -> String {
        "mxfp8: e4m3, dynamic 32-blocks along the last dim, e8m0 scale 2^ceil(log2(amax/448))".into()
    }
    fn input_description(&self) -> String {
        self.weight_description()
    }
    fn quantize_weight(&self, weight: &Tensor, _stats: &WeightStats) -> Result<Tensor> {
        super::host::on_host(weight, |w| fake_quant_tensor(w, MxElement::E4M3))
    }
    fn quantize_input(&self, x: &Tensor, _input_amax: f32) -> Result<Tensor> {
        super::host::on_host(x, |x| fake_quant_tensor(x, MxElement::E4M3))
    }
}

/// MXFP4 weights and inputs, both dynamic: ModelOpt's `MXFP4_DEFAULT_CFG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mxfp4;

impl Format for Mxfp4 {
    fn name(&self) -> &'static str {
        "MXFP4"
    }
    fn modelopt_name(&self) -> &'static str {
        "MXFP4_DEFAULT_CFG"
    }
    fn true_bits(&self) -> f64 {
        4.0 + 8.0 / 32.0
    }
    fn effective_bits(&self) -> f64 {
        // As MXFP8: (E + M + 1) = 2 + 1 + 1; ModelOpt does not count the shared scale.
        4.0
    }
    fn weight_description(&self) -> String {
        "mxfp4: e2m1, dynamic 32-blocks along the last dim, e8m0 scale 2^ceil(log2(amax/6))".into()
    }
    fn input_description(&self) -> String {
        self.weight_description()
    }
    fn quantize_weight(&self, weight: &Tensor, _stats: &WeightStats) -> Result<Tensor> {
        super::host::on_host(weight, |w| fake_quant_tensor(w, MxElement::E2M1))
    }
    fn quantize_input(&self, x: &Tensor, _input_amax: f32) -> Result<Tensor> {
        super::host::on_host(x, |x| fake_quant_tensor(x, MxElement::E2M1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn e8m0_exponent_is_the_ceil_of_log2_of_amax_over_dmax() {
        use MxElement::{E2M1, E4M3};
        // Exact powers of two keep their exponent; anything above goes up one.
        assert_eq!(e8m0_exponent(448.0, E4M3), 0);
        assert_eq!(e8m0_exponent(449.0, E4M3), 1);
        assert_eq!(e8m0_exponent(224.0, E4M3), -1);
        assert_eq!(e8m0_exponent(447.0, E4M3), 0);
        assert_eq!(e8m0_exponent(1.75, E4M3), -8); // 1.75/448 = 2^-8
        assert_eq!(e8m0_exponent(6.0, E2M1), 0);
        assert_eq!(e8m0_exponent(6.5, E2M1), 1);
        assert_eq!(e8m0_exponent(1.5, E2M1), -2); // 1.5/6 = 0.25
        assert_eq!(e8m0_exponent(1.5 * 2f32.powi(-100), E2M1), -102);
        assert_eq!(e8m0_exponent(f32::MAX, E2M1), 126); // FLT_MAX/6 ≈ 2^125.4
                                                        // A ratio below the normal range is flushed to 0: exponent -127 (ldexp gives 2^127 and 0).
        assert_eq!(e8m0_exponent(2f32.powi(-125), E2M1), -127);
        assert_eq!(scales(2f32.powi(-125), E2M1), (2f32.powi(127), 0.0));
        assert_eq!(scales(0.0, E4M3), (1.0, 1.0));
        assert_eq!(scales(f32::NAN, E2M1), (1.0, 1.0));
        assert_eq!(scales(12.0, E2M1), (0.5, 2.0));
    }

    #[test]
    fn mxfp4_block_ties_zeros_and_scale() {
        #[rustfmt::skip]
        let x = [
            // block 0, amax 6: scale 1
            0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0,
            0.0, -0.0, 1e-40, -1e-40, 0.1, 0.3, 7e-3, -0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            // block 1, amax 12: scale 1/2, unscale 2
            12.0, 1.5, 0.5, -5.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            // block 2 (short): all zero → scale 1
            0.0, -0.0,
        ];
        let z = -0.0; // zero inputs come out negative (see the module docs)
        #[rustfmt::skip]
        let want = [
            0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, z, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -6.0,
            // 0.1 → 0; 0.3 → 0.5; 7e-3 → 0 (positive x: +0); -0.3 → -0.5; subnormals act as zeros
            z, z, z, z, 0.0, 0.5, 0.0, -0.5, z, z, z, z, z, z, z, z,
            // 12/2 = 6; 0.75 → 1 → 2; 0.25 → 0; 2.5 → 2 → 4; 5 → 4 → 8
            12.0, 2.0, 0.0, -4.0, 8.0, z, z, z, z, z, z, z, z, z, z, z,
            z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z,
            z, z,
        ];
        let mut out = vec![0f32; x.len()];
        fake_quant_rows(&x, x.len(), MxElement::E2M1, &mut out);
        assert_eq!(bits(&out), bits(&want), "{out:?}");
    }

    #[test]
    fn mxfp8_rounding_saturation_subnormals_and_specials() {
        let mut x = vec![0f32; 32 * 3];
        // block 0, amax 448 → scale 1. In [16, 32) the E4M3 step is 2: 17 ties to 16 (even
        // mantissa), 19 to 20. Subnormal step 2^-9: 2^-10 ties to 0, 3·2^-10 to 2·2^-9.
        x[..8].copy_from_slice(&[448.0, 17.0, 19.0, -17.0, 2f32.powi(-10), 3.0 * 2f32.powi(-10), 0.001, 300.0]);
        // block 1, amax 449 → exponent 1: 449/2 = 224.5 → 224 (step 16) → 448; 100/2 = 50 → 48 (step 4) → 96.
        x[32..35].copy_from_slice(&[449.0, -100.0, 1.0]);
        // block 2: inf is clamped to FLT_MAX for the amax (exponent 120); inf stays inf
        // (448 · 2^120 overflows), finite values vanish; NaN stays NaN.
        x[64..68].copy_from_slice(&[f32::INFINITY, 1.0, f32::NEG_INFINITY, f32::NAN]);
        let mut out = vec![0f32; x.len()];
        fake_quant_rows(&x, 32, MxElement::E4M3, &mut out);
        assert_eq!(&out[..8], &[448.0, 16.0, 20.0, -16.0, 0.0, 2f32.powi(-8), 2f32.powi(-9), 288.0]);
        assert_eq!(out[8].to_bits(), (-0.0f32).to_bits());
        assert_eq!(&out[32..35], &[448.0, -96.0, 1.0]);
        assert_eq!(&out[64..67], &[f32::INFINITY, 0.0, f32::NEG_INFINITY]);
        assert!(out[67].is_nan());
        // MXFP4 with inf and NaN: NaN → -6·unscale; inf → 6·2^126 overflows to inf.
        let x = [f32::NAN, 1.0, -3.0, 0.0];
        let mut out = [0f32; 4];
        fake_quant_rows(&x, 4, MxElement::E2M1, &mut out);
        // amax 3 → exponent -1: 1/0.5 = 2 → 2·0.5 = 1; 3 → 6 → 3; NaN → -6·0.5
        assert_eq!(bits(&out), bits(&[-3.0, 1.0, -3.0, -0.0]));
        let x = [f32::INFINITY, 1.0];
        fake_quant_rows(&x, 2, MxElement::E2M1, &mut out[..2]);
        assert_eq!(&out[..2], &[f32::INFINITY, 0.0]);
    }

    #[test]
    fn rows_restart_blocks_and_tensor_op_matches_slices() -> Result<()> {
        // Two rows of 40: blocks [0, 32) and [32, 40) in each row.
        let xs: Vec<f32> = (0..80).map(|i| ((i as f32) * 0.61).cos() * if i % 40 >= 32 { 0.01 } else { 5.0 }).collect();
        for element in [MxElement::E4M3, MxElement::E2M1] {
            let mut rows = vec![0f32; 80];
            fake_quant_rows(&xs, 40, element, &mut rows);
            let mut one = vec![0f32; 8];
            fake_quant_row(&xs[72..80], element, &mut one);
            assert_eq!(&rows[72..80], &one[..]);
            let t = Tensor::from_vec(xs.clone(), (2, 40), &Device::Cpu)?;
            assert_eq!(fake_quant_tensor(&t, element)?.flatten_all()?.to_vec1::<f32>()?, rows);
            let tb = t.to_dtype(DType::BF16)?;
            let wide = tb.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut want = vec![0f32; 80];
            fake_quant_rows(&wide, 40, element, &mut want);
            let got = fake_quant_tensor(&tb, element)?;
            assert_eq!(got.dtype(), DType::BF16);
            // MX values have at most 4 significant bits: exact in bf16.
            assert_eq!(got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, want);
        }
        Ok(())
    }

    #[test]
    fn formats_are_wired_by_modelopt_names() -> Result<()> {
        let x = Tensor::new(&[[0.3f32, -2.0, 7.0, 0.01]], &Device::Cpu)?;
        let stats = crate::quant::WeightStats::of(&x)?;
        for (name, want, bits, element) in [
            ("MXFP8", "MXFP8", 8.0, MxElement::E4M3),
            ("mxfp8_default_cfg", "MXFP8", 8.0, MxElement::E4M3),
            ("MXFP4", "MXFP4", 4.0, MxElement::E2M1),
            ("MXFP4_DEFAULT_CFG", "MXFP4", 4.0, MxElement::E2M1),
        ] {
            let f = crate::quant::format_by_name(name).unwrap();
            assert_eq!((f.name(), f.effective_bits()), (want, bits));
            let q = fake_quant_tensor(&x, element)?.to_vec2::<f32>()?;
            assert_eq!(f.quantize_weight(&x, &stats)?.to_vec2::<f32>()?, q);
            assert_eq!(f.quantize_input(&x, 123.0)?.to_vec2::<f32>()?, q);
        }
        Ok(())
    }
}
