//! Integer fake quantization (INT8, INT4), exactly as ModelOpt 0.47 computes it on CUDA
//! (`modelopt/torch/kernels/quantization/gemm/tensor_quant_gpu.cu`, `fake_tensor_quant_device`):
//!
//! ```text
//! bound = 2^(bits−1) − 1,  grid [−bound − 1, bound]     (narrow_range is false by default)
//! y     = 0                                   if amax < 2^-24
//! s     = bound / amax                        (f32)
//! y     = clamp(rint(x·s), −bound − 1, bound) / s       rint = round half to even
//! ```
//! The CPU path (`tensor_quant._tensor_quant`) computes the same values except at
//! `amax == 2^-24` exactly (CPU: `<=`, so 0; GPU: `<`, so quantized) and for non-finite `x`
//! with a zero amax (CPU gives NaN, GPU 0). We follow the GPU.
//!
//! Where the amax comes from: per tensor (static inputs, max calibration), per output channel
//! (`axis: 0`, INT8 weights) or per block of 128 along the last dimension (INT4 weights, a
//! partial last block padded with zeros, which leaves its max unchanged). Weights are
//! max-calibrated on themselves, so their amax is recomputed here from the values.
//!
//! The INT formats (INT8, INT8 with SmoothQuant, INT4 block, INT4 with AWQ, W4A8) are here too.

use candle_core::{Result, Tensor};

use super::format::{Calibration, Format, WeightStats};
use super::fp8;
use super::host::{self, rows_of_first_dim, rows_of_last_dim};

/// Below this amax everything quantizes to 0 (the smallest fp16 subnormal).
pub const ZERO_AMAX: f32 = 1.0 / (1u32 << 24) as f32;

/// `(min, max)` of ModelOpt's signed grid for `bits` (not narrow range).
pub fn bounds(bits: u32) -> (f32, f32) {
    let bound = ((1u32 << (bits - 1)) - 1) as f32;
    (-bound - 1.0, bound)
}

/// Fake-quantizes one value against `amax` on a `bits`-bit grid.
#[inline]
pub fn fake_quant(x: f32, amax: f32, bits: u32) -> f32 {
    if amax < ZERO_AMAX {
        return 0.0;
    }
    let (min, max) = bounds(bits);
    let scale = max / amax;
    let q = (x * scale).round_ties_even();
    let q = if q > max { max } else { q };
    let q = if q < min { min } else { q };
    q / scale
}

/// Per-tensor: every value against one (calibrated) amax.
pub fn fake_quant_per_tensor(values: &mut [f32], amax: f32, bits: u32) {
    for v in values {
        *v = fake_quant(*v, amax, bits);
    }
}

/// Per output channel (`axis: 0`): each slice along dim 0 against its own max |x|.
pub fn fake_quant_per_channel(values: &mut [f32], dims: &[usize], bits: u32) {
    let (_, row_len) = rows_of_first_dim(dims);
    host::for_each_chunk_amax(values, row_len, |row, amax| fake_quant_per_tensor(row, amax, bits));
}

/// Per block of `block` values along the last dimension, each against its own max |x|.
pub fn fake_quant_blocks(values: &mut [f32], dims: &[usize], block: usize, bits: u32) {
    let (_, cols) = rows_of_last_dim(dims);
    // Blocks restart at every row (a partial last block is ModelOpt's zero padding).
    for row in values.chunks_mut(cols) {
        host::for_each_chunk_amax(row, block, |b, amax| fake_quant_per_tensor(b, amax, bits));
    }
}

/// INT8 weights with one scale per output channel, INT8 inputs with a static per-tensor scale:
/// ModelOpt's `INT8_DEFAULT_CFG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Int8;

impl Format for Int8 {
    fn name(&self) -> &'static str {
        "INT8"
    }
    fn modelopt_name(&self) -> &'static str {
        "INT8_DEFAULT_CFG"
    }
    fn effective_bits(&self) -> f64 {
        8.0
    }
    fn weight_description(&self) -> String {
        "int8 [-128, 127], per-output-channel scale 127/amax".into()
    }
    fn input_description(&self) -> String {
        "int8 [-128, 127], per-tensor static scale 127/amax, amax = max calibration".into()
    }
    fn quantize_weight(&self, weight: &Tensor, _stats: &WeightStats) -> Result<Tensor> {
        host::map_f32(weight, |v, dims| fake_quant_per_channel(v, dims, 8))
    }
    fn quantize_input(&self, x: &Tensor, input_amax: f32) -> Result<Tensor> {
        host::map_f32(x, |v, _| fake_quant_per_tensor(v, input_amax, 8))
    }
}

/// INT8 as [`Int8`], after SmoothQuant's per-channel smoothing (α = 1): ModelOpt's
/// `INT8_SMOOTHQUANT_CFG` (`algorithm: smoothquant`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Int8SmoothQuant;

impl Format for Int8SmoothQuant {
    fn name(&self) -> &'static str {
        "INT8_SMOOTHQUANT"
    }
    fn modelopt_name(&self) -> &'static str {
        "INT8_SMOOTHQUANT_CFG"
    }
    fn effective_bits(&self) -> f64 {
        8.0
    }
    fn calibration(&self) -> Calibration {
        Calibration::SmoothQuant { alpha: super::smoothquant::DEFAULT_ALPHA }
    }
    fn weight_description(&self) -> String {
        format!("{}, after SmoothQuant smoothing (alpha 1)", Int8.weight_description())
    }
    fn input_description(&self) -> String {
        format!("{} (of the smoothed input)", Int8.input_description())
    }
    fn quantize_weight(&self, weight: &Tensor, stats: &WeightStats) -> Result<Tensor> {
        Int8.quantize_weight(weight, stats)
    }
    fn quantize_input(&self, x: &Tensor, input_amax: f32) -> Result<Tensor> {
        Int8.quantize_input(x, input_amax)
    }
}

/// INT4 weights in blocks of 128 along the input dimension, one scale each, inputs
/// unquantized, max calibration: ModelOpt's `INT4_BLOCKWISE_WEIGHT_ONLY_CFG` (the weight
/// quantizer of `INT4_AWQ_CFG`, without AWQ's scaling search).
#[derive(Debug, Clone, Copy, Default)]
pub struct Int4Blockwise;

impl Format for Int4Blockwise {
    fn name(&self) -> &'static str {
        "INT4_BLOCKWISE_WEIGHT_ONLY"
    }
    fn modelopt_name(&self) -> &'static str {
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"
    }
    fn effective_bits(&self) -> f64 {
        4.0
    }
    fn true_bits(&self) -> f64 {
        4.0 + 16.0 / 128.0
    }
    fn quantizes_input(&self) -> bool {
        false
    }
    fn weight_description(&self) -> String {
        "int4 [-8, 7], one scale per 128 inputs".into()
    }
    fn input_description(&self) -> String {
        "unquantized".into()
    }
    fn quantize_weight(&self, weight: &Tensor, _stats: &WeightStats) -> Result<Tensor> {
        host::map_f32(weight, |v, dims| fake_quant_blocks(v, dims, 128, 4))
    }
    fn quantize_input(&self, x: &Tensor, _input_amax: f32) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// INT4 block-128 weights after AWQ-lite smoothing, inputs unquantized: ModelOpt's
/// `INT4_AWQ_CFG` (`algorithm: {method: awq_lite, alpha_step: 0.1}`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Int4Awq;

impl Format for Int4Awq {
    fn name(&self) -> &'static str {
        "INT4_AWQ"
    }
    fn modelopt_name(&self) -> &'static str {
        "INT4_AWQ_CFG"
    }
    fn effective_bits(&self) -> f64 {
        4.0
    }
    fn true_bits(&self) -> f64 {
        Int4Blockwise.true_bits()
    }
    fn quantizes_input(&self) -> bool {
        false
    }
    fn calibration(&self) -> Calibration {
        Calibration::AwqLite { block: Some(128) }
    }
    fn weight_description(&self) -> String {
        "int4 [-8, 7], one scale per 128 inputs, after AWQ-lite smoothing".into()
    }
    fn input_description(&self) -> String {
        "unquantized (scaled by the AWQ smoothing)".into()
    }
    fn quantize_weight(&self, weight: &Tensor, stats: &WeightStats) -> Result<Tensor> {
        Int4Blockwise.quantize_weight(weight, stats)
    }
    fn quantize_input(&self, x: &Tensor, _input_amax: f32) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// INT4 block-128 weights re-quantized to FP8 per tensor, FP8 per-tensor inputs, after
/// AWQ-lite smoothing: ModelOpt's `W4A8_AWQ_BETA_CFG`. The weight quantizer is ModelOpt's
/// `SequentialQuantizer` of the two: the INT4 result is rounded to the weight dtype, then
/// fake-quantized to E4M3 against the FP8 stage's amax, which max calibration takes from the
/// weight itself (the INT4 stage passes it through while calibrating).
#[derive(Debug, Clone, Copy, Default)]
pub struct W4A8AwqBeta;

impl Format for W4A8AwqBeta {
    fn name(&self) -> &'static str {
        "W4A8_AWQ_BETA"
    }
    fn modelopt_name(&self) -> &'static str {
        "W4A8_AWQ_BETA_CFG"
    }
    fn effective_bits(&self) -> f64 {
        4.0
    }
    fn true_bits(&self) -> f64 {
        Int4Blockwise.true_bits()
    }
    fn calibration(&self) -> Calibration {
        Calibration::AwqLite { block: Some(128) }
    }
    fn weight_description(&self) -> String {
        "int4 [-8, 7], one scale per 128 inputs, then fp8 e4m3 per tensor, after AWQ-lite smoothing".into()
    }
    fn input_description(&self) -> String {
        "fp8 e4m3, per-tensor static scale 448/amax (of the smoothed input)".into()
    }
    fn quantize_weight(&self, weight: &Tensor, stats: &WeightStats) -> Result<Tensor> {
        fp8::fake_quant_tensor(&Int4Blockwise.quantize_weight(weight, stats)?, stats.amax)
    }
    fn quantize_input(&self, x: &Tensor, input_amax: f32) -> Result<Tensor> {
        fp8::fake_quant_tensor(x, input_amax)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_grid_is_not_narrow() {
        assert_eq!(bounds(8), (-128.0, 127.0));
        assert_eq!(bounds(4), (-8.0, 7.0));
        // amax 127 makes the scale exactly 1: values round half to even onto the integers and
        // saturate at −128 / 127.
        let mut v = [0.5, 1.5, 2.5, -0.5, -2.5, 126.7, 300.0, -300.0, -127.6];
        fake_quant_per_tensor(&mut v, 127.0, 8);
        assert_eq!(v, [0.0, 2.0, 2.0, -0.0, -2.0, 127.0, 127.0, -128.0, -128.0]);
    }

    #[test]
    fn zero_amax_gives_zero_and_the_threshold_is_strict() {
        let mut v = [1.0, -3.0, f32::INFINITY];
        fake_quant_per_tensor(&mut v, 0.0, 8);
        assert_eq!(v, [0.0, 0.0, 0.0]);
        // amax exactly 2^-24 is quantized (GPU `<`): scale 127·2^24, x = amax → 127 → back to x.
        let mut v = [ZERO_AMAX];
        fake_quant_per_tensor(&mut v, ZERO_AMAX, 8);
        assert_eq!(v, [ZERO_AMAX]);
    }

    #[test]
    fn int4_blocks_use_their_own_max() {
        // Two blocks of 4: amax 7 (scale 1) and amax 0.7 (scale 10).
        let mut v = [7.0, 3.5, -2.5, 0.4, 0.7, 0.35, -0.05, 0.0];
        fake_quant_blocks(&mut v, &[1, 8], 4, 4);
        let s: f32 = 7.0 / 0.7;
        let want =
            [7.0, 4.0, -2.0, 0.0, 7.0 / s, (0.35 * s).round_ties_even() / s, (-0.05 * s).round_ties_even() / s, 0.0];
        assert_eq!(v, want);
    }

    #[test]
    fn per_channel_is_per_first_dim_slice() {
        let mut v = [127.0, 0.6, 1.27, 0.0126];
        fake_quant_per_channel(&mut v, &[2, 2], 8);
        assert_eq!(v[..2], [127.0, 1.0]);
        let s: f32 = 127.0 / 1.27;
        assert_eq!(v[2..], [127.0 / s, (0.0126 * s).round_ties_even() / s]);
    }
}
