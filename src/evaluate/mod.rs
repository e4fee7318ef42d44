//! Stage `evaluate`: measured loss, KL and top-1 agreement of quantization recipes on held-out
//! samples, beside the objective `search` predicted for them.
//!
//! Every recipe is run as the checkpoint `quantize` writes for it computes
//! ([`crate::quant::served`]): FP8 weights dequantized from E4M3 with their scale, inputs
//! quantized with their static calibrated scale. A recipe comes from a manifest (its chosen
//! recipe, or re-solved at other budgets along its frontier) or from a quantized checkpoint
//! directory, which gives the same numbers as the manifest it was written from. The unquantized
//! model and, with a manifest, every searchable group at its fewest-bits format are always
//! measured too. Per sample and recipe: one forward with logits at every position, compared with
//! the unquantized forward's ([`metrics`]).

#[cfg(feature = "cuda")]
mod cuda;
pub mod metrics;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;

use crate::artifact::evaluation::{
    EvalConfidence, EvalSample, Evaluation, QuantizedLayer, RecipeResult, SampleMetrics,
};
use crate::artifact::inputs::ModelInputs;
use crate::artifact::manifest::{LayerEntry, Manifest};
use crate::artifact::scores::{CostWeight, GroupScores, LayerScores, ModelSummary, Scores};
use crate::artifact::{self, Artifact, Location, Provenance};
use crate::cli::Reporter;
use crate::model::loader::Checkpoint;
use crate::model::qwen3_vl::{ForwardOptions, Input, Keep, LogitsMode, Qwen3VL};
use crate::model::{LayerKind, NoTap, Tap};
use crate::quant::served::{self, DequantizedWeights, RecipeLayer, ServedLayer, ServedPlan, ServedTap};
use crate::quant::{WeightStats, NONE};
use crate::score::{self, Method};
use crate::search::confidence::Bootstrap;
use crate::search::solver::Limits;
use crate::search::{Overrides, Problem};

pub const TOOL: &str = "evaluate";

/// Everything `evaluate` needs.
#[derive(Debug, Clone)]
pub struct EvaluateArgs {
    /// The unquantized checkpoint.
    pub model_dir: PathBuf,
    /// Held-out `qsens.model-inputs`.
    pub inputs: Location,
    /// Manifests whose chosen recipes are measured; the first one also gives the all-quantized
    /// baseline and the frontier recipes.
    pub manifests: Vec<Location>,
    /// Quantized checkpoints (written by `quantize`) measured as they are.
    pub checkpoints: Vec<PathBuf>,
    /// Recipes re-solved along the first manifest's frontier.
    pub frontier: usize,
    /// Measure only the first N samples.
    pub num_samples: Option<usize>,
    /// Run the manifests' recipes as scored ([`served::plan_as_scored`]) instead of as served.
    pub as_scored: bool,
    pub output: Location,
    pub device: String,
    pub dtype: DType,
    pub bootstrap: Bootstrap,
    /// Write wall times (JSON) here; kept out of the artifact so it stays deterministic.
    pub timings: Option<PathBuf>,
}

/// A recipe ready to run.
struct Planned {
    result: RecipeResult,
    tap: ServedTap,
    /// The model it runs on: `None` for the unquantized model, else an index into the loaded
    /// quantized checkpoints.
    model: Option<usize>,
}

/// Runs `evaluate`.
pub fn run(args: &EvaluateArgs, reporter: &Reporter) -> Result<()> {
    ensure!(
        !args.manifests.is_empty() || !args.checkpoints.is_empty(),
        "nothing to evaluate: give --manifest and/or --checkpoint"
    );
    let started = std::time::Instant::now();
    let input_bytes = artifact::read_bytes(&args.inputs)?;
    let inputs: Artifact<ModelInputs> =
        artifact::from_bytes(&input_bytes).with_context(|| format!("{}", args.inputs))?;
    let inputs = inputs.payload;
    let mut provenance = Provenance::default();
    provenance.source("inputs", &args.inputs, artifact::sha256_bytes(&input_bytes));
    artifact::model_provenance(&args.model_dir, &mut provenance)?;

    let device = crate::device::parse_device(&args.device)?;
    let model = Qwen3VL::load(&args.model_dir, args.dtype, &device)
        .with_context(|| format!("loading model from {}", args.model_dir.display()))?;
    score::validate_inputs(&inputs, &model, Method::KlDiv).with_context(|| format!("{}", args.inputs))?;
    let n = inputs.samples.len().min(args.num_samples.unwrap_or(usize::MAX));
    ensure!(n > 0, "{}: no samples to evaluate", args.inputs);

    let mut manifests = Vec::new();
    for loc in &args.manifests {
        let bytes = artifact::read_bytes(loc)?;
        let m: Artifact<Manifest> = artifact::from_bytes(&bytes).with_context(|| format!("{loc}"))?;
        check_manifest_model(loc, &m.payload, &provenance)?;
        provenance.source("manifest", loc, artifact::sha256_bytes(&bytes));
        manifests.push((loc.clone(), m.payload));
    }

    // The recipes.
    let mut cache = DequantizedWeights::default();
    let mut planned = vec![Planned {
        result: empty_result("unquantized", "unquantized", None, 16.0, Some(0.0), 0, &[]),
        tap: ServedTap::default(),
        model: None,
    }];
    let weight_amax = weight_amaxes(&model)?;
    for (i, (loc, m)) in manifests.iter().enumerate() {
        let problem = Problem::from_scores(&scores_of(m), &Overrides::default())
            .with_context(|| format!("{loc}: rebuilding its search problem"))?;
        let mut add = |name: String, kind: &str, choice: Vec<usize>| -> Result<()> {
            let (plan, experts) = plan_of(m, &problem, &choice, &model, &weight_amax, args.as_scored)
                .with_context(|| format!("{loc}"))?;
            let tap = served_tap(&plan, &experts, &model, &mut cache).with_context(|| format!("{loc}"))?;
            let mut result = recipe_result(name, kind, loc, m, &problem, &plan, &experts)?;
            if kind == "frontier" {
                // Named by what is served (a kept patch embedding or tied lm_head counts 16-bit).
                result.name = format!("frontier {:.2} bits", result.effective_bits);
            }
            planned.push(Planned { result, tap, model: None });
            Ok(())
        };
        if i == 0 {
            let fewest: Vec<usize> =
                problem.groups.iter().map(|g| if g.disabled { problem.none_index() } else { 0 }).collect();
            add(format!("all {}", problem.format_name(0)), "all-quantized", fewest)?;
        }
        let chosen: Vec<usize> = m.groups.iter().map(|g| g.chosen_index).collect();
        let name = if manifests.len() == 1 { "chosen".to_string() } else { format!("chosen ({})", loc) };
        add(name, "chosen", chosen.clone())?;
        if i == 0 && args.frontier > 0 {
            let (lo, hi) = (problem.min_effective_bits(), problem.max_effective_bits());
            let mut seen = vec![chosen];
            for k in 1..=args.frontier {
                let budget = lo + (hi - lo) * k as f64 / (args.frontier + 1) as f64;
                let r = problem.solve(budget, &Limits::default())?;
                if seen.contains(&r.choice) {
                    continue;
                }
                seen.push(r.choice.clone());
                add(String::new(), "frontier", r.choice)?;
            }
        }
    }
    let mut checkpoint_models = Vec::new();
    for dir in &args.checkpoints {
        let (qmodel, tap, result) = load_checkpoint(dir, args, &device, manifests.first())?;
        artifact::model_provenance(dir, &mut provenance)?;
        planned.push(Planned { result, tap, model: Some(checkpoint_models.len()) });
        checkpoint_models.push(qmodel);
    }

    let load_s = started.elapsed().as_secs_f64();
    let measuring = std::time::Instant::now();

    // Per sample: the unquantized forward, then each recipe against it.
    let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Nothing, trace: false };
    let mut per_recipe: Vec<Vec<SampleMetrics>> = vec![Vec::with_capacity(n); planned.len()];
    let mut samples = Vec::with_capacity(n);
    let bar = reporter.bar((n * planned.len()) as u64, "evaluating");
    // With --timings, forwards and metrics are timed apart (the device synchronized after each
    // forward, so the time of its queued kernels is not counted with the metrics').
    let (mut forward_s, mut metrics_s) = (0.0f64, 0.0f64);
    let timed = args.timings.is_some();
    let mut timed_forward = |m: &Qwen3VL, tap: &mut dyn Tap, input: &Input| -> Result<candle_core::Tensor> {
        let t = std::time::Instant::now();
        let logits = m.forward(input, tap, &opts)?.logits.context("forward returned no logits")?;
        if timed {
            device.synchronize()?;
        }
        forward_s += t.elapsed().as_secs_f64();
        Ok(logits)
    };
    for (index, sample) in inputs.samples.iter().take(n).enumerate() {
        bar.set_message(sample.id.clone());
        let input = score::model_input(sample, &inputs)?;
        let labels = &sample.labels;
        let base =
            timed_forward(&model, &mut NoTap, &input).with_context(|| format!("sample {index} ({})", sample.id))?;
        let t = std::time::Instant::now();
        let reference =
            metrics::Reference::new(&base, labels).with_context(|| format!("sample {index} ({})", sample.id))?;
        metrics_s += t.elapsed().as_secs_f64();
        samples.push(EvalSample {
            index,
            id: sample.id.clone(),
            num_tokens: labels.len(),
            num_label_tokens: labels.iter().skip(1).filter(|&&l| l != -100).count(),
        });
        for (r, p) in planned.iter_mut().enumerate() {
            let m = match p.model {
                None => &model,
                Some(i) => &checkpoint_models[i],
            };
            let logits = if r == 0 {
                base.clone()
            } else {
                timed_forward(m, &mut p.tap, &input)
                    .with_context(|| format!("sample {index} ({}), recipe {}", sample.id, p.result.name))?
            };
            let t = std::time::Instant::now();
            per_recipe[r].push(reference.metrics(&logits)?);
            metrics_s += t.elapsed().as_secs_f64();
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let evaluate_s = measuring.elapsed().as_secs_f64();

    let base = per_recipe[0].clone();
    let mut recipes = Vec::with_capacity(planned.len());
    for (p, per_sample) in planned.into_iter().zip(per_recipe) {
        let mut result = p.result;
        result.overall = metrics::summarize(&per_sample, &base, &args.bootstrap)?;
        result.per_sample = per_sample;
        recipes.push(result);
    }
    provenance
        .param("dtype", score::dtype_name(args.dtype))
        .param("frontier", args.frontier)
        .param("bootstrap", args.bootstrap.resamples)
        .param("seed", args.bootstrap.seed);
    let model_summary = match manifests.first() {
        Some((_, m)) => m.summary.model.clone(),
        None => ModelSummary {
            name: dir_name(&args.model_dir),
            architecture: "Qwen3VLForConditionalGeneration".into(),
            num_parameters: model.num_parameters(),
        },
    };
    let evaluation = Evaluation {
        model: model_summary,
        dtype: score::dtype_name(args.dtype).into(),
        as_scored: args.as_scored,
        samples,
        recipes,
        confidence: EvalConfidence {
            method: if args.bootstrap.resamples > 0 && n > 1 { "bootstrap" } else { "none" }.into(),
            resamples: args.bootstrap.resamples,
            seed: args.bootstrap.seed,
            level: crate::search::confidence::SCORE_LEVEL,
        },
    };
    artifact::write(args.output.clone(), &Artifact::new(TOOL, provenance, evaluation.clone()))?;
    for r in &evaluation.recipes[1..] {
        reporter.note(format!(
            "{:<24} {:>6.2} bits  Δloss {:+.3} %  KL/token {:.3e}  top-1 agreement {:.2} %",
            r.name,
            r.effective_bits,
            100.0 * r.overall.delta_nll_relative.value,
            r.overall.kl_all.value,
            100.0 * r.overall.top1_agreement_all.value
        ));
    }
    reporter.detail(format!("timings: load (model, inputs, recipes) {load_s:.2} s, measurement {evaluate_s:.2} s"));
    if let Some(path) = &args.timings {
        let json = serde_json::json!({
            "load_s": load_s,
            "evaluate_s": evaluate_s,
            "forward_s": forward_s,
            "metrics_s": metrics_s,
            "samples": n,
            "recipes": evaluation.recipes.len(),
            "device": args.device,
            "dtype": score::dtype_name(args.dtype),
        });
        artifact::write_file_atomic(path, &serde_json::to_vec_pretty(&json)?)?;
    }
    reporter.note(format!("evaluated {} recipes on {n} samples → {}", evaluation.recipes.len(), args.output));
    Ok(())
}

fn dir_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

/// The manifest's scores must have been made from this checkpoint (same config and weights).
fn check_manifest_model(loc: &Location, m: &Manifest, here: &Provenance) -> Result<()> {
    let here_digests: Vec<&str> =
        here.sources.iter().filter(|s| s.role.starts_with("model-")).map(|s| s.digest.as_str()).collect();
    for s in m.scores_source.provenance.sources.iter().filter(|s| s.role.starts_with("model-")) {
        ensure!(
            here_digests.contains(&s.digest.as_str()),
            "{loc} was made from another model: its {} {} is not in this checkpoint",
            s.role,
            s.path
        );
    }
    Ok(())
}

/// max |W| of every layer, as the model holds it.
fn weight_amaxes(model: &Qwen3VL) -> Result<Vec<f32>> {
    (0..model.layers().len()).map(|id| Ok(WeightStats::of(model.linear(id).weight())?.amax)).collect()
}

/// A scores artifact with the manifest's groups and layers (monotone scores, costs, flags): enough
/// to rebuild its search problem and re-solve or evaluate recipes on it.
fn scores_of(m: &Manifest) -> Scores {
    let formats: Vec<_> = m.formats.iter().map(|f| f.info.clone()).collect();
    Scores {
        model: m.summary.model.clone(),
        method: m.summary.method.clone(),
        dtype: m.summary.dtype.clone(),
        formats,
        samples: Vec::new(),
        num_inputs: m.summary.num_inputs,
        calibration_samples: Vec::new(),
        layers: m
            .layers
            .iter()
            .map(|l| LayerScores {
                name: l.name.clone(),
                group: l.group.clone(),
                tower: l.tower.clone(),
                kind: l.kind.clone(),
                shape: l.shape,
                params: l.params,
                input_amax: l.input_amax,
                weight_amax: l.weight_amax,
                per_sample: Vec::new(),
                format_calibration: Vec::new(),
                experts: None,
            })
            .collect(),
        groups: m
            .groups
            .iter()
            .map(|g| GroupScores {
                name: g.name.clone(),
                members: g.members.clone(),
                params: g.params,
                costs: g.costs.clone(),
                scores: g.scores.clone(),
                per_sample: Vec::new(),
                disabled: g.disabled,
                cost_excluded: g.cost_excluded,
                cost_weight: CostWeight::from_value(g.cost_weight),
            })
            .collect(),
    }
}

/// The served plan (or, `as_scored`, the plan as scored) of a format choice per group of the
/// manifest.
fn plan_of<'m>(
    m: &'m Manifest,
    problem: &Problem,
    choice: &[usize],
    model: &Qwen3VL,
    weight_amax: &[f32],
    as_scored: bool,
) -> Result<(ServedPlan, Vec<&'m LayerEntry>)> {
    let group_format: std::collections::HashMap<&str, &str> =
        problem.groups.iter().zip(choice).map(|(g, &f)| (g.name.as_str(), problem.format_name(f))).collect();
    let mut layers = Vec::with_capacity(m.layers.len());
    let mut experts = Vec::new();
    for l in &m.layers {
        if l.kind == "experts" {
            // A sparse layer's experts are no Linear: served beside the plan (FP8 only, as
            // `quantize` writes them).
            match group_format.get(l.group.as_str()).copied().unwrap_or(NONE) {
                NONE => {}
                "FP8" => experts.push(l),
                other => bail!(
                    "layer {} (a sparse layer's routed experts) is {other}: evaluate serves FP8 experts only",
                    l.name
                ),
            }
            continue;
        }
        let Some(id) = model.layer_id(&l.name) else { bail!("the model has no layer `{}`", l.name) };
        layers.push(RecipeLayer {
            name: l.name.clone(),
            kind: if l.kind == LayerKind::PatchEmbed.as_str() { LayerKind::PatchEmbed } else { LayerKind::Linear },
            format: group_format.get(l.group.as_str()).copied().unwrap_or(NONE).to_string(),
            input_amax: l.input_amax as f32,
            weight_amax: weight_amax[id],
        });
    }
    let plan = if as_scored {
        served::plan_as_scored(&layers)?
    } else {
        served::plan(&layers, model.config().tie_word_embeddings(), false)?
    };
    Ok((plan, experts))
}

/// The tap that serves `plan` and these FP8 experts on the unquantized model.
fn served_tap(
    plan: &ServedPlan,
    experts: &[&LayerEntry],
    model: &Qwen3VL,
    cache: &mut DequantizedWeights,
) -> Result<ServedTap> {
    let mut tap = ServedTap::from_plan(plan, model, cache)?;
    for l in experts {
        let block = crate::search::naming::experts_layer(&l.name)
            .and_then(|i| model.moe_block(i))
            .with_context(|| format!("the model has no sparse layer `{}`", l.name))?;
        let c = l.experts.as_ref().with_context(|| format!("layer {} has no experts calibration", l.name))?;
        tap.add_fp8_experts(block, l.input_amax as f32, c.down_input_amax as f32, plan.as_scored)?;
    }
    Ok(tap)
}

/// The recipe's entry, its prediction taken from the layers actually served in FP8 (a tied
/// lm_head or the patch embedding that the recipe names but the checkpoint keeps 16-bit count as
/// unquantized, here as in the measurement).
fn recipe_result(
    name: String,
    kind: &str,
    loc: &Location,
    m: &Manifest,
    problem: &Problem,
    plan: &ServedPlan,
    experts: &[&LayerEntry],
) -> Result<RecipeResult> {
    let served_choice = served_choice(m, problem, plan, experts);
    let eval = problem.evaluate(&served_choice)?;
    let groups_quantized = served_choice.iter().filter(|&&f| f != problem.none_index()).count();
    let mut result = empty_result(
        &name,
        kind,
        Some(loc.to_string()),
        eval.effective_bits,
        Some(eval.objective),
        groups_quantized,
        &plan.layers,
    );
    for l in experts {
        result.quantized_layers.push(QuantizedLayer { name: l.name.clone(), format: "FP8".into() });
        result.layers_quantized += 1;
    }
    Ok(result)
}

/// Format index per group of what is served: the format its members are served in, NONE when
/// none is (or when the problem has no such format: a checkpoint of another recipe).
fn served_choice(m: &Manifest, problem: &Problem, plan: &ServedPlan, experts: &[&LayerEntry]) -> Vec<usize> {
    m.groups
        .iter()
        .map(|g| {
            let fp8_experts = g.members.iter().any(|n| experts.iter().any(|l| l.name == *n));
            g.members
                .iter()
                .find_map(|n| plan.get(n).map(|l| l.format.quant_algo()))
                .or(fp8_experts.then_some("FP8"))
                .and_then(|f| problem.format_index(f))
                .unwrap_or(problem.none_index())
        })
        .collect()
}

fn empty_result(
    name: &str,
    kind: &str,
    source: Option<String>,
    effective_bits: f64,
    predicted_objective: Option<f64>,
    groups_quantized: usize,
    served: &[ServedLayer],
) -> RecipeResult {
    let zero = crate::artifact::evaluation::Estimate { value: 0.0, ci: None };
    RecipeResult {
        name: name.to_string(),
        kind: kind.to_string(),
        source,
        effective_bits,
        predicted_objective,
        groups_quantized,
        layers_quantized: served.len(),
        quantized_layers: served
            .iter()
            .map(|l| QuantizedLayer { name: l.name.clone(), format: l.format.quant_algo().into() })
            .collect(),
        per_sample: Vec::new(),
        overall: crate::artifact::evaluation::Metrics {
            mean_nll: zero,
            delta_nll: zero,
            delta_nll_relative: zero,
            perplexity: zero,
            kl_all: zero,
            kl_label: zero,
            top1_agreement_all: zero,
            top1_agreement_label: zero,
        },
    }
}

/// A quantized checkpoint as its own model (FP8 weights dequantized at load) with the tap that
/// applies its static input scales; with a manifest, its prediction from the manifest's scores.
fn load_checkpoint(
    dir: &Path,
    args: &EvaluateArgs,
    device: &candle_core::Device,
    manifest: Option<&(Location, Manifest)>,
) -> Result<(Qwen3VL, ServedTap, RecipeResult)> {
    let ck = Checkpoint::open(dir).with_context(|| format!("opening checkpoint {}", dir.display()))?;
    // quantize writes quantized experts per expert, a layout the model loader does not read.
    if let Some((name, _, _)) = ck.tensors().into_iter().find(|(n, _, _)| n.contains(".mlp.experts.0.")) {
        bail!(
            "{}: its experts are stored per expert (`{name}`), which evaluate does not read back yet; evaluate the \
             manifest it was written from instead (the same arithmetic)",
            dir.display()
        );
    }
    let model =
        Qwen3VL::load(dir, args.dtype, device).with_context(|| format!("loading checkpoint {}", dir.display()))?;
    let (plan, tap) = served::from_checkpoint(&model, &ck).with_context(|| format!("{}", dir.display()))?;
    let name = dir_name(dir);
    let result = match manifest {
        Some((loc, m)) => {
            let problem = Problem::from_scores(&scores_of(m), &Overrides::default())
                .with_context(|| format!("{loc}: rebuilding its search problem"))?;
            let mut r = recipe_result(name, "checkpoint", loc, m, &problem, &plan, &[])?;
            r.source = Some(dir.display().to_string());
            r
        }
        None => {
            // ModelOpt's effective bits over every scored layer, groups by ModelOpt's default rules.
            let layers = model.layers();
            let total: u64 = layers.iter().map(|l| l.params()).sum();
            let mut bit_params = 0.0;
            for l in layers {
                bit_params += l.params() as f64
                    * match plan.get(&l.name) {
                        Some(s) => crate::quant::format_by_name(s.format.quant_algo())?.effective_bits(),
                        None => 16.0,
                    };
            }
            let bits = bit_params / total as f64;
            let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
            let groups = crate::quant::GroupingRules::default()
                .group(&names)
                .iter()
                .filter(|g| g.members.iter().any(|&i| plan.get(names[i]).is_some()))
                .count();
            empty_result(&name, "checkpoint", Some(dir.display().to_string()), bits, None, groups, &plan.layers)
        }
    };
    Ok((model, tap, result))
}
