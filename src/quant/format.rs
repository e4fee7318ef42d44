//! Quantization formats: what a layer's weight and input become under each choice.
//!
//! Every format is fake quantization (quantize then dequantize in the compute dtype), as
//! ModelOpt simulates it; the arithmetic is done in f32. Adding a format (FP8 per-channel, INT8,
//! INT4 block, NVFP4, MXFP8, ...) means one file implementing [`Format`] plus one line in
//! [`format_by_name`].

use candle_core::{Result, Tensor};

use super::fp8;

/// Per-layer weight statistics a format needs, computed once per layer (weights are static).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightStats {
    /// max |W| over the whole tensor.
    pub amax: f32,
}

impl WeightStats {
    pub fn of(weight: &Tensor) -> Result<Self> {
        Ok(WeightStats { amax: fp8::amax(weight)?.to_scalar::<f32>()? })
    }
}

/// A quantization format for one layer (weight and input quantizer).
pub trait Format: Send + Sync + std::fmt::Debug {
    /// Short name used in artifacts and on the command line (`FP8`).
    fn name(&self) -> &'static str;
    /// Effective bits per weight, ModelOpt's cost unit (cost = params × bits / 16).
    fn effective_bits(&self) -> f64;
    /// Human-readable weight quantizer description.
    fn weight_description(&self) -> String;
    /// Human-readable input quantizer description.
    fn input_description(&self) -> String;
    /// Fake-quantized weight, same shape and dtype.
    fn quantize_weight(&self, weight: &Tensor, stats: &WeightStats) -> Result<Tensor>;
    /// Fake-quantized layer input, given the calibrated per-tensor input amax.
    fn quantize_input(&self, x: &Tensor, input_amax: f32) -> Result<Tensor>;
}

/// FP8 E4M3 per-tensor weights and inputs, max calibration: ModelOpt's `FP8_DEFAULT_CFG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fp8PerTensor;

impl Format for Fp8PerTensor {
    fn name(&self) -> &'static str {
        "FP8"
    }
    fn effective_bits(&self) -> f64 {
        8.0
    }
    fn weight_description(&self) -> String {
        "fp8 e4m3, per-tensor scale 448/amax, amax = max|W|".into()
    }
    fn input_description(&self) -> String {
        "fp8 e4m3, per-tensor static scale 448/amax, amax = max calibration".into()
    }
    fn quantize_weight(&self, weight: &Tensor, stats: &WeightStats) -> Result<Tensor> {
        fp8::fake_quant_tensor(weight, stats.amax)
    }
    fn quantize_input(&self, x: &Tensor, input_amax: f32) -> Result<Tensor> {
        fp8::fake_quant_tensor(x, input_amax)
    }
}

/// Name of the "keep unquantized" choice; always the last format, 16 bits, score 0.
pub const NONE: &str = "NONE";
/// Effective bits of [`NONE`].
pub const NONE_BITS: f64 = 16.0;

/// Looks up a format by name (case-insensitive; ModelOpt's config names are accepted too).
pub fn format_by_name(name: &str) -> anyhow::Result<Box<dyn Format>> {
    match name.to_ascii_uppercase().as_str() {
        "FP8" | "FP8_DEFAULT_CFG" => Ok(Box::new(Fp8PerTensor)),
        "NVFP4" | "NVFP4_DEFAULT_CFG" => Ok(Box::new(super::nvfp4::Nvfp4)),
        "W4A16_NVFP4" | "W4A16_NVFP4_CFG" => Ok(Box::new(super::nvfp4::W4a16Nvfp4)),
        "MXFP8" | "MXFP8_DEFAULT_CFG" => Ok(Box::new(super::mx::Mxfp8)),
        "MXFP4" | "MXFP4_DEFAULT_CFG" => Ok(Box::new(super::mx::Mxfp4)),
        _ => anyhow::bail!("unknown quantization format '{name}' (known: FP8, NVFP4, W4A16_NVFP4, MXFP8, MXFP4)"),
    }
}
