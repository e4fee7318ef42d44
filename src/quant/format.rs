//! Quantization formats: what a layer's weight and input become under each choice.
//!
//! Every format is fake quantization (quantize then dequantize in the compute dtype), as
//! ModelOpt simulates it; the arithmetic is done in f32. A format is one implementation of
//! [`Format`] beside its numerics (`int`, `nvfp4`, `mx`; the FP8 family, the default, lives
//! here) plus one line in [`format_by_name`], which accepts ModelOpt 0.47's config names.
//!
//! Cost: ModelOpt's effective bits by default (`estimate_quant_compression`: an explicit
//! `effective_bits`, else the fewest bits among the format's quantizers); [`Format::true_bits`]
//! adds what the scales really take (`--true-cost`).

use candle_core::{Result, Tensor};

use super::{fp8, host, int};

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
    /// Short name used in artifacts and on the command line (`FP8`, `INT8`, `NVFP4`, ...).
    fn name(&self) -> &'static str;
    /// ModelOpt 0.47's name of the config (`FP8_DEFAULT_CFG`).
    fn modelopt_name(&self) -> &'static str;
    /// Effective bits per weight, ModelOpt's cost unit (cost = params × bits / 16).
    fn effective_bits(&self) -> f64;
    /// Bits per weight counting the scales' storage too (`--true-cost`).
    fn true_bits(&self) -> f64 {
        self.effective_bits()
    }
    /// Whether the layer's input is quantized (false for weight-only formats, whose
    /// [`Format::quantize_input`] returns its input unchanged).
    fn quantizes_input(&self) -> bool {
        true
    }
    /// How the format is calibrated beyond max calibration of its amax.
    fn calibration(&self) -> Calibration {
        Calibration::Max
    }
    /// Human-readable weight quantizer description.
    fn weight_description(&self) -> String;
    /// Human-readable input quantizer description.
    fn input_description(&self) -> String;
    /// Fake-quantized weight, same shape and dtype.
    fn quantize_weight(&self, weight: &Tensor, stats: &WeightStats) -> Result<Tensor>;
    /// Whether [`Format::quantize_weight`] of a block of whole output rows equals those rows of
    /// the quantized weight (nothing is computed across rows beyond `stats`), so that a large
    /// weight can be quantized a slice at a time.
    fn weight_rows_independent(&self) -> bool {
        false
    }
    /// Fake-quantized layer input, given the calibrated per-tensor input amax.
    fn quantize_input(&self, x: &Tensor, input_amax: f32) -> Result<Tensor>;
}

/// Fake-quantizes `weight` viewed as `shape` (its checkpoint shape, e.g. a Conv3d's
/// `[out, C, T, P, P]`, along whose last axis block formats quantize), in the weight's shape.
pub fn quantize_weight_as(
    format: &dyn Format,
    weight: &Tensor,
    stats: &WeightStats,
    shape: &[usize],
) -> Result<Tensor> {
    if weight.dims() == shape {
        return format.quantize_weight(weight, stats);
    }
    format.quantize_weight(&weight.reshape(shape)?, stats)?.reshape(weight.shape())
}

/// A format's calibration algorithm (ModelOpt's `algorithm` of its config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    /// Max calibration only (`algorithm: max`).
    Max,
    /// AWQ-lite smoothing search ([`super::awq`]); `block` is the weight quantizer's block
    /// size along the input dimension (`None`: per row).
    AwqLite { block: Option<usize> },
    /// SmoothQuant's per-channel smoothing with migration strength `alpha` ([`super::smoothquant`]).
    SmoothQuant { alpha: f32 },
}

/// FP8 E4M3 per-tensor weights and inputs, max calibration: ModelOpt's `FP8_DEFAULT_CFG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fp8PerTensor;

impl Format for Fp8PerTensor {
    fn name(&self) -> &'static str {
        "FP8"
    }
    fn modelopt_name(&self) -> &'static str {
        "FP8_DEFAULT_CFG"
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
    fn weight_rows_independent(&self) -> bool {
        true // elementwise against the per-tensor amax
    }
    fn quantize_input(&self, x: &Tensor, input_amax: f32) -> Result<Tensor> {
        fp8::fake_quant_tensor(x, input_amax)
    }
}

/// FP8 E4M3 with one scale per output channel for weights and a dynamic scale per token for
/// inputs: ModelOpt's `FP8_PER_CHANNEL_PER_TOKEN_CFG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fp8PerChannelPerToken;

impl Format for Fp8PerChannelPerToken {
    fn name(&self) -> &'static str {
        "FP8_PER_CHANNEL_PER_TOKEN"
    }
    fn modelopt_name(&self) -> &'static str {
        "FP8_PER_CHANNEL_PER_TOKEN_CFG"
    }
    fn effective_bits(&self) -> f64 {
        8.0
    }
    fn weight_description(&self) -> String {
        "fp8 e4m3, per-output-channel scale 448/amax".into()
    }
    fn input_description(&self) -> String {
        "fp8 e4m3, dynamic per-token scale 448/amax".into()
    }
    fn quantize_weight(&self, weight: &Tensor, _stats: &WeightStats) -> Result<Tensor> {
        host::map_f32(weight, fp8::fake_quant_per_channel)
    }
    fn quantize_input(&self, x: &Tensor, _input_amax: f32) -> Result<Tensor> {
        host::map_f32(x, fp8::fake_quant_per_token)
    }
}

/// FP8 E4M3 weights in 128×128 tiles with one f32 scale each, inputs unquantized: ModelOpt's
/// `FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fp8Blockwise2d;

impl Format for Fp8Blockwise2d {
    fn name(&self) -> &'static str {
        "FP8_2D_BLOCKWISE_WEIGHT_ONLY"
    }
    fn modelopt_name(&self) -> &'static str {
        "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG"
    }
    fn effective_bits(&self) -> f64 {
        8.0
    }
    fn true_bits(&self) -> f64 {
        8.0 + 32.0 / (128.0 * 128.0)
    }
    fn quantizes_input(&self) -> bool {
        false
    }
    fn weight_description(&self) -> String {
        "fp8 e4m3, one scale per 128×128 tile".into()
    }
    fn input_description(&self) -> String {
        "unquantized".into()
    }
    fn quantize_weight(&self, weight: &Tensor, _stats: &WeightStats) -> Result<Tensor> {
        host::map_f32(weight, |v, dims| fp8::fake_quant_2d_blocks(v, dims, 128))
    }
    fn quantize_input(&self, x: &Tensor, _input_amax: f32) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// Name of the "keep unquantized" choice; always the last format, 16 bits, score 0.
pub const NONE: &str = "NONE";
/// Effective bits of [`NONE`].
pub const NONE_BITS: f64 = 16.0;

/// The formats [`format_by_name`] knows, by their short names.
pub const KNOWN_FORMATS: &[&str] = &[
    "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN",
    "FP8_2D_BLOCKWISE_WEIGHT_ONLY",
    "INT8",
    "INT8_SMOOTHQUANT",
    "INT4_BLOCKWISE_WEIGHT_ONLY",
    "INT4_AWQ",
    "W4A8_AWQ_BETA",
    "NVFP4",
    "W4A16_NVFP4",
    "NVFP4_AWQ_LITE",
    "MXFP8",
    "MXFP4",
];

/// Looks up a format by name (case-insensitive): the short name or ModelOpt's config name
/// (`FP8_DEFAULT_CFG`, `INT8_DEFAULT_CFG`, ...).
pub fn format_by_name(name: &str) -> anyhow::Result<Box<dyn Format>> {
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_suffix("_DEFAULT_CFG").or_else(|| upper.strip_suffix("_CFG")).unwrap_or(&upper);
    Ok(match short {
        "FP8" => Box::new(Fp8PerTensor),
        "FP8_PER_CHANNEL_PER_TOKEN" => Box::new(Fp8PerChannelPerToken),
        "FP8_2D_BLOCKWISE_WEIGHT_ONLY" => Box::new(Fp8Blockwise2d),
        "INT8" => Box::new(int::Int8),
        "INT8_SMOOTHQUANT" => Box::new(int::Int8SmoothQuant),
        "INT4_BLOCKWISE_WEIGHT_ONLY" => Box::new(int::Int4Blockwise),
        "INT4_AWQ" => Box::new(int::Int4Awq),
        "W4A8_AWQ_BETA" => Box::new(int::W4A8AwqBeta),
        "NVFP4" => Box::new(super::nvfp4::Nvfp4),
        "NVFP4_AWQ_LITE" => Box::new(super::nvfp4::Nvfp4AwqLite),
        "W4A16_NVFP4" => Box::new(super::nvfp4::W4a16Nvfp4),
        "MXFP8" => Box::new(super::mx::Mxfp8),
        "MXFP4" => Box::new(super::mx::Mxfp4),
        _ => anyhow::bail!("unknown quantization format '{name}' (known: {})", KNOWN_FORMATS.join(", ")),
    })
}

/// Orders formats as ModelOpt's auto_quantize does (`QuantRecipe.__lt__`): by effective bits,
/// then formats with equal bits by their config's JSON signature (`model_dump_json`), which
/// decides which score the monotone pass takes from which. [`MODELOPT_SIGNATURE_ORDER`] is that
/// order, read off ModelOpt 0.47 by `scripts/reference/modelopt_format_order.py`. With
/// `true_cost` the bits compared are [`Format::true_bits`].
pub fn sort_as_modelopt(formats: &mut [Box<dyn Format>], true_cost: bool) {
    let rank =
        |f: &dyn Format| MODELOPT_SIGNATURE_ORDER.iter().position(|n| *n == f.modelopt_name()).unwrap_or(usize::MAX);
    let bits = |f: &dyn Format| if true_cost { f.true_bits() } else { f.effective_bits() };
    formats.sort_by(|a, b| bits(a.as_ref()).total_cmp(&bits(b.as_ref())).then(rank(a.as_ref()).cmp(&rank(b.as_ref()))));
}

/// ModelOpt 0.47's sort order of its configs (the output of
/// `scripts/reference/modelopt_format_order.py`, committed as
/// `tests/data/modelopt_format_order.txt`; a test checks the two agree).
pub const MODELOPT_SIGNATURE_ORDER: &[&str] = &[
    "W4A8_AWQ_BETA_CFG",
    "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "INT4_AWQ_CFG",
    "MXFP4_DEFAULT_CFG",
    "W4A16_NVFP4_CFG",
    "NVFP4_AWQ_LITE_CFG",
    "NVFP4_DEFAULT_CFG",
    "INT8_DEFAULT_CFG",
    "INT8_SMOOTHQUANT_CFG",
    "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "FP8_DEFAULT_CFG",
    "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
    "MXFP8_DEFAULT_CFG",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_order_is_modelopts() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/modelopt_format_order.txt");
        let text = std::fs::read_to_string(path).unwrap();
        let listed: Vec<&str> = text.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
        assert_eq!(listed, MODELOPT_SIGNATURE_ORDER);
        // Every known format is in the table, with the bits ModelOpt gives it.
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (name, bits) = (parts.next().unwrap(), parts.next().unwrap().parse::<f64>().unwrap());
            if let Ok(f) = format_by_name(name) {
                assert_eq!(f.modelopt_name(), name);
                assert_eq!(f.effective_bits(), bits, "{name}");
            }
        }
    }

    #[test]
    fn formats_sort_by_bits_then_signature() {
        let mut formats: Vec<Box<dyn Format>> =
            ["FP8", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "int8", "FP8_PER_CHANNEL_PER_TOKEN"]
                .iter()
                .map(|n| format_by_name(n).unwrap())
                .collect();
        sort_as_modelopt(&mut formats, false);
        let names: Vec<&str> = formats.iter().map(|f| f.name()).collect();
        assert_eq!(names, ["INT4_BLOCKWISE_WEIGHT_ONLY", "INT8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8"]);
        assert!(format_by_name("FP16").is_err());
    }
}
