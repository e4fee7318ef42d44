//! Checking our optimum against another tool's recipe on the same scores, and reading the
//! ModelOpt `auto_quantize` dumps of the shared fixtures (`modelopt/autoquant_*.json`).
//!
//! [`compare`] is the acceptance check: for a budget, our objective must not exceed the
//! reference recipe's objective evaluated on the same scores, and our achieved bits must not
//! exceed the budget. It takes any [`Problem`], so it runs on ModelOpt's scores (converted with
//! [`ModelOptRun::to_scores`]) and on `score-layers` output alike.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use super::naming;
use super::problem::{normalize_format_name, Problem};
use super::solver::Limits;
use crate::artifact::scores::{CostWeight, FormatInfo, GroupScores, LayerScores, ModelSummary, SampleSummary, Scores};

/// Our optimum and a reference recipe at one budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub target_bits: f64,
    pub ours_objective: f64,
    pub ours_bits: f64,
    pub ours_quantized: usize,
    pub ours_proved: bool,
    /// The reference recipe evaluated on the same problem.
    pub reference_objective: f64,
    pub reference_bits: f64,
    pub reference_quantized: usize,
}

/// Solves `problem` at `target_bits` and checks it against `reference` (group name → format
/// name, ModelOpt spellings accepted): an error if our objective is larger or our bits exceed
/// the target, or if the reference does not name every group with a known format.
pub fn compare(problem: &Problem, target_bits: f64, reference: &BTreeMap<String, String>) -> Result<Comparison> {
    let mut choice = Vec::with_capacity(problem.groups.len());
    for g in &problem.groups {
        let f =
            reference.get(&g.name).with_context(|| format!("reference recipe has no entry for group '{}'", g.name))?;
        let idx =
            problem.format_index(f).with_context(|| format!("reference format '{f}' is not among the formats"))?;
        choice.push(idx);
    }
    ensure!(
        reference.len() == problem.groups.len(),
        "reference recipe names {} groups, the problem has {}",
        reference.len(),
        problem.groups.len()
    );
    let theirs = problem.evaluate(&choice)?;
    let ours = problem.solve(target_bits, &Limits::default())?;
    let none = problem.none_index();
    let count = |c: &[usize]| c.iter().filter(|&&f| f != none).count();
    let cmp = Comparison {
        target_bits,
        ours_objective: ours.objective,
        ours_bits: ours.effective_bits,
        ours_quantized: count(&ours.choice),
        ours_proved: ours.proved,
        reference_objective: theirs.objective,
        reference_bits: theirs.effective_bits,
        reference_quantized: count(&choice),
    };
    if cmp.ours_objective > cmp.reference_objective {
        bail!(
            "at {target_bits} bits our objective {} exceeds the reference's {}",
            cmp.ours_objective,
            cmp.reference_objective
        );
    }
    if cmp.ours_bits > target_bits {
        bail!("at {target_bits} bits we achieve {} bits, over the budget", cmp.ours_bits);
    }
    Ok(cmp)
}

/// One ModelOpt `auto_quantize` run as dumped in the fixtures.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelOptRun {
    #[serde(default)]
    pub variant: String,
    pub method: String,
    pub dtype: String,
    pub samples: Vec<String>,
    pub groups: Vec<ModelOptGroup>,
    pub cost_denominator: f64,
    pub targets: Vec<ModelOptTarget>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelOptGroup {
    pub group: String,
    pub modules: Vec<String>,
    pub formats: Vec<String>,
    pub scores: Vec<f64>,
    pub costs: Vec<f64>,
    pub uncompressed_cost: f64,
    pub cost_weight: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelOptTarget {
    pub effective_bits_target: f64,
    pub effective_bits_achieved: f64,
    pub total_score: f64,
    pub quantized_groups: Vec<String>,
    /// Group name → ModelOpt recipe name (`FP8_DEFAULT_CFG(effective-bits: 8.0)`).
    pub recipe: BTreeMap<String, String>,
}

/// Effective bits in a ModelOpt recipe name (`...(effective-bits: 8.0)`).
fn bits_in_name(name: &str) -> Option<f64> {
    let inner = name.split("effective-bits:").nth(1)?;
    inner.trim().trim_end_matches(')').trim().parse().ok()
}

impl ModelOptRun {
    pub fn from_json(bytes: &[u8]) -> Result<ModelOptRun> {
        serde_json::from_slice(bytes).context("not a ModelOpt auto_quantize dump")
    }

    /// A `qsens.scores` artifact with ModelOpt's groups, scores and costs. The per-sample scores
    /// are one pseudo-sample (the dump only has totals). `shapes` gives each module's weight
    /// shape `[out, in]` (from the checkpoint); groups whose cost weight is 0 (cost excluded)
    /// take their params from it, the others must agree with it.
    pub fn to_scores(&self, shapes: &BTreeMap<String, [u64; 2]>) -> Result<Scores> {
        let first = self.groups.first().context("no groups")?;
        let formats: Vec<FormatInfo> = first
            .formats
            .iter()
            .map(|f| {
                let name = normalize_format_name(f);
                let bits = bits_in_name(f).with_context(|| format!("format '{f}' has no effective bits"))?;
                let (weight, input) = if name == "NONE" {
                    ("unquantized".to_string(), "unquantized".to_string())
                } else {
                    (format!("{f} (ModelOpt)"), format!("{f} (ModelOpt)"))
                };
                Ok(FormatInfo { name, effective_bits: bits, weight, input, modelopt_bits: None })
            })
            .collect::<Result<_>>()?;
        let mut layers = Vec::new();
        let mut groups = Vec::new();
        for g in &self.groups {
            ensure!(g.formats == first.formats, "group '{}' has other formats", g.group);
            let mut params = 0u64;
            for m in &g.modules {
                let shape = *shapes.get(m).with_context(|| format!("no weight shape for module '{m}'"))?;
                params += shape[0] * shape[1];
                let kind = if m.contains("patch_embed") { "patch_embed" } else { "linear" };
                layers.push(LayerScores {
                    name: m.clone(),
                    group: g.group.clone(),
                    tower: naming::tower_of(m).to_string(),
                    kind: kind.to_string(),
                    shape,
                    params: shape[0] * shape[1],
                    input_amax: 0.0,
                    weight_amax: 0.0,
                    per_sample: Vec::new(),
                    format_calibration: Vec::new(),
                    experts: None,
                });
            }
            if g.cost_weight != 0.0 {
                ensure!(
                    (g.uncompressed_cost / g.cost_weight - params as f64).abs() < 0.5,
                    "group '{}': checkpoint params {params} disagree with ModelOpt's cost {}",
                    g.group,
                    g.uncompressed_cost
                );
            }
            let costs = formats.iter().map(|f| params as f64 * f.effective_bits / 16.0).collect();
            groups.push(GroupScores {
                name: g.group.clone(),
                members: g.modules.clone(),
                params,
                costs,
                scores: g.scores.clone(),
                per_sample: g.scores.iter().map(|&s| vec![s]).collect(),
                disabled: false,
                cost_excluded: g.cost_weight == 0.0,
                cost_weight: cost_weight_of(g.cost_weight)?,
            });
        }
        Ok(Scores {
            model: ModelSummary {
                name: format!("qwen3-vl-{}", if self.variant.is_empty() { "modelopt" } else { &self.variant }),
                architecture: "Qwen3VLForConditionalGeneration".into(),
                num_parameters: 0,
            },
            method: self.method.clone(),
            dtype: self.dtype.clone(),
            formats,
            samples: vec![SampleSummary {
                index: 0,
                id: format!("modelopt-total-of-{}", self.samples.len()),
                num_tokens: 0,
                num_image_tokens: 0,
                num_label_tokens: 0,
                loss: None,
            }],
            num_inputs: 1,
            calibration_samples: Vec::new(),
            layers,
            groups,
        })
    }
}

/// ModelOpt's cost weight of a group as an exact fraction: `None` for 1 (and 0, which is
/// `cost_excluded`); `active_moe`'s top_k / experts otherwise.
fn cost_weight_of(w: f64) -> Result<Option<CostWeight>> {
    ensure!(w.is_finite() && w >= 0.0, "cost weight {w} is not a number ≥ 0");
    let weight = CostWeight::from_value(w);
    ensure!(weight.is_some() || w == 0.0 || w == 1.0, "cost weight {w} is no fraction with a denominator up to 65536");
    Ok(weight)
}
