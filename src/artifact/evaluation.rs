//! `qsens.evaluation`: what quantization recipes measurably do to the model's outputs on
//! held-out samples. Written by `evaluate`, read by `manifest-to-md --evaluation`; documented in
//! `docs/artifacts.md`.
//!
//! Conventions:
//! - Every recipe is compared with the unquantized model on the same samples: `kl` is
//!   `KL(P_unquantized ‖ P_recipe)` of the next-token distribution, `top1_agreement` the share of
//!   positions where both models' most likely next token is the same.
//! - "label positions" are the rows `t − 1` with `labels[t] ≠ −100` (HF's shift: the rows the
//!   loss is taken on); "all positions" are every row of the sequence.
//! - Overall figures pool tokens over samples (Σ over samples of the sums, divided by Σ of the
//!   counts); their intervals are 95 % percentile bootstrap intervals over samples, resampled
//!   with replacement, the same resamples for every recipe (so differences are paired).
//! - Deterministic: no timestamps, no timings.

use serde::{Deserialize, Serialize};

use super::scores::ModelSummary;
use super::Payload;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub model: ModelSummary,
    /// Compute dtype of the forward passes (`f32`, `bf16`).
    pub dtype: String,
    /// The manifests' recipes were run as scored (every layer they name quantized, each shard
    /// with its own scales, as `score-layers` and ModelOpt's fake quantization compute them)
    /// instead of as the checkpoint `quantize` writes serves them.
    #[serde(default)]
    pub as_scored: bool,
    /// The held-out samples, in input order.
    pub samples: Vec<EvalSample>,
    /// The unquantized model first, then the recipes in the order they were given.
    pub recipes: Vec<RecipeResult>,
    pub confidence: EvalConfidence,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSample {
    /// Index in the inputs artifact.
    pub index: usize,
    pub id: String,
    pub num_tokens: usize,
    /// Label positions (tokens the loss is taken on).
    pub num_label_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeResult {
    /// Display name: `unquantized`, `all FP8`, `chosen`, `frontier 10.50 bits`, or a file name.
    pub name: String,
    /// `unquantized`, `all-quantized`, `chosen` (a manifest's own recipe), `frontier` (re-solved
    /// from a manifest at another budget) or `checkpoint` (read from a quantized checkpoint).
    pub kind: String,
    /// The manifest or checkpoint the recipe came from.
    pub source: Option<String>,
    /// Effective bits of the recipe (ModelOpt's formula, with the manifest's cost weights).
    pub effective_bits: f64,
    /// The search objective of the recipe: Σ of its groups' scores (what `search` minimises);
    /// `None` when no scores are known for it.
    pub predicted_objective: Option<f64>,
    pub groups_quantized: usize,
    pub layers_quantized: usize,
    /// Layer name → format, for every layer not left unquantized.
    pub quantized_layers: Vec<QuantizedLayer>,
    /// Per sample, in `Evaluation::samples` order.
    pub per_sample: Vec<SampleMetrics>,
    pub overall: Metrics,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizedLayer {
    pub name: String,
    pub format: String,
}

/// One sample under one recipe: sums and counts, so that samples pool exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleMetrics {
    /// Σ NLL over the label positions (natural log).
    pub nll_sum: f64,
    pub label_tokens: usize,
    /// Σ KL over all positions / over the label positions.
    pub kl_sum_all: f64,
    pub kl_sum_label: f64,
    pub positions: usize,
    /// Positions whose argmax agrees with the unquantized model's, over all / label positions.
    pub top1_agree_all: usize,
    pub top1_agree_label: usize,
}

/// Pooled figures of one recipe, each with its bootstrap interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean NLL per label token (HF's loss, pooled over samples).
    pub mean_nll: Estimate,
    /// `mean_nll − mean_nll(unquantized)` (paired resamples).
    pub delta_nll: Estimate,
    /// `delta_nll / mean_nll(unquantized)`.
    pub delta_nll_relative: Estimate,
    /// `exp(mean_nll)`.
    pub perplexity: Estimate,
    /// Mean KL per position, over all positions / over label positions.
    pub kl_all: Estimate,
    pub kl_label: Estimate,
    /// Share of positions whose top-1 token agrees with the unquantized model's.
    pub top1_agreement_all: Estimate,
    pub top1_agreement_label: Estimate,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    /// 95 % percentile bootstrap interval over samples; `None` with fewer than 2 samples or
    /// without resamples.
    pub ci: Option<[f64; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfidence {
    /// `bootstrap` (samples resampled with replacement) or `none`.
    pub method: String,
    pub resamples: usize,
    pub seed: u64,
    pub level: f64,
}

impl Payload for Evaluation {
    const KIND: &'static str = "qsens.evaluation";
    const VERSION: u32 = 1;
}
