//! `qsens.manifest`: the chosen per-layer formats under a bit budget, with everything a reader
//! needs to trust and reuse them. Written by `search`, read by `manifest-to-md`; documented
//! field by field in `docs/manifest.md`.
//!
//! Conventions:
//! - Per-format vectors (`scores`, `costs`, `score_ci`) follow `formats` order (fewest bits
//!   first, `NONE` last), as in `qsens.scores`.
//! - Costs are unweighted (`params × bits / 16`); a group's weight in the budget is
//!   `cost_weight` (0 for `cost_excluded` groups). Effective bits = 16 × Σ weighted chosen cost /
//!   Σ weighted `NONE` cost, ModelOpt's formula.
//! - *Sensitivity* is the score at the reference format (`summary.reference_format`, the format
//!   with the fewest bits); rank 1 is the most sensitive. `share` is the sensitivity divided by
//!   the sum over all entries of the same level (groups, or layers).
//! - Intervals are `[low, high]`: `ci` a 95 % percentile bootstrap interval of the sensitivity,
//!   `rank_interval` the 90 % interval of the rank over the same resamples.
//! - The manifest is deterministic: no timestamps, no timings, floats as the shortest decimal
//!   that round-trips.

use serde::{Deserialize, Serialize};

use super::scores::{FormatInfo, ModelSummary};
use super::{Payload, Provenance};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub summary: Summary,
    pub formats: Vec<FormatUse>,
    /// Search groups (one format each), in the scores artifact's order.
    pub groups: Vec<GroupEntry>,
    /// Quantizable layers, in the scores artifact's (model) order.
    pub layers: Vec<LayerEntry>,
    pub frontier: Frontier,
    pub confidence: ConfidenceSettings,
    pub exports: Exports,
    /// The scores artifact this manifest was made from.
    pub scores_source: ScoresSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub model: ModelSummary,
    /// Scoring method of the scores artifact (`gradient`, `kl_div`).
    pub method: String,
    /// Compute dtype of the scoring forward.
    pub dtype: String,
    /// Number of scored samples.
    pub samples: usize,
    /// Samples in the inputs artifact (`samples < num_inputs`: scores of a shard).
    pub num_inputs: usize,
    /// The format whose score is a layer's sensitivity (the one with the fewest bits).
    pub reference_format: String,
    pub budget: Budget,
    pub achieved_effective_bits: f64,
    /// Σ weighted cost of the chosen formats.
    pub achieved_cost: f64,
    /// Σ group score of the chosen formats (what the search minimises).
    pub objective: f64,
    /// Σ group score with every searchable group at the reference format.
    pub objective_all_quantized: f64,
    pub groups_total: usize,
    /// Groups at a format other than `NONE`.
    pub groups_quantized: usize,
    pub groups_disabled: usize,
    pub groups_cost_excluded: usize,
    pub layers_total: usize,
    pub layers_quantized: usize,
    /// Σ weight parameters over all groups.
    pub params_total: u64,
    /// Σ weight parameters of the groups at a format other than `NONE`.
    pub params_quantized: u64,
    /// `--disable` patterns given on the command line (the scores' own flags apply too).
    pub disable_patterns: Vec<String>,
    /// `--exclude-cost` patterns given on the command line.
    pub exclude_cost_patterns: Vec<String>,
    pub solver: SolverSummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// The requested effective bits.
    pub effective_bits: f64,
    /// The largest allowed Σ weighted cost: `cost_denominator × effective_bits / 16`.
    pub max_cost: f64,
    /// Σ weighted `NONE` cost (ModelOpt's `cost_denominator`).
    pub cost_denominator: f64,
    /// Smallest achievable effective bits (every searchable group at its cheapest format).
    pub min_effective_bits: f64,
    /// Effective bits with every group at `NONE` (16 unless nothing counts).
    pub max_effective_bits: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SolverSummary {
    /// `pareto-dp-lp-bound`: dynamic programming over the groups keeping the (cost, score)
    /// non-dominated partial solutions, pruned by the LP relaxation (see `search::solver`).
    pub algorithm: String,
    /// `optimal` (proved) or `feasible` (a state limit was hit; see `gap`).
    pub status: String,
    /// `objective − lower_bound` (0 when proved optimal).
    pub gap: f64,
    /// A proven lower bound on the optimum (= objective when proved).
    pub lower_bound: f64,
    /// The LP relaxation's optimum at the budget (a lower bound, usually not attained).
    pub lp_bound: f64,
    /// The objective of the rounded-and-improved LP solution the search started from.
    pub initial_incumbent: f64,
    /// Partial solutions generated / pruned, and the largest number kept after one group.
    pub states_generated: u64,
    pub states_pruned_by_bound: u64,
    pub states_pruned_by_dominance: u64,
    pub states_max_kept: usize,
}

/// A format and how much of the model uses it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormatUse {
    #[serde(flatten)]
    pub info: FormatInfo,
    pub groups_chosen: usize,
    pub layers_chosen: usize,
    pub params_chosen: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupEntry {
    pub name: String,
    pub members: Vec<String>,
    /// `vision`, `text`, `lm_head`, or `mixed`.
    pub tower: String,
    /// Plot series of the group: its members' projection kinds joined by `/` (e.g. `q/k/v`).
    pub series: String,
    pub params: u64,
    /// Only `NONE` was allowed (`--disable` or the scores artifact).
    pub disabled: bool,
    /// Left out of the budget (cost weight 0).
    pub cost_excluded: bool,
    pub cost_weight: f64,
    /// Per format (monotone, as in `qsens.scores`).
    pub scores: Vec<f64>,
    /// Per format: params × bits / 16 (unweighted).
    pub costs: Vec<f64>,
    /// Per format: 95 % bootstrap interval of the score; `None` without per-sample scores.
    pub score_ci: Option<Vec<[f64; 2]>>,
    pub chosen: String,
    pub chosen_index: usize,
    pub sensitivity: f64,
    pub share: f64,
    pub rank: usize,
    pub ci: Option<[f64; 2]>,
    pub rank_interval: Option<[usize; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerEntry {
    pub name: String,
    pub group: String,
    pub tower: String,
    pub kind: String,
    /// Plot series: `q`, `k`, `v`, `o`, `gate`, `up`, `down`, `qkv`, `proj`, `fc1`, `fc2`,
    /// `merger.fc1`, `deepstack.fc1`, `patch_embed`, `lm_head`, or the last name component.
    pub series: String,
    /// Block / decoder-layer index (`None` outside the repeated blocks).
    pub block: Option<usize>,
    pub shape: [u64; 2],
    pub params: u64,
    pub input_amax: f64,
    pub weight_amax: f64,
    /// Per format: params × bits / 16.
    pub costs: Vec<f64>,
    /// Per format: the layer's own score (Σ over samples); `None` when only groups were scored.
    pub scores: Option<Vec<f64>>,
    pub score_ci: Option<Vec<[f64; 2]>>,
    /// The group's chosen format.
    pub chosen: String,
    pub sensitivity: Option<f64>,
    pub share: Option<f64>,
    pub rank: Option<usize>,
    pub ci: Option<[f64; 2]>,
    pub rank_interval: Option<[usize; 2]>,
    /// Kind `experts` only: each expert's calibration, as in the scores artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<crate::artifact::scores::ExpertsCalibration>,
}

/// Minimum objective as a function of the effective-bits budget, from the same scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frontier {
    /// Grid step in bits.
    pub step: f64,
    /// True when `points` holds every Pareto-optimal (bits, objective) pair (`--sweep` on a
    /// model whose exact frontier is small enough).
    pub exhaustive: bool,
    /// Number of Pareto-optimal points when they could be enumerated.
    pub pareto_points: Option<usize>,
    /// Sorted by `budget_bits`; `objective` is non-increasing.
    pub points: Vec<FrontierPoint>,
    /// Index in `points` of the chosen solution.
    pub chosen: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontierPoint {
    /// The budget the point answers.
    pub budget_bits: f64,
    /// Effective bits of the optimal recipe for that budget (≤ `budget_bits`).
    pub effective_bits: f64,
    pub objective: f64,
    pub quantized_groups: usize,
    /// Groups given each format (in `Manifest::formats` order, NONE last); empty where the
    /// recipe is not kept (`pareto` points).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups_per_format: Vec<usize>,
    /// `grid`, `hull` (a vertex of the LP relaxation's frontier: integral, hence optimal),
    /// `pareto` (from the exhaustive enumeration) or `chosen`.
    pub kind: String,
    /// Proved optimal for its budget.
    pub proved: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceSettings {
    /// `bootstrap` (samples resampled with replacement), or `none` without per-sample scores.
    pub method: String,
    pub resamples: usize,
    pub seed: u64,
    /// Level of `ci` (0.95).
    pub level: f64,
    /// Level of `rank_interval` (0.90).
    pub rank_level: f64,
}

/// The chosen recipe in other tools' formats. `None` where a format has no mapping; `notes`
/// says why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exports {
    /// ModelOpt 0.47 `mtq.quantize` config (`{"quant_cfg": [...], "algorithm": "max"}`).
    pub modelopt: Option<serde_json::Value>,
    /// compressed-tensors `quantization_config` (vLLM reads it from `config.json`).
    pub compressed_tensors: Option<serde_json::Value>,
    pub llama_cpp: Option<LlamaCppExport>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaCppExport {
    /// Type to pass as `llama-quantize`'s positional type (must be a quantized type for the
    /// per-tensor overrides to apply).
    pub base_type: String,
    /// `PATTERN=TYPE` entries for `--tensor-type` (anchored regexes over GGUF tensor names).
    pub tensor_types: Vec<String>,
    /// Format → GGUF type used, with `approximate` where the GGUF type is not the same format.
    pub type_map: Vec<GgufTypeMap>,
    /// Layers without a GGUF name in the text model file (vision tower: the mmproj file).
    pub unmapped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GgufTypeMap {
    pub format: String,
    pub gguf_type: String,
    pub approximate: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoresSource {
    pub path: String,
    pub digest: String,
    pub tool: String,
    pub tool_version: String,
    pub provenance: Provenance,
}

impl Payload for Manifest {
    const KIND: &'static str = "qsens.manifest";
    const VERSION: u32 = 1;
}
