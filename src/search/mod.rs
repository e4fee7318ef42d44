//! Stage 4, `search`: per-group formats under a bit budget, proved optimal, with the frontier,
//! confidence intervals and exports, written as a `qsens.manifest`.
//!
//! - [`problem`]: the problem from a `qsens.scores` artifact (exact integer costs).
//! - [`solver`]: the exact multiple-choice knapsack solver.
//! - [`frontier`]: minimum objective vs budget.
//! - [`confidence`]: bootstrap intervals of scores and ranks.
//! - [`exports`]: ModelOpt, compressed-tensors and llama.cpp recipes.
//! - [`reference`]: the check against another tool's recipe (ModelOpt's).
//! - [`synthetic`]: a Qwen3-VL-shaped synthetic scores artifact (tests, benchmarks).

pub mod confidence;
pub mod exports;
pub mod frontier;
pub mod naming;
pub mod problem;
pub mod reference;
pub mod solver;
pub mod synthetic;

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use crate::artifact::manifest::{
    Budget, ConfidenceSettings, Exports, FormatUse, GroupEntry, LayerEntry, Manifest, ScoresSource, SolverSummary,
    Summary,
};
use crate::artifact::scores::Scores;
use crate::artifact::{self, Artifact, Encoding, Location, Provenance};
use crate::cli::Reporter;
use confidence::Bootstrap;
use frontier::FrontierOptions;
pub use problem::{Overrides, Problem, Recipe};
use solver::Limits;

/// How to search (everything but the input and output locations).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub effective_bits: f64,
    pub overrides: Overrides,
    pub frontier: FrontierOptions,
    pub bootstrap: Bootstrap,
    pub limits: Limits,
}

impl Settings {
    pub fn new(effective_bits: f64) -> Self {
        Settings {
            effective_bits,
            overrides: Overrides::default(),
            frontier: FrontierOptions::default(),
            bootstrap: Bootstrap::default(),
            limits: Limits::default(),
        }
    }
}

/// The `search` command.
#[derive(Debug, Clone)]
pub struct SearchArgs {
    pub scores: Location,
    pub output: Location,
    pub export_dir: Option<PathBuf>,
    pub settings: Settings,
}

pub const TOOL: &str = "search";

/// File names written by `--export-dir`.
pub const EXPORT_MODELOPT: &str = "modelopt_quant_cfg.json";
pub const EXPORT_COMPRESSED_TENSORS: &str = "compressed_tensors_quantization_config.json";
pub const EXPORT_LLAMA_TYPES: &str = "llama_cpp_tensor_types.txt";
pub const EXPORT_LLAMA_ARGS: &str = "llama_quantize_args.txt";

/// Reads the scores, searches, writes the manifest (always JSON) and the exports.
pub fn run(args: &SearchArgs, reporter: Reporter) -> Result<()> {
    let bytes = artifact::read_bytes(&args.scores)?;
    let scores: Artifact<Scores> = artifact::from_bytes(&bytes).with_context(|| format!("{}", args.scores))?;
    let source = ScoresSource {
        path: args.scores.to_string(),
        digest: artifact::sha256_bytes(&bytes),
        tool: scores.tool.clone(),
        tool_version: scores.tool_version.clone(),
        provenance: scores.provenance.clone(),
    };
    let manifest = build_manifest(&scores.payload, source, &args.settings, reporter)
        .with_context(|| format!("{}", args.scores))?;

    let mut prov = Provenance::default();
    prov.source("scores", &args.scores, manifest.scores_source.digest.clone());
    let s = &args.settings;
    prov.param("effective_bits", s.effective_bits)
        .param("disable", s.overrides.disable.join(","))
        .param("exclude_cost", s.overrides.exclude_cost.join(","))
        .param("sweep", s.frontier.exhaustive)
        .param("sweep_step", s.frontier.step)
        .param("bootstrap", s.bootstrap.resamples)
        .param("seed", s.bootstrap.seed);
    let out = Artifact::new(TOOL, prov, manifest);
    let bytes = artifact::to_bytes(&out, Encoding::Json).context("encoding the manifest")?;

    if let Some(dir) = &args.export_dir {
        write_exports(dir, &out.payload.exports)?;
    }
    artifact::write_bytes_atomic(&args.output, &bytes)?;
    let m = &out.payload;
    reporter.note(format!(
        "{}: {}/{} groups quantized, {:.4} effective bits (budget {}), objective {:.6e} ({})",
        TOOL,
        m.summary.groups_quantized,
        m.summary.groups_total,
        m.summary.achieved_effective_bits,
        m.summary.budget.effective_bits,
        m.summary.objective,
        m.summary.solver.status
    ));
    if s.frontier.exhaustive {
        reporter.note("budget_bits\teffective_bits\tobjective\tquantized_groups\tkind");
        for p in &m.frontier.points {
            reporter.note(format!(
                "{:.4}\t{:.4}\t{:.6e}\t{}\t{}",
                p.budget_bits, p.effective_bits, p.objective, p.quantized_groups, p.kind
            ));
        }
    }
    Ok(())
}

fn write_exports(dir: &std::path::Path, exports: &Exports) -> Result<()> {
    let json = |v: &serde_json::Value| -> Result<Vec<u8>> {
        let mut b = serde_json::to_vec_pretty(v)?;
        b.push(b'\n');
        Ok(b)
    };
    if let Some(v) = &exports.modelopt {
        artifact::write_file_atomic(&dir.join(EXPORT_MODELOPT), &json(v)?)?;
    }
    if let Some(v) = &exports.compressed_tensors {
        artifact::write_file_atomic(&dir.join(EXPORT_COMPRESSED_TENSORS), &json(v)?)?;
    }
    if let Some(l) = &exports.llama_cpp {
        let mut types = l.tensor_types.join("\n");
        types.push('\n');
        artifact::write_file_atomic(&dir.join(EXPORT_LLAMA_TYPES), types.as_bytes())?;
        artifact::write_file_atomic(&dir.join(EXPORT_LLAMA_ARGS), exports::llama_cpp_args(l).as_bytes())?;
    }
    Ok(())
}

fn share(x: f64, total: f64) -> f64 {
    if total > 0.0 {
        x / total
    } else {
        0.0
    }
}

/// Everything `search` computes, as a manifest payload.
pub fn build_manifest(
    scores: &Scores,
    source: ScoresSource,
    settings: &Settings,
    reporter: Reporter,
) -> Result<Manifest> {
    let problem = Problem::from_scores(scores, &settings.overrides)?;
    for p in &problem.unmatched_patterns {
        reporter.note(format!("{TOOL}: warning: pattern '{p}' matches no group or layer"));
    }
    let recipe = problem.solve(settings.effective_bits, &settings.limits)?;
    let none = problem.none_index();
    let reference = 0;

    // Confidence (only when every entity has per-sample scores).
    let ns = scores.samples.len();
    let boot = &settings.bootstrap;
    ensure!(boot.resamples > 0, "the number of bootstrap resamples must be positive");
    let group_ci = if ns > 0 && scores.groups.iter().all(|g| !g.per_sample.is_empty()) {
        let ps: Vec<&[Vec<f64>]> = scores.groups.iter().map(|g| g.per_sample.as_slice()).collect();
        Some(confidence::intervals(&ps, reference, true, boot))
    } else {
        None
    };
    let have_layer_scores = !scores.layers.is_empty() && scores.layers.iter().all(|l| !l.per_sample.is_empty());
    let layer_ci = if ns > 0 && have_layer_scores {
        let ps: Vec<&[Vec<f64>]> = scores.layers.iter().map(|l| l.per_sample.as_slice()).collect();
        Some(confidence::intervals(&ps, reference, false, boot))
    } else {
        None
    };

    // Groups.
    let sens: Vec<f64> = problem.groups.iter().map(|g| g.scores[reference]).collect();
    let total_sens: f64 = sens.iter().sum();
    let ranks = confidence::ranks_desc(&sens);
    let mut group_entries = Vec::with_capacity(problem.groups.len());
    for (i, g) in problem.groups.iter().enumerate() {
        let towers: Vec<&str> = g.members.iter().map(|m| layer_tower(scores, m)).collect();
        let tower =
            if towers.windows(2).all(|w| w[0] == w[1]) { towers.first().copied().unwrap_or("text") } else { "mixed" };
        let ci = group_ci.as_ref().map(|c| &c[i]);
        group_entries.push(GroupEntry {
            name: g.name.clone(),
            members: g.members.clone(),
            tower: tower.to_string(),
            series: naming::group_series(&g.members),
            params: g.params,
            disabled: g.disabled,
            cost_excluded: g.cost_excluded,
            cost_weight: g.cost_weight,
            scores: g.scores.clone(),
            costs: g.costs.clone(),
            score_ci: ci.map(|c| c.per_format.clone()),
            chosen: problem.format_name(recipe.choice[i]).to_string(),
            chosen_index: recipe.choice[i],
            sensitivity: sens[i],
            share: share(sens[i], total_sens),
            rank: ranks[i],
            ci: ci.map(|c| c.per_format[reference]),
            rank_interval: ci.map(|c| c.rank),
        });
    }

    // Layers.
    let group_index: std::collections::HashMap<&str, usize> =
        problem.groups.iter().enumerate().map(|(i, g)| (g.name.as_str(), i)).collect();
    let layer_scores: Option<Vec<Vec<f64>>> = have_layer_scores
        .then(|| scores.layers.iter().map(|l| l.per_sample.iter().map(|row| row.iter().sum()).collect()).collect());
    let layer_sens: Option<Vec<f64>> = layer_scores.as_ref().map(|s| s.iter().map(|v| v[reference]).collect());
    let layer_total: f64 = layer_sens.as_ref().map_or(0.0, |s| s.iter().sum());
    let layer_ranks = layer_sens.as_ref().map(|s| confidence::ranks_desc(s));
    let mut layer_entries = Vec::with_capacity(scores.layers.len());
    for (i, l) in scores.layers.iter().enumerate() {
        let g = group_index[l.group.as_str()];
        let class = naming::classify(&l.name);
        let ci = layer_ci.as_ref().map(|c| &c[i]);
        layer_entries.push(LayerEntry {
            name: l.name.clone(),
            group: l.group.clone(),
            tower: l.tower.clone(),
            kind: l.kind.clone(),
            series: class.series,
            block: class.block,
            shape: l.shape,
            params: l.params,
            input_amax: l.input_amax,
            weight_amax: l.weight_amax,
            costs: problem.formats.iter().map(|f| l.params as f64 * f.effective_bits / 16.0).collect(),
            scores: layer_scores.as_ref().map(|s| s[i].clone()),
            score_ci: ci.map(|c| c.per_format.clone()),
            chosen: group_entries[g].chosen.clone(),
            sensitivity: layer_sens.as_ref().map(|s| s[i]),
            share: layer_sens.as_ref().map(|s| share(s[i], layer_total)),
            rank: layer_ranks.as_ref().map(|r| r[i]),
            ci: ci.map(|c| c.per_format[reference]),
            rank_interval: ci.map(|c| c.rank),
            experts: l.experts.clone(),
        });
    }

    // Formats.
    let formats = problem
        .formats
        .iter()
        .enumerate()
        .map(|(f, info)| {
            let groups: Vec<&GroupEntry> = group_entries.iter().filter(|g| g.chosen_index == f).collect();
            FormatUse {
                info: info.clone(),
                groups_chosen: groups.len(),
                layers_chosen: groups.iter().map(|g| g.members.len()).sum(),
                params_chosen: groups.iter().map(|g| g.params).sum(),
            }
        })
        .collect();

    let frontier = frontier::frontier(&problem, settings.effective_bits, &recipe, &settings.frontier)?;
    let exports = build_exports(&group_entries);

    let quantized: Vec<&GroupEntry> = group_entries.iter().filter(|g| g.chosen_index != none).collect();
    let all_quantized: Vec<usize> = problem.groups.iter().map(|g| if g.disabled { none } else { reference }).collect();
    let objective_all_quantized = problem.evaluate(&all_quantized)?.objective;
    let summary = Summary {
        model: scores.model.clone(),
        method: scores.method.clone(),
        dtype: scores.dtype.clone(),
        samples: ns,
        num_inputs: scores.num_inputs,
        reference_format: problem.format_name(reference).to_string(),
        budget: Budget {
            effective_bits: settings.effective_bits,
            max_cost: problem.cost_of_units(problem.capacity(settings.effective_bits)?),
            cost_denominator: problem.cost_denominator(),
            min_effective_bits: problem.min_effective_bits(),
            max_effective_bits: problem.max_effective_bits(),
        },
        achieved_effective_bits: recipe.effective_bits,
        achieved_cost: recipe.cost,
        objective: recipe.objective,
        objective_all_quantized,
        groups_total: group_entries.len(),
        groups_quantized: quantized.len(),
        groups_disabled: group_entries.iter().filter(|g| g.disabled).count(),
        groups_cost_excluded: group_entries.iter().filter(|g| g.cost_excluded).count(),
        layers_total: layer_entries.len(),
        layers_quantized: layer_entries.iter().filter(|l| l.chosen != problem.format_name(none)).count(),
        params_total: group_entries.iter().map(|g| g.params).sum(),
        params_quantized: quantized.iter().map(|g| g.params).sum(),
        disable_patterns: settings.overrides.disable.clone(),
        exclude_cost_patterns: settings.overrides.exclude_cost.clone(),
        solver: SolverSummary {
            algorithm: "pareto-dp-lp-bound".into(),
            status: if recipe.proved { "optimal" } else { "feasible" }.into(),
            gap: recipe.objective - recipe.lower_bound,
            lower_bound: recipe.lower_bound,
            lp_bound: recipe.lp_bound,
            initial_incumbent: recipe.initial_incumbent,
            states_generated: recipe.stats.generated,
            states_pruned_by_bound: recipe.stats.pruned_by_bound,
            states_pruned_by_dominance: recipe.stats.pruned_by_dominance,
            states_max_kept: recipe.stats.max_kept,
        },
    };
    Ok(Manifest {
        summary,
        formats,
        groups: group_entries,
        layers: layer_entries,
        frontier,
        confidence: ConfidenceSettings {
            method: if group_ci.is_some() { "bootstrap" } else { "none" }.into(),
            resamples: boot.resamples,
            seed: boot.seed,
            level: confidence::SCORE_LEVEL,
            rank_level: confidence::RANK_LEVEL,
        },
        exports,
        scores_source: source,
    })
}

fn layer_tower<'a>(scores: &'a Scores, name: &'a str) -> &'a str {
    scores.layers.iter().find(|l| l.name == name).map_or_else(|| naming::tower_of(name), |l| l.tower.as_str())
}

/// The exports of a chosen recipe (per group member, in group then member order).
fn build_exports(groups: &[GroupEntry]) -> Exports {
    let layers: Vec<exports::LayerChoice> = groups
        .iter()
        .flat_map(|g| g.members.iter().map(move |m| exports::LayerChoice { name: m, format: &g.chosen }))
        .collect();
    let mut notes = Vec::new();
    let modelopt = exports::modelopt(&layers).map_err(|e| notes.push(e)).ok();
    let compressed_tensors = exports::compressed_tensors(&layers).map_err(|e| notes.push(e)).ok();
    let llama_cpp = exports::llama_cpp(&layers).map_err(|e| notes.push(e)).ok();
    if layers.iter().any(|l| problem::normalize_format_name(l.format).contains("AWQ")) {
        notes.push(
            "AWQ layers: one mtq.quantize config cannot carry per-layer AWQ smoothing next to max-calibrated \
             layers, so the ModelOpt config uses algorithm 'max' for all (as ModelOpt's own get_auto_quantize_config \
             does), and the compressed-tensors and GGUF entries describe the weight format only: the smoothing \
             (α and scales per layer) is in the scores artifact"
                .into(),
        );
    }
    if layers.iter().any(|l| problem::normalize_format_name(l.format) == "INT8_SMOOTHQUANT") {
        notes.push(
            "INT8_SMOOTHQUANT layers: the ModelOpt config gives them INT8's quantizers with algorithm 'max' (one \
             config cannot carry per-layer smoothing next to max-calibrated layers) and the GGUF entry the weight \
             format only: the SmoothQuant pre-quant scales per layer are in the scores artifact"
                .into(),
        );
    }
    if let Some(l) = &llama_cpp {
        if l.type_map.iter().any(|m| m.approximate) {
            notes.push(
                "llama.cpp export: GGUF has no FP8 or INT4-block type; those layers map to the nearest GGUF type \
                 (q8_0 / q4_0: integers with one scale per 32 weights): approximate"
                    .into(),
            );
        }
        if !l.unmapped.is_empty() {
            notes.push(format!(
                "llama.cpp export: {} layers have no tensor in the text GGUF (the vision tower lives in the mmproj \
                 file, which llama-quantize does not take) and are not listed",
                l.unmapped.len()
            ));
        }
    }
    Exports { modelopt, compressed_tensors, llama_cpp, notes }
}
