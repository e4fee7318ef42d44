//! NVFP4 fake quantization (ModelOpt `NVFP4_DEFAULT_CFG`, `W4A16_NVFP4_CFG`), as ModelOpt 0.47
//! computes it on a CUDA GPU of compute capability ≥ 8.9: the triton kernel
//! `fp4_fake_quant_block` (`modelopt/torch/kernels/quantization/gemm/fp4_kernel_hopper.py`),
//! reached from `TensorQuantizer._fake_quantize` (`nn/modules/tensor_quantizer.py:899-920`) via
//! `tensor_quant._dynamic_block_quantize_impl` (`tensor_quant.py:169-183`).
//!
//! The config (`modelopt_recipes/configs/numerics/nvfp4.yaml`): `num_bits: e2m1`,
//! `block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3}`, `effective_bits: 4.5`, max
//! calibration. The per-block amax is dynamic (each 16-block's own max, weights and inputs alike);
//! the per-tensor "global" amax is the quantizer's calibrated `_amax`: max |W| for weights, the
//! calibrated static input amax for inputs. Blocks run along the last dim, rows restart blocks;
//! a partial last block is zero-padded (the kernel's `padding_option="zero"` tile load).
//!
//! ```text
//! gs    = f32(global_amax) · f32(1/2688)               fp4_kernel_hopper.py:140  (torch CUDA
//!                                                       `t / python_scalar` multiplies by the
//!                                                       reciprocal, ATen BinaryDivTrueKernel.cu)
//! gs    = gs if gs > 0 else 1e-12                      fp4_kernel_hopper.py:74
//! bmax  = max |x| over the block (zero padding counts)  fp4_kernel_hopper.py:81
//! s     = e4m3(min(bmax ⊘ (6·gs), 448)) · gs            nvfp4_quant.py:122-125 (RNE, satfinite)
//! s     = s if s >= 1e-5 else 1                        fp4_kernel_hopper.py:84
//! q     = e2m1(|x| ⊘ s)                                fp4_kernel_hopper.py:90-92
//! y     = q·s if x >= 0 else 0 - q·s                   fp4_kernel_hopper.py:94-95
//! out   = y cast to the input dtype (RNE)              fp4_kernel_hopper.py:99
//! ```
//! `⊘` is triton's fp32 `/`, which lowers to PTX `div.full.f32` (not IEEE: at most 2 ulp; it
//! returns 5.0000005 for 4.6875/0.9375, triton-lang/triton#10661). It is modelled here as
//! `a · RN(1/b)`, which reproduces that example; see [`triton_div`]. This file matched a copy of
//! the kernel run on an H200 (triton 3.6, torch 2.11) bit for bit on 525k f32 and bf16 values,
//! specials included. All arithmetic is f32;
//! bf16/f16 inputs are widened exactly and the f32 result is rounded once to the input dtype.
//!
//! E2M1 rounding (`nvfp4_quant.py:33-63`): `≤0.25→0, <0.75→0.5, ≤1.25→1, <1.75→1.5, ≤2.5→2,
//! <3.5→3, ≤5→4, else 6` — round to nearest, ties to even, saturating at 6.
//!
//! Quirks kept on purpose (they are what the GPU computes):
//! - a block whose quantized scale is below 1e-5 (including amax 0 and blocks whose E4M3 scale
//!   underflows to 0) gets scale 1, so its values |x| ≤ 0.25 become 0: small blocks are zeroed
//!   regardless of the global scale;
//! - no output is `-0.0`: `-0.0 >= 0` holds, and triton lowers `-r` to `0 - r`, so a negative x
//!   that rounds to 0 gives `+0.0` (checked on an H200 with triton 3.6);
//! - NaN: ignored by the block max (triton's `max` is maxnum) and quantized to `-6·s` (every
//!   comparison with NaN is false, so it takes the "6" branch and the negative sign); an
//!   all-NaN full block has a NaN max, its scale becomes `min(NaN, 448) = 448` (minnum) times gs;
//! - ±inf: the block max is inf, the scale saturates at `448·gs`, and the value becomes `±6·s`.
//!
//! ModelOpt's other NVFP4 paths differ and are not followed: without triton (or below sm_89)
//! the CUDA extension `fused_amax_convert` with a global amax (`tensor_quant_mx.cu:159-183`)
//! computes the two-level scale partly in f64, multiplies by `1/scale` instead of dividing, and
//! has no 1e-5 floor; CPU tensors are rejected (`tensor_quant.py:172`, `amax must be a CUDA
//! tensor`); the export path (`qtensor/nvfp4_tensor.py`) divides by the scale with torch's IEEE
//! division.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::format::{Format, WeightStats};
use super::fp8;

/// Elements per NVFP4 block (along the last dim).
pub const BLOCK_SIZE: usize = 16;
/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;
/// `6 · 448`: the global amax this maps to an E4M3 block scale of 448.
const GLOBAL_DIVISOR: f32 = E2M1_MAX * fp8::E4M3_MAX;
/// A quantized block scale below this is replaced by 1 (`fp4_kernel_hopper.py:84`).
const MIN_BLOCK_SCALE: f32 = 1e-5;
/// Replacement for a global scale that is not positive (`fp4_kernel_hopper.py:74`).
const GLOBAL_SCALE_FLOOR: f32 = 1e-12;

/// Triton's fp32 division `a / b` (PTX `div.full.f32`), modelled as `a · RN(1/b)` in f32.
#[inline]
pub fn triton_div(a: f32, b: f32) -> f32 {
    a * (1.0 / b)
}

/// The global scale `global_amax / 2688` as ModelOpt computes it on CUDA: torch divides a CUDA
/// tensor by a Python scalar as a multiplication by `f32(1/2688)` (the reciprocal is taken in
/// f64 and rounded to f32).
#[inline]
pub fn global_scale(global_amax: f32) -> f32 {
    let inv = (1.0f64 / GLOBAL_DIVISOR as f64) as f32;
    global_amax * inv
}

/// Rounds a non-negative `|x| / scale` to the nearest E2M1 magnitude (ties to even, saturating
/// at 6); NaN gives 6, like the kernel's chain of comparisons.
#[inline]
pub fn round_e2m1_magnitude(a: f32) -> f32 {
    if a <= 0.25 {
        0.0
    } else if a < 0.75 {
        0.5
    } else if a <= 1.25 {
        1.0
    } else if a < 1.75 {
        1.5
    } else if a <= 2.5 {
        2.0
    } else if a < 3.5 {
        3.0
    } else if a <= 5.0 {
        4.0
    } else {
        6.0
    }
}

/// The dequantized per-block scale for a block amax, given [`global_scale`]: E4M3-quantized
/// relative to the global scale, floored at 1e-5 (below it: 1).
#[inline]
pub fn block_scale(block_amax: f32, global_scale: f32) -> f32 {
    // `gs > 0 ? gs : 1e-12` — a NaN global scale takes the floor too.
    let gs = if global_scale > 0.0 { global_scale } else { GLOBAL_SCALE_FLOOR };
    // minnum: a NaN block amax gives 448.
    let in_fp8_range = triton_div(block_amax, E2M1_MAX * gs).min(fp8::E4M3_MAX);
    let s = fp8::round_to_e4m3(in_fp8_range) * gs;
    if s >= MIN_BLOCK_SCALE {
        s
    } else {
        1.0
    }
}

/// Fake-quantizes one value with its block's scale `s` (from [`block_scale`]).
#[inline]
pub fn fake_quant(x: f32, s: f32) -> f32 {
    let r = round_e2m1_magnitude(triton_div(x.abs(), s)) * s;
    // Triton negates as `0 - r`, so a negative x that rounds to 0 gives +0, not -0.
    if x >= 0.0 {
        r
    } else {
        0.0 - r
    }
}

/// Fake-quantizes one row (any length; blocks of 16 from its start, the last one may be short).
pub fn fake_quant_row(row: &[f32], global_scale: f32, out: &mut [f32]) {
    assert_eq!(row.len(), out.len(), "nvfp4: row and output lengths differ");
    for (x, o) in row.chunks(BLOCK_SIZE).zip(out.chunks_mut(BLOCK_SIZE)) {
        // A full block starts its max from its first element (an all-NaN block keeps NaN); a
        // short one also sees the kernel's zero padding.
        let init = if x.len() == BLOCK_SIZE { x[0].abs() } else { 0.0 };
        let bmax = x.iter().fold(init, |m, v| m.max(v.abs()));
        let s = block_scale(bmax, global_scale);
        for (x, o) in x.iter().zip(o.iter_mut()) {
            *o = fake_quant(*x, s);
        }
    }
}

/// Fake-quantizes a row-major matrix of `cols` columns (`values.len()` a multiple of `cols`)
/// against a per-tensor `global_amax`, in f32, writing `out`. Rows run in parallel.
pub fn fake_quant_rows(values: &[f32], cols: usize, global_amax: f32, out: &mut [f32]) {
    fake_quant_rows_scaled(values, cols, global_scale(global_amax), out)
}

/// [`fake_quant_rows`] given the global scale itself (`global_scale(amax)`, the `input_scale` a
/// checkpoint stores).
pub fn fake_quant_rows_scaled(values: &[f32], cols: usize, global_scale: f32, out: &mut [f32]) {
    assert!(cols > 0 && values.len() % cols == 0, "nvfp4: {} values are not rows of {cols}", values.len());
    assert_eq!(values.len(), out.len(), "nvfp4: input and output lengths differ");
    out.par_chunks_mut(cols).zip(values.par_chunks(cols)).for_each(|(o, x)| fake_quant_row(x, global_scale, o));
}

/// NVFP4 fake quantization of a tensor (f32, bf16 or f16, CPU or CUDA) along its last dim; same
/// shape and dtype.
pub fn fake_quant_tensor(x: &Tensor, global_amax: f32) -> Result<Tensor> {
    fake_quant_tensor_with_global_scale(x, global_scale(global_amax))
}

/// [`fake_quant_tensor`] given the global scale itself (a checkpoint's `input_scale`).
pub fn fake_quant_tensor_with_global_scale(x: &Tensor, global_scale: f32) -> Result<Tensor> {
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1_no_bwd(&FakeQuantNvfp4 { global_scale })
}

/// Row-wise fake quantization of a contiguous CPU storage: widen to f32, `f`, round back.
pub(crate) fn map_rows_cpu(
    name: &str,
    storage: &CpuStorage,
    layout: &Layout,
    f: impl Fn(&[f32], usize, &mut [f32]),
) -> Result<(CpuStorage, Shape)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name}: input must be contiguous");
    };
    let cols = layout.shape().dims().last().copied().unwrap_or(1);
    fn run<T: Copy + Send + Sync>(
        xs: &[T],
        cols: usize,
        to: impl Fn(T) -> f32 + Sync + Send,
        from: impl Fn(f32) -> T + Sync + Send,
        f: impl Fn(&[f32], usize, &mut [f32]),
    ) -> Vec<T> {
        let wide: Vec<f32> = xs.par_iter().map(|&x| to(x)).collect();
        let mut out = vec![0f32; wide.len()];
        f(&wide, cols, &mut out);
        out.into_par_iter().map(from).collect()
    }
    let out = match storage {
        CpuStorage::F32(v) => CpuStorage::F32(run(&v[start..end], cols, |x| x, |y| y, f)),
        CpuStorage::BF16(v) => CpuStorage::BF16(run(&v[start..end], cols, bf16::to_f32, bf16::from_f32, f)),
        CpuStorage::F16(v) => CpuStorage::F16(run(&v[start..end], cols, f16::to_f32, f16::from_f32, f)),
        other => candle_core::bail!("{name}: unsupported dtype {:?} (f32, bf16, f16)", other.dtype()),
    };
    Ok((out, layout.shape().clone()))
}

/// The NVFP4 fake-quantization op: rows in parallel on the CPU, one CUDA thread per 16-block.
#[derive(Debug, Clone, Copy)]
pub struct FakeQuantNvfp4 {
    /// `global_scale(global_amax)`.
    pub global_scale: f32,
}

impl CustomOp1 for FakeQuantNvfp4 {
    fn name(&self) -> &'static str {
        "fake-quant-nvfp4"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        map_rows_cpu(self.name(), storage, layout, |x, cols, out| {
            fake_quant_rows_scaled(x, cols, self.global_scale, out)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::quant::cuda::fake_quant_nvfp4(self.global_scale, storage, layout)
    }
}

// The checkpoint encoding: what ModelOpt 0.47's exporter writes for an NVFP4 layer
// (`qtensor/nvfp4_tensor.py` `NVFP4QTensor`, reached from `export/unified_export_hf.py`
// `_export_quantized_weight`), as it runs on CUDA — the only device ModelOpt's NVFP4 runs on:
//
//   weight_scale_2 = amax_w ⊗ f32(1/2688)          `_amax.float() / (6 · 448)`, a CUDA tensor by a
//   input_scale    = amax_in ⊗ f32(1/2688)         Python scalar: [`global_scale`]
//   weight_scale   = e4m3(clamp(bmax / RN(6 · weight_scale_2), 2^-9, 448)), 0 → 1 before the clamp
//   q              = e2m1_code(w / RN(f32(weight_scale) · weight_scale_2))
//   weight         = q[2j] | q[2j+1] << 4          uint8, half the columns
//
// Unlike the fake quantization above, both divisions are IEEE (tensor by tensor); a negative
// value that rounds to 0 keeps its sign bit (code 8); the block scale has no 1e-5 floor.

/// The eight E2M1 magnitudes, in code order.
const E2M1_MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The E2M1 code of a scaled value as ModelOpt's `_cast_fp4`: sign bit (x < 0) << 3 | the index
/// of the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (ties to even, saturating; NaN gives 6).
#[inline]
pub fn e2m1_code(x: f32) -> u8 {
    let magnitude = round_e2m1_magnitude(x.abs());
    // round_e2m1_magnitude returns exactly one of the eight magnitudes.
    let index = E2M1_MAGNITUDES.iter().position(|&m| m == magnitude).unwrap_or(7) as u8;
    (u8::from(x < 0.0) << 3) | index
}

/// The value of an E2M1 code.
#[inline]
pub fn e2m1_value(code: u8) -> f32 {
    let m = E2M1_MAGNITUDES[(code & 7) as usize];
    if code & 8 != 0 {
        -m
    } else {
        m
    }
}

/// The E4M3 block scale code of one 16-block's amax (exporter arithmetic, see above).
#[inline]
pub fn checkpoint_block_scale(block_amax: f32, weight_scale_2: f32) -> u8 {
    let s = block_amax / (E2M1_MAX * weight_scale_2);
    let s = if s == 0.0 { 1.0 } else { s };
    // torch's clamp propagates NaN; the e4m3 cast keeps it NaN.
    let s = if s.is_nan() { s } else { s.clamp(1.0 / 512.0, fp8::E4M3_MAX) };
    fp8::e4m3_bits(fp8::round_to_e4m3(s))
}

/// One NVFP4 layer as the checkpoint stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    /// Two E2M1 codes per byte (`[rows, cols / 2]`, the even column in the low nibble).
    pub packed: Vec<u8>,
    /// E4M3 block scale codes (`[rows, cols / 16]`).
    pub block_scales: Vec<u8>,
}

/// Encodes a row-major weight of `cols` columns (a multiple of 16) as ModelOpt's exporter does,
/// given its `weight_scale_2` ([`global_scale`] of its — possibly fused — amax). Rows run in
/// parallel.
pub fn encode_weight(w: &[f32], cols: usize, weight_scale_2: f32) -> PackedWeight {
    assert!(cols % BLOCK_SIZE == 0 && w.len() % cols == 0, "nvfp4: {} values are not rows of {cols}", w.len());
    let mut packed = vec![0u8; w.len() / 2];
    let mut block_scales = vec![0u8; w.len() / BLOCK_SIZE];
    packed
        .par_chunks_mut(cols / 2)
        .zip(block_scales.par_chunks_mut(cols / BLOCK_SIZE))
        .zip(w.par_chunks(cols))
        .for_each(|((packed, scales), row)| {
            for ((block, scale), out) in
                row.chunks(BLOCK_SIZE).zip(scales.iter_mut()).zip(packed.chunks_mut(BLOCK_SIZE / 2))
            {
                let bmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                *scale = checkpoint_block_scale(bmax, weight_scale_2);
                let divisor = fp8::e4m3_value(*scale) * weight_scale_2;
                for (pair, byte) in block.chunks(2).zip(out.iter_mut()) {
                    *byte = e2m1_code(pair[0] / divisor) | (e2m1_code(pair[1] / divisor) << 4);
                }
            }
        });
    PackedWeight { packed, block_scales }
}

/// The block scales alone of [`encode_weight`] (one pass of block maxima, no E2M1 codes): what
/// the checkpoint's `weight_scale` tensor holds.
pub fn encode_block_scales(w: &[f32], cols: usize, weight_scale_2: f32) -> Vec<u8> {
    assert!(cols % BLOCK_SIZE == 0 && w.len() % cols == 0, "nvfp4: {} values are not rows of {cols}", w.len());
    w.par_chunks(BLOCK_SIZE)
        .map(|block| checkpoint_block_scale(block.iter().fold(0f32, |m, v| m.max(v.abs())), weight_scale_2))
        .collect()
}

/// The weight a checkpoint's NVFP4 layer holds: `e2m1 · f32(block scale) · weight_scale_2`, as
/// ModelOpt's `NVFP4QTensor.dequantize` (and a serving kernel) computes it.
pub fn decode_weight(packed: &PackedWeight, cols: usize, weight_scale_2: f32) -> Vec<f32> {
    let mut out = vec![0f32; packed.packed.len() * 2];
    out.par_chunks_mut(cols)
        .zip(packed.packed.par_chunks(cols / 2))
        .zip(packed.block_scales.par_chunks(cols / BLOCK_SIZE))
        .for_each(|((row, codes), scales)| {
            for ((block, codes), &scale) in row.chunks_mut(BLOCK_SIZE).zip(codes.chunks(BLOCK_SIZE / 2)).zip(scales) {
                let s = fp8::e4m3_value(scale) * weight_scale_2;
                for (pair, &byte) in block.chunks_mut(2).zip(codes) {
                    pair[0] = e2m1_value(byte & 0xf) * s;
                    pair[1] = e2m1_value(byte >> 4) * s;
                }
            }
        });
    out
}

/// NVFP4 weights and inputs: ModelOpt's `NVFP4_DEFAULT_CFG`. On a CUDA tensor the numerics run
/// on the host (no kernel yet).
#[derive(Debug, Clone, Copy, Default)]
pub struct Nvfp4;

impl Format for Nvfp4 {
    fn name(&self) -> &'static str {
        "NVFP4"
    }
    fn modelopt_name(&self) -> &'static str {
        "NVFP4_DEFAULT_CFG"
    }
    fn effective_bits(&self) -> f64 {
        // `effective_bits: 4.5` in configs/numerics/nvfp4.yaml, read by
        // algorithms.py:estimate_quant_compression.
        4.5
    }
    fn weight_description(&self) -> String {
        "nvfp4: e2m1, 16-blocks along the last dim, e4m3 block scales, global amax = max|W|".into()
    }
    fn input_description(&self) -> String {
        "nvfp4: e2m1, dynamic 16-blocks, e4m3 block scales, global amax = max calibration".into()
    }
    fn quantize_weight(&self, weight: &Tensor, stats: &WeightStats) -> Result<Tensor> {
        fake_quant_tensor(weight, stats.amax)
    }
    fn quantize_input(&self, x: &Tensor, input_amax: f32) -> Result<Tensor> {
        fake_quant_tensor(x, input_amax)
    }
}

/// NVFP4 weights, unquantized inputs: ModelOpt's `W4A16_NVFP4_CFG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct W4a16Nvfp4;

impl Format for W4a16Nvfp4 {
    fn name(&self) -> &'static str {
        "W4A16_NVFP4"
    }
    fn modelopt_name(&self) -> &'static str {
        "W4A16_NVFP4_CFG"
    }
    fn quantizes_input(&self) -> bool {
        false
    }
    fn effective_bits(&self) -> f64 {
        // Same numerics file as NVFP4 (units/w4_nvfp4.yaml); the disabled input quantizer adds
        // no entry, so the minimum over entries is 4.5.
        4.5
    }
    fn weight_description(&self) -> String {
        Nvfp4.weight_description()
    }
    fn input_description(&self) -> String {
        "unquantized".into()
    }
    fn quantize_weight(&self, weight: &Tensor, stats: &WeightStats) -> Result<Tensor> {
        fake_quant_tensor(weight, stats.amax)
    }
    fn quantize_input(&self, x: &Tensor, _input_amax: f32) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// NVFP4 weights and inputs after AWQ-lite smoothing: ModelOpt's `NVFP4_AWQ_LITE_CFG`
/// (`algorithm: awq_lite`; the weight quantizer's 16-blocks are AWQ's blocks).
#[derive(Debug, Clone, Copy, Default)]
pub struct Nvfp4AwqLite;

impl Format for Nvfp4AwqLite {
    fn name(&self) -> &'static str {
        "NVFP4_AWQ_LITE"
    }
    fn modelopt_name(&self) -> &'static str {
        "NVFP4_AWQ_LITE_CFG"
    }
    fn effective_bits(&self) -> f64 {
        Nvfp4.effective_bits()
    }
    fn calibration(&self) -> super::format::Calibration {
        super::format::Calibration::AwqLite { block: Some(BLOCK_SIZE) }
    }
    fn weight_description(&self) -> String {
        format!("{}, after AWQ-lite smoothing", Nvfp4.weight_description())
    }
    fn input_description(&self) -> String {
        format!("{} (of the smoothed input)", Nvfp4.input_description())
    }
    fn quantize_weight(&self, weight: &Tensor, stats: &WeightStats) -> Result<Tensor> {
        Nvfp4.quantize_weight(weight, stats)
    }
    fn quantize_input(&self, x: &Tensor, input_amax: f32) -> Result<Tensor> {
        Nvfp4.quantize_input(x, input_amax)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn e2m1_codes_round_ties_to_even_and_keep_the_sign_as_modelopt_casts() {
        let cases = [
            (0.25, 0),
            (0.2501, 1),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
            (5.01, 7),
            (100.0, 7),
            (-0.0, 0),
            (-0.1, 8),
            (-6.0, 15),
        ];
        for (x, code) in cases {
            assert_eq!(e2m1_code(x), code, "{x}");
        }
        assert_eq!(e2m1_value(13), -3.0);
    }

    #[test]
    fn block_scales_alone_are_those_of_the_full_encoding() {
        let w: Vec<f32> =
            (0..64 * 48).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3 * (1 + i % 5) as f32).collect();
        let ws2 = global_scale(w.iter().fold(0f32, |m, v| m.max(v.abs())));
        assert_eq!(encode_block_scales(&w, 48, ws2), encode_weight(&w, 48, ws2).block_scales);
    }

    #[test]
    fn checkpoint_encoding_by_hand() {
        // Row 0: 0, 0.5, …, 7.5 with weight_scale_2 = 0.25: block scale 7.5 / (6 · 0.25) = 5 (E4M3
        // 0x4A), values / 1.25 = 0, 0.4, …, 6. Row 1: zeros, block scale 0 → 1 (0x38).
        let mut w: Vec<f32> = (0..16).map(|i| i as f32 * 0.5).collect();
        w.extend([0.0; 16]);
        let p = encode_weight(&w, 16, 0.25);
        assert_eq!(p.block_scales, [0x4A, 0x38]);
        assert_eq!(&p.packed[..8], &[0x10, 0x22, 0x43, 0x54, 0x65, 0x66, 0x76, 0x77]);
        assert_eq!(&p.packed[8..], &[0; 8]);
        let back = decode_weight(&p, 16, 0.25);
        let want = [0.0, 0.625, 1.25, 1.25, 1.875, 2.5, 2.5, 3.75, 3.75, 5.0, 5.0, 5.0, 5.0, 7.5, 7.5, 7.5];
        assert_eq!(&back[..16], &want);
        assert!(back[16..].iter().all(|&v| v == 0.0));
        // A tiny block's scale is clamped up to E4M3's smallest subnormal, 2^-9 (code 0x01).
        assert_eq!(checkpoint_block_scale(1e-12, 1.0), 0x01);
        assert_eq!(checkpoint_block_scale(1e9, 1.0), 0x7E);
    }

    /// The global amax whose global scale is exactly 1 (checked in `global_scale_is_a_reciprocal_product`).
    const UNIT_GLOBAL_AMAX: f32 = 2688.0;

    #[test]
    fn global_scale_is_a_reciprocal_product() {
        // f32(1/2688) by hand: 1/2688 = 2^-12 · 1.5238095..., 24-bit significand rounded in f64.
        let inv = (1.0f64 / 2688.0) as f32;
        assert_eq!(inv, 1.0f32 / 2688.0, "f64-then-f32 reciprocal equals the f32 one for 2688");
        // The exact product 2688 · inv fits in f64 (12 × 24 bits); round it to f32 once.
        assert_eq!(global_scale(UNIT_GLOBAL_AMAX), (2688.0f64 * inv as f64) as f32);
        assert_eq!(global_scale(UNIT_GLOBAL_AMAX), 1.0);
        assert_eq!(global_scale(0.0), 0.0);
    }

    #[test]
    fn e2m1_thresholds_round_ties_to_even_and_saturate() {
        let up = |v: f32| f32::from_bits(v.to_bits() + 1);
        let down = |v: f32| f32::from_bits(v.to_bits() - 1);
        // (midpoint, value it ties to, value below, value above)
        for (mid, tie, lo, hi) in [
            (0.25, 0.0, 0.0, 0.5),
            (0.75, 1.0, 0.5, 1.0),
            (1.25, 1.0, 1.0, 1.5),
            (1.75, 2.0, 1.5, 2.0),
            (2.5, 2.0, 2.0, 3.0),
            (3.5, 4.0, 3.0, 4.0),
            (5.0, 4.0, 4.0, 6.0),
        ] {
            assert_eq!(round_e2m1_magnitude(mid), tie, "{mid}");
            assert_eq!(round_e2m1_magnitude(down(mid)), lo, "below {mid}");
            assert_eq!(round_e2m1_magnitude(up(mid)), hi, "above {mid}");
        }
        for v in [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] {
            assert_eq!(round_e2m1_magnitude(v), v);
        }
        assert_eq!(round_e2m1_magnitude(1e30), 6.0);
        assert_eq!(round_e2m1_magnitude(f32::INFINITY), 6.0);
        assert_eq!(round_e2m1_magnitude(f32::NAN), 6.0);
    }

    #[test]
    fn block_scale_rounds_to_e4m3_and_floors() {
        // 6·RN(1/6) = 1.00000003 rounds to 1: amax 6 with gs 1 gives scale 1.
        assert_eq!(block_scale(6.0, 1.0), 1.0);
        assert_eq!(block_scale(4.5, 1.0), 0.75);
        // 6 · 1.0625 = 6.375: 1.0625 is the E4M3 midpoint of 1 and 1.125; ties to even (1).
        assert_eq!(block_scale(6.375, 1.0), 1.0);
        // 1.1875 is the midpoint of 1.125 (mantissa 001) and 1.25 (010): goes up to 1.25.
        assert_eq!(block_scale(7.125, 1.0), 1.25);
        // Saturation: 3000/6 = 500 > 448.
        assert_eq!(block_scale(3000.0, 1.0), 448.0);
        assert_eq!(block_scale(f32::INFINITY, 0.5), 224.0);
        // E4M3 subnormals (step 2^-9): 2^-8 exact; 3·2^-10 = 1.5 steps ties to 2 steps.
        assert_eq!(block_scale(6.0 * 2f32.powi(-8), 1.0), 2f32.powi(-8));
        assert_eq!(block_scale(6.0 * 3.0 * 2f32.powi(-10), 1.0), 2f32.powi(-8));
        // 2^-10 is half the smallest subnormal: ties to 0, and scale 0 is floored to 1.
        assert_eq!(block_scale(6.0 * 2f32.powi(-10), 1.0), 1.0);
        assert_eq!(block_scale(6.0 * 2f32.powi(-11), 1.0), 1.0);
        // A quantized scale below 1e-5 becomes 1, amax 0 too.
        assert_eq!(block_scale(6e-6, 1e-6), 1.0);
        assert_eq!(block_scale(0.0, 1.0), 1.0);
        // A non-positive or NaN global scale is replaced by 1e-12 (then the floor applies).
        assert_eq!(block_scale(6.0, 0.0), 1.0);
        assert_eq!(block_scale(6.0, f32::NAN), 1.0);
        // A NaN block amax saturates (minnum) to 448 · gs.
        assert_eq!(block_scale(f32::NAN, 0.5), 224.0);
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn row_of_ties_zeros_nan_inf_and_a_short_block() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        #[rustfmt::skip]
        let x = [
            // block 0: amax 6, scale 1: every E2M1 midpoint and their negatives
            0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0,
            // block 1: zeros (scale floored to 1)
            0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.0,
            // block 2: NaN is ignored by the max (amax 3 → scale 0.5) and becomes -6·0.5
            nan, 3.0, -1.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            // block 3: inf → scale 448, values saturate to ±6·448
            inf, -inf, 1.0, 500.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            // block 4 (short, 4 values): amax 1.5 → scale 0.25
            1.5, -0.1, 0.2, -0.37,
        ];
        #[rustfmt::skip]
        let want = [
            0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -6.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            // 3/0.5 = 6; 1/0.5 = 2; 0.3/0.5 = 0.6 → 0.5 → 0.25
            -3.0, 3.0, -1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            // 1/448 → 0; 500/448 = 1.116 → 1 → 448
            2688.0, -2688.0, 0.0, 448.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            // 1.5/0.25 = 6; 0.1/0.25 = 0.4 → 0.5; 0.2/0.25 = 0.8 → 1; 0.37/0.25 = 1.48 → 1.5
            1.5, -0.125, 0.25, -0.375,
        ];
        let mut out = vec![0f32; x.len()];
        fake_quant_rows(&x, x.len(), UNIT_GLOBAL_AMAX, &mut out);
        assert_eq!(bits(&out), bits(&want), "{out:?}");
    }

    #[test]
    fn global_scale_sets_the_block_scale_grid() {
        // Global amax 2688 · 8 → gs = 8 exactly (a power-of-two multiple of the unit case).
        let gs = global_scale(8.0 * UNIT_GLOBAL_AMAX);
        assert_eq!(gs, 8.0);
        // Block amax 30: 30/(6·8) = 0.625 = 1.25 · 2^-1 exactly in E4M3 → scale 5.
        // 7/5 = 1.4 → 1.5 → 7.5; 30/5 = 6 → 30; 2.4/5 = 0.48 → 0.5 → 2.5; 1.2/5 = 0.24 → 0.
        let x = [30.0, 7.0, -2.4, 1.2];
        let mut out = [0f32; 4];
        fake_quant_rows(&x, 4, 8.0 * UNIT_GLOBAL_AMAX, &mut out);
        assert_eq!(out, [30.0, 7.5, -2.5, 0.0]);
        // Rows restart blocks: two rows of 4 are two blocks, not one of 8.
        let x = [6.0, 1.0, 0.0, 0.0, 0.3, 0.1, 0.0, 0.0];
        let mut out = [0f32; 8];
        fake_quant_rows(&x, 4, UNIT_GLOBAL_AMAX, &mut out);
        // row 1: amax 0.3 → 0.3·RN(1/6) = 0.05 → e4m3 0.05078125 (13·2^-8); 0.1/0.0508 = 1.97 → 2
        assert_eq!(out, [6.0, 1.0, 0.0, 0.0, 0.3046875, 0.1015625, 0.0, 0.0]);
    }

    #[test]
    fn tensor_op_matches_slice_path_for_each_dtype() -> Result<()> {
        let xs: Vec<f32> =
            (0..3 * 40).map(|i| ((i as f32) * 0.37).sin() * 3.0 + if i % 7 == 0 { 10.0 } else { 0.0 }).collect();
        let t = Tensor::from_vec(xs.clone(), (3, 40), &Device::Cpu)?;
        let amax = 13.0f32;
        let mut want = vec![0f32; xs.len()];
        fake_quant_rows(&xs, 40, amax, &mut want);
        let got = fake_quant_tensor(&t, amax)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(bits(&got), bits(&want));
        // bf16 and f16: widened exactly, one rounding back at the end.
        for dtype in [DType::BF16, DType::F16] {
            let td = t.to_dtype(dtype)?;
            let wide = td.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut want = vec![0f32; wide.len()];
            fake_quant_rows(&wide, 40, amax, &mut want);
            let want = Tensor::from_vec(want, (3, 40), &Device::Cpu)?.to_dtype(dtype)?;
            let got = fake_quant_tensor(&td, amax)?;
            assert_eq!(got.dtype(), dtype);
            let d = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{dtype:?}");
        }
        // A transposed (non-contiguous) view is quantized along its own last dim.
        let tt = t.t()?;
        let got = fake_quant_tensor(&tt, amax)?.to_vec2::<f32>()?;
        let cols: Vec<f32> = tt.contiguous()?.flatten_all()?.to_vec1()?;
        let mut want = vec![0f32; cols.len()];
        fake_quant_rows(&cols, 3, amax, &mut want);
        assert_eq!(got.concat(), want);
        Ok(())
    }

    #[test]
    fn formats_are_wired_by_modelopt_names() -> Result<()> {
        let x = Tensor::new(&[[0.3f32, -2.0, 7.0, 0.01]], &Device::Cpu)?;
        let stats = WeightStats::of(&x)?;
        for name in ["NVFP4", "nvfp4_default_cfg"] {
            let f = crate::quant::format_by_name(name).unwrap();
            assert_eq!((f.name(), f.effective_bits()), ("NVFP4", 4.5));
            assert_eq!(f.quantize_input(&x, 7.0)?.to_vec2::<f32>()?, fake_quant_tensor(&x, 7.0)?.to_vec2::<f32>()?);
        }
        let f = crate::quant::format_by_name("W4A16_NVFP4_CFG").unwrap();
        assert_eq!((f.name(), f.effective_bits()), ("W4A16_NVFP4", 4.5));
        assert_eq!(f.quantize_input(&x, 7.0)?.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
        assert_eq!(f.quantize_weight(&x, &stats)?.to_vec2::<f32>()?, fake_quant_tensor(&x, 7.0)?.to_vec2::<f32>()?);
        Ok(())
    }
}
