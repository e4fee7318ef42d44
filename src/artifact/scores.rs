//! `qsens.scores`: per-layer, per-format sensitivity scores, calibration amax and costs, written
//! by `score-layers` and read by `search`.
//!
//! Conventions (those of ModelOpt's `auto_quantize`, which these scores reproduce):
//! - `formats` is ordered from the fewest effective bits to the most; the last one is always
//!   `NONE` (unquantized, 16 bits, score 0).
//! - A layer's score for a format is the sum over samples of its per-sample contribution,
//!   summed in sample order; a group's is the sum over its member layers.
//! - `GroupScores::scores` is made monotone like ModelOpt: walking from the fewest bits to the
//!   most, each score is the minimum of itself and the previous one.
//! - cost of a format = weight parameters × effective bits / 16 (ModelOpt's weight cost; with
//!   `--true-cost` the bits count the scales' storage and `modelopt_bits` keeps ModelOpt's).

use serde::{Deserialize, Serialize};

use super::Payload;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub model: ModelSummary,
    /// `gradient` or `kl_div`.
    pub method: String,
    /// Compute dtype of the scoring forward (`f32`, `bf16`).
    pub dtype: String,
    pub formats: Vec<FormatInfo>,
    /// Samples that have been scored, in input order (a shard holds a subset).
    pub samples: Vec<SampleSummary>,
    /// Number of samples in the inputs artifact (a complete run has `samples.len() == num_inputs`).
    pub num_inputs: usize,
    /// Samples used for calibration (indices into the inputs artifact).
    pub calibration_samples: Vec<usize>,
    pub layers: Vec<LayerScores>,
    pub groups: Vec<GroupScores>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Checkpoint directory name (e.g. `Qwen3-VL-4B-Instruct`).
    pub name: String,
    pub architecture: String,
    pub num_parameters: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormatInfo {
    /// `FP8`, ..., `NONE`.
    pub name: String,
    pub effective_bits: f64,
    /// How weights are quantized (human-readable), e.g. `fp8 e4m3, per-tensor, max calibration`.
    pub weight: String,
    /// How layer inputs are quantized.
    pub input: String,
    /// ModelOpt's effective bits when `effective_bits` counts the scales' storage too
    /// (`score-layers --true-cost`); absent under ModelOpt's cost model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modelopt_bits: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleSummary {
    /// Index in the inputs artifact.
    pub index: usize,
    pub id: String,
    pub num_tokens: usize,
    pub num_image_tokens: usize,
    pub num_label_tokens: usize,
    /// Unquantized loss (mean NLL over label tokens); absent when the sample has no label
    /// tokens (possible with kl_div, which needs none).
    pub loss: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerScores {
    /// HF module name, e.g. `model.language_model.layers.3.mlp.down_proj`.
    pub name: String,
    /// Name of the group it belongs to.
    pub group: String,
    /// `vision`, `text` or `lm_head`.
    pub tower: String,
    /// `linear`, `patch_embed` or `experts` (all routed experts of one sparse MoE layer).
    pub kind: String,
    /// Weight shape `[out_features, in_features]` (the patch embed's input is the flattened patch;
    /// `experts`: `[experts, weights per expert]`).
    pub shape: [u64; 2],
    /// Weight parameters (the cost unit).
    pub params: u64,
    /// Calibrated input amax (max |x| over the calibration samples, quantization off; `experts`:
    /// gate_up_proj's, shared by all experts).
    pub input_amax: f64,
    /// Weight amax (max |W|; `experts`: the largest expert's, each expert's is in `experts`).
    pub weight_amax: f64,
    /// Per format (same order as `Scores::formats`), per scored sample: this layer's score
    /// contribution. Empty for methods that only score whole groups (`kl_div`).
    pub per_sample: Vec<Vec<f64>>,
    /// Per format: calibration that belongs to that format alone (`None` for formats that use
    /// the shared max calibration above). Empty, and not written, when no format has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub format_calibration: Vec<Option<FormatCalibration>>,
    /// Kind `experts` only: the calibration of each expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertsCalibration>,
}

/// The calibration of one sparse MoE layer's routed experts, as ModelOpt 0.47 calibrates the fused
/// experts (`_QuantFusedExperts`): one input amax per projection shared by all experts, one weight
/// amax per expert and projection (gate and up share one), every expert given its weight amax
/// whether or not a calibration token reached it. The router is never quantized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertsCalibration {
    pub num_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// down_proj's input amax: over routed (token, expert) pairs, before the mixing weight.
    pub down_input_amax: f64,
    /// Per expert: the fused gate_up_proj's weight amax.
    pub gate_up_weight_amax: Vec<f64>,
    /// Per expert: down_proj's weight amax.
    pub down_weight_amax: Vec<f64>,
    /// Per expert: (token, expert) pairs the calibration samples routed to it (0: never reached,
    /// so its quantized weights were never exercised by calibration or scoring).
    pub tokens_routed: Vec<u64>,
}

/// A layer's calibration for one format with its own calibration pass (the AWQ formats, which
/// ModelOpt calibrates on the first quarter of the calibration samples, and SmoothQuant, on all
/// of them): the layer computes
/// `Q_in(x · input_scale) · Q_w(W · weight_scale)ᵀ` with `input_amax` for `Q_in`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormatCalibration {
    /// `awq_lite` or `smoothquant` (smoothed), or `max` (a layer the format's calibration does not
    /// smooth: the patch embedding).
    pub method: String,
    /// The chosen AWQ exponent α.
    pub alpha: Option<f64>,
    /// Per input channel, in the weight dtype's values (ModelOpt's input `pre_quant_scale`);
    /// empty without smoothing.
    pub input_scale: Vec<f32>,
    /// Per input channel, in the weight dtype's values (the weight's `pre_quant_scale`).
    pub weight_scale: Vec<f32>,
    /// The input amax of this format's calibration, after smoothing.
    pub input_amax: f64,
}

impl FormatCalibration {
    /// The record of a layer its format's calibration leaves unsmoothed: max calibration with
    /// this input amax.
    pub fn max(input_amax: f64) -> Self {
        FormatCalibration {
            method: "max".into(),
            alpha: None,
            input_scale: Vec::new(),
            weight_scale: Vec::new(),
            input_amax,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupScores {
    /// Group name (ModelOpt's group key, e.g. `model.language_model.layers.0.self_attn` for q/k/v).
    pub name: String,
    /// Member layer names, in model order.
    pub members: Vec<String>,
    pub params: u64,
    /// Per format: params × effective_bits / 16.
    pub costs: Vec<f64>,
    /// Per format: summed over samples, monotone across formats, NONE = 0.
    pub scores: Vec<f64>,
    /// Per format, per scored sample: the group's raw (not monotone-adjusted) contribution.
    pub per_sample: Vec<Vec<f64>>,
    /// Kept unquantized (`--disable`): only NONE may be chosen; it still counts in the budget.
    pub disabled: bool,
    /// Left out of the budget (`--exclude-cost`): its cost weight is 0.
    pub cost_excluded: bool,
    /// The weight of its costs in the budget when not 1: ModelOpt's `active_moe` cost model
    /// weighs a sparse layer's experts by top_k / experts (`score-layers --cost-model active_moe`).
    /// `costs` stay unweighted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_weight: Option<CostWeight>,
}

/// An exact cost weight, `numerator / denominator` (both > 0), so budgets stay exact integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostWeight {
    pub numerator: u64,
    pub denominator: u64,
}

impl CostWeight {
    /// `numerator / denominator` in lowest terms.
    pub fn new(numerator: u64, denominator: u64) -> Self {
        let (mut a, mut b) = (numerator, denominator);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        let g = a.max(1);
        CostWeight { numerator: numerator / g, denominator: denominator / g }
    }

    pub fn value(self) -> f64 {
        self.numerator as f64 / self.denominator as f64
    }

    /// The weight of value `w` (a manifest's or ModelOpt's `cost_weight`): `None` for 1 (and for
    /// 0, which is `cost_excluded`), else the fraction with the smallest denominator up to 2^16
    /// that gives `w`; `None` also when there is none.
    pub fn from_value(w: f64) -> Option<Self> {
        if w == 0.0 || w == 1.0 || !w.is_finite() || w < 0.0 {
            return None;
        }
        let den = (1..=1u64 << 16).find(|&d| ((w * d as f64).round() - w * d as f64).abs() < 1e-9 * d as f64)?;
        Some(CostWeight::new((w * den as f64).round() as u64, den))
    }
}

impl Payload for Scores {
    const KIND: &'static str = "qsens.scores";
    const VERSION: u32 = 1;
}
