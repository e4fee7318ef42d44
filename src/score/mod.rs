//! Stage 3, `score-layers`: checkpoint + model inputs → per-layer, per-format sensitivity scores.
//!
//! 1. Calibration: max calibration of every layer's input over the calibration samples with
//!    quantization off; weight statistics.
//! 2. Scoring, per sample: ModelOpt's gradient method (one forward + one backward) or its
//!    kl_div method (one forward, then one partial re-forward per group and format).
//! 3. Per-sample contributions are kept, so the run can be resumed after a kill (`--resume`),
//!    split into shards (`--shard i/n`, merged with `--merge`), and confidence intervals can be
//!    bootstrapped downstream.

pub mod calibrate;
pub mod experts;
pub mod gradient;
pub mod kl;
#[cfg(feature = "cuda")]
mod kl_cuda;
pub mod kl_fused;
pub mod state;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::artifact::inputs::{ModelInputs, SampleInputs};
use crate::artifact::scores::{CostWeight, FormatInfo, LayerScores, ModelSummary, SampleSummary, Scores};
use crate::artifact::{self, Artifact, Location, Provenance};
use crate::cli::Reporter;
use crate::device::{gib, parse_device, MemoryLimit, OutOfMemory, PoolWatermark};
use crate::model::qwen3_vl::{ForwardOptions, Input, Keep, LogitsMode, Qwen3VL};
use crate::model::{LayerId, Linear, NoTap};
use crate::quant::{self, format_by_name, Calibration, Format, GroupingRules, NamePatterns, NONE, NONE_BITS};

use crate::model::qwen3_vl::moe::ExpertsAmax;
use gradient::{GradientTap, LayerQuant};

pub const TOOL: &str = "score-layers";

/// Scoring method (ModelOpt's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Σ (∂L/∂Y ⊙ (Y_q − Y))² per layer (ModelOpt's default).
    Gradient,
    /// Σ KL(P ‖ P_q) over all positions, one group quantized at a time.
    #[value(name = "kl_div", alias = "kl")]
    KlDiv,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Gradient => "gradient",
            Method::KlDiv => "kl_div",
        }
    }
}

/// How a group's cost counts in the budget (ModelOpt's `cost_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CostModel {
    /// Every weight counts (ModelOpt's default).
    #[default]
    Weight,
    /// A sparse layer's experts weigh top_k / experts: the weights one token reads.
    #[value(name = "active_moe")]
    ActiveMoe,
}

/// Everything `score-layers` needs.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    pub model_dir: PathBuf,
    pub inputs: Location,
    pub output: Location,
    pub method: Method,
    pub device: String,
    pub dtype: DType,
    pub formats: Vec<String>,
    /// Costs count the scales' storage ([`Format::true_bits`]) instead of ModelOpt's bits.
    pub true_cost: bool,
    pub cost_model: CostModel,
    pub disable: Vec<String>,
    pub exclude_cost: Vec<String>,
    /// Grouping regexes; `None` = ModelOpt's defaults.
    pub group_rules: Option<Vec<String>>,
    /// Calibrate on the first N samples (default: all).
    pub calib_samples: Option<usize>,
    /// Score only the first N samples (default: all).
    pub num_samples: Option<usize>,
    /// `(i, n)`: score the samples whose index ≡ i (mod n).
    pub shard: Option<(usize, usize)>,
    /// Continue from the state file of an interrupted run.
    pub resume: bool,
    /// Where the running state is saved (default `<output>.partial`).
    pub state: Option<PathBuf>,
    /// Write wall time per phase (JSON) here; kept out of the artifact so it stays deterministic.
    pub timings: Option<PathBuf>,
    /// The most GPU memory (bytes, all processes together) the run may use ([`MemoryLimit`]).
    pub gpu_memory_limit: Option<u64>,
    /// Pack consecutive samples into one forward up to this many tokens ([`packs`]).
    pub batch_tokens: usize,
}

/// `--batch-tokens`' default: seven samples of one 448×448 image and a caption (~274 tokens).
/// What a 4B model keeps for the backward of 2,048 tokens is ~10 GiB, a 32B model's ~30 GiB.
pub const DEFAULT_BATCH_TOKENS: usize = 2048;

/// Consecutive runs of `samples` whose tokens add up to at most `budget` (a longer sample alone),
/// in order, so that packed scoring pushes samples in the order unpacked scoring does.
pub fn packs(samples: &[usize], tokens: impl Fn(usize) -> usize, budget: usize) -> Vec<Vec<usize>> {
    let mut packs: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for &i in samples {
        let n = tokens(i);
        match packs.last_mut() {
            Some(pack) if used + n <= budget => pack.push(i),
            _ => {
                packs.push(vec![i]);
                used = 0;
            }
        }
        used += n;
    }
    packs
}

/// Wall time per phase of a run, in seconds.
#[derive(Debug, Default, serde::Serialize)]
pub struct Timings {
    pub read_inputs: f64,
    pub hash_model: f64,
    pub load_model: f64,
    pub calibration: f64,
    /// The part of `calibration` spent in the formats' own calibrations (AWQ-lite, SmoothQuant).
    pub calibration_formats: f64,
    pub scoring: f64,
    pub write: f64,
    pub total: f64,
    pub samples_scored: usize,
    pub device: String,
    pub dtype: String,
    /// Device memory held by tensors, per phase (CUDA only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<GpuMemory>,
}

/// Bytes of device memory the run's tensors held ([`PoolWatermark`]): what the loaded model holds,
/// and per phase the most held at any moment (`[in use, reserved from the driver]`). A
/// process's total adds its CUDA context and cuBLAS' workspace (about half a GiB).
#[derive(Debug, Default, serde::Serialize)]
pub struct GpuMemory {
    pub model: u64,
    pub load_model_peak: [u64; 2],
    pub calibration_peak: [u64; 2],
    pub scoring_peak: [u64; 2],
    /// What the first scored sample's forward keeps for its backward (gradient method).
    pub kept_for_backward: u64,
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => bail!("unsupported dtype '{other}' (expected f32, bf16 or f16)"),
    }
}

/// Parses `i/n` with i < n.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s.split_once('/').with_context(|| format!("invalid shard '{s}' (expected i/n, e.g. 0/2)"))?;
    let (i, n): (usize, usize) = (
        i.trim().parse().with_context(|| format!("invalid shard '{s}'"))?,
        n.trim().parse().with_context(|| format!("invalid shard '{s}'"))?,
    );
    ensure!(n > 0 && i < n, "invalid shard '{s}': need 0 <= i < n");
    Ok((i, n))
}

/// Builds the model input of one sample: pixel rows expanded from the stored RGB bytes.
pub fn model_input(sample: &SampleInputs, inputs: &ModelInputs) -> Result<Input> {
    let settings = &inputs.processor;
    let row = (3 * settings.temporal_patch_size * settings.patch_size * settings.patch_size) as usize;
    let mut pixels = Vec::new();
    for image in &sample.images {
        crate::preprocess::check_image(image, settings).with_context(|| format!("sample {}", sample.id))?;
        pixels.extend(crate::preprocess::pixel_values(image, settings));
    }
    let rows = pixels.len() / row.max(1);
    let pixel_values = Tensor::from_vec(pixels, (rows, row), &Device::Cpu)?;
    let position_ids = match sample.position_ids.as_slice() {
        [t, h, w] => [t.clone(), h.clone(), w.clone()],
        other => bail!("sample {}: position_ids has {} rows, expected 3", sample.id, other.len()),
    };
    Ok(Input {
        input_ids: sample.input_ids.clone(),
        position_ids,
        labels: Some(sample.labels.clone()),
        pixel_values,
        grid_thw: sample.images.iter().map(|i| i.grid_thw).collect(),
        packed: Vec::new(),
    })
}

/// Checks the model inputs against the model before any work, so that a malformed artifact is
/// refused up front (and no state file is written): the processor geometry matches the vision
/// tower, and every sample is internally consistent (lengths, token ids within the vocabulary,
/// image sizes, as many image tokens as the image grids give, a label token for `gradient`).
pub fn validate_inputs(inputs: &ModelInputs, model: &Qwen3VL, method: Method) -> Result<()> {
    let cfg = model.config();
    let v = &cfg.vision_config;
    let vocab = cfg.text_config.vocab_size;
    let s = &inputs.processor;
    for (name, got, want) in [
        ("patch_size", s.patch_size as usize, v.patch_size),
        ("temporal_patch_size", s.temporal_patch_size as usize, v.temporal_patch_size),
        ("merge_size", s.merge_size as usize, v.spatial_merge_size),
    ] {
        ensure!(got == want, "processor {name} is {got}, but the model's vision_config has {want}");
    }
    ensure!(
        inputs.special_tokens.image_pad == cfg.image_token_id,
        "image token id is {}, but the model's config.json has {}",
        inputs.special_tokens.image_pad,
        cfg.image_token_id
    );
    ensure!(!inputs.samples.is_empty(), "the inputs contain no samples (empty calibration set)");
    let merge2 = (s.merge_size as u64).pow(2);
    for (i, sample) in inputs.samples.iter().enumerate() {
        let check = || -> Result<()> {
            let l = sample.input_ids.len();
            ensure!(l > 0, "input_ids is empty");
            ensure!(sample.labels.len() == l, "labels has length {}, input_ids {l}", sample.labels.len());
            ensure!(
                sample.position_ids.len() == 3 && sample.position_ids.iter().all(|p| p.len() == l),
                "position_ids is not [3][{l}]"
            );
            if let Some(bad) = sample.input_ids.iter().find(|&&t| t as usize >= vocab) {
                bail!("input id {bad} is outside the model's vocabulary of {vocab}");
            }
            if let Some(bad) = sample.labels.iter().find(|&&y| y != -100 && (y < 0 || y as usize >= vocab)) {
                bail!("label {bad} is neither -100 nor a token id of the model's vocabulary");
            }
            if method == Method::Gradient {
                ensure!(
                    sample.labels.iter().skip(1).any(|&y| y != -100),
                    "no label tokens, so there is no loss to differentiate"
                );
            }
            let mut tokens = 0u64;
            for image in &sample.images {
                crate::preprocess::check_image(image, s)?;
                tokens += image.grid_thw.iter().map(|&g| g as u64).product::<u64>() / merge2;
            }
            let pads = sample.input_ids.iter().filter(|&&t| t == cfg.image_token_id).count() as u64;
            ensure!(pads == tokens, "{pads} image tokens in input_ids, but the image grids give {tokens}");
            Ok(())
        };
        check().with_context(|| format!("sample {i} ({})", sample.id))?;
    }
    Ok(())
}

/// The run's fixed description: layers, groups, formats, costs; no scores yet.
struct Plan {
    formats: Vec<Box<dyn Format>>,
    /// Group membership as layer ids, parallel to `skeleton.payload.groups`.
    group_members: Vec<Vec<LayerId>>,
    /// Layers of disabled groups (not scored).
    skip: Vec<bool>,
    /// Samples this run scores (indices into the inputs).
    to_score: Vec<usize>,
    calibration: Vec<usize>,
    /// The sparse MoE layers' experts (empty for a dense model), after the Linear layers.
    experts: Vec<experts::ExpertsSlot>,
}

fn plan(opts: &ScoreOptions, model: &Qwen3VL, inputs: &ModelInputs) -> Result<(Plan, Scores)> {
    let mut formats: Vec<Box<dyn Format>> = opts.formats.iter().map(|f| format_by_name(f)).collect::<Result<_>>()?;
    ensure!(!formats.is_empty(), "no quantization format given");
    quant::format::sort_as_modelopt(&mut formats, opts.true_cost);
    if let Some(w) = formats.windows(2).find(|w| w[0].name() == w[1].name()) {
        bail!("format '{}' is given twice", w[0].name());
    }
    let rules = match &opts.group_rules {
        Some(r) => GroupingRules::new(r.iter().map(String::as_str))?,
        None => GroupingRules::default(),
    };
    let disable = NamePatterns::new(&opts.disable)?;
    let exclude_cost = NamePatterns::new(&opts.exclude_cost)?;

    let layers = model.layers();
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    let groups = rules.group(&names);
    let mut format_info: Vec<FormatInfo> = formats
        .iter()
        .map(|f| FormatInfo {
            name: f.name().to_string(),
            effective_bits: if opts.true_cost { f.true_bits() } else { f.effective_bits() },
            weight: f.weight_description(),
            input: f.input_description(),
            modelopt_bits: opts.true_cost.then(|| f.effective_bits()),
        })
        .collect();
    format_info.push(FormatInfo {
        name: NONE.into(),
        effective_bits: NONE_BITS,
        weight: "unquantized".into(),
        input: "unquantized".into(),
        modelopt_bits: opts.true_cost.then_some(NONE_BITS),
    });

    let mut skip = vec![false; layers.len()];
    let mut group_of = vec![String::new(); layers.len()];
    let mut group_scores = Vec::new();
    let mut group_members = Vec::new();
    for g in &groups {
        let members: Vec<&str> = g.members.iter().map(|&i| names[i]).collect();
        let disabled = disable.matches_group(&g.name, &members);
        let cost_excluded = exclude_cost.matches_group(&g.name, &members);
        let params: u64 = g.members.iter().map(|&i| layers[i].params()).sum();
        let costs = format_info.iter().map(|f| params as f64 * f.effective_bits / 16.0).collect();
        for &i in &g.members {
            skip[i] = disabled;
            group_of[i] = g.name.clone();
        }
        group_scores.push(state::empty_group(
            g.name.clone(),
            members.iter().map(|s| s.to_string()).collect(),
            params,
            costs,
            disabled,
            cost_excluded,
        ));
        group_members.push(g.members.clone());
    }
    let per_layer = opts.method == Method::Gradient;
    let layer_scores = layers
        .iter()
        .enumerate()
        .map(|(i, l)| LayerScores {
            name: l.name.clone(),
            group: group_of[i].clone(),
            tower: l.tower.as_str().into(),
            kind: l.kind.as_str().into(),
            shape: [l.out_features as u64, l.in_features as u64],
            params: l.params(),
            input_amax: 0.0,
            weight_amax: 0.0,
            per_sample: if per_layer { vec![Vec::new(); format_info.len()] } else { Vec::new() },
            format_calibration: Vec::new(),
            experts: None,
        })
        .collect::<Vec<_>>();
    // Each sparse layer's experts: one more layer entry and one group, as ModelOpt groups them.
    let mut layer_scores = layer_scores;
    let mut expert_slots = Vec::new();
    for (layer, block) in experts::blocks(model) {
        let name = experts::experts_name(layer);
        let first = format!("model.language_model.layers.{layer}.self_attn.q_proj");
        let resume_from = model.layer_id(&first).with_context(|| format!("sparse layer {layer} has no '{first}'"))?;
        let params = block.expert_params();
        let shape = block.shape();
        let members = vec![name.clone()];
        let disabled = disable.matches_group(&name, &[name.as_str()]);
        let cost_excluded = exclude_cost.matches_group(&name, &[name.as_str()]);
        let costs = format_info.iter().map(|f| params as f64 * f.effective_bits / 16.0).collect();
        expert_slots.push(experts::ExpertsSlot {
            layer,
            entry: layer_scores.len(),
            group: group_scores.len(),
            resume_from,
            disabled,
        });
        layer_scores.push(LayerScores {
            name: name.clone(),
            group: name.clone(),
            tower: "text".into(),
            kind: "experts".into(),
            shape: [shape.experts as u64, params / shape.experts as u64],
            params,
            input_amax: 0.0,
            weight_amax: 0.0,
            per_sample: if per_layer { vec![Vec::new(); format_info.len()] } else { Vec::new() },
            format_calibration: Vec::new(),
            experts: None,
        });
        let mut group = state::empty_group(name, members, params, costs, disabled, cost_excluded);
        if opts.cost_model == CostModel::ActiveMoe {
            group.cost_weight = Some(CostWeight::new(shape.top_k as u64, shape.experts as u64));
        }
        group_scores.push(group);
    }

    let n = inputs.samples.len();
    ensure!(n > 0, "the inputs contain no samples (empty calibration set)");
    let limit = opts.num_samples.unwrap_or(n).min(n);
    let to_score: Vec<usize> = (0..limit).filter(|i| opts.shard.is_none_or(|(s, k)| i % k == s)).collect();
    let calibration: Vec<usize> = (0..opts.calib_samples.unwrap_or(n).min(n)).collect();
    ensure!(!calibration.is_empty(), "--calib-samples must be at least 1");

    let model_name = opts
        .model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| opts.model_dir.display().to_string());
    let scores = Scores {
        model: ModelSummary {
            name: model_name,
            architecture: "Qwen3VLForConditionalGeneration".into(),
            num_parameters: model.num_parameters(),
        },
        method: opts.method.as_str().into(),
        dtype: dtype_name(opts.dtype).into(),
        formats: format_info,
        samples: Vec::new(),
        num_inputs: limit,
        calibration_samples: calibration.clone(),
        layers: layer_scores,
        groups: group_scores,
    };
    Ok((Plan { formats, group_members, skip, to_score, calibration, experts: expert_slots }, scores))
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// Runs `score-layers`.
pub fn run(opts: &ScoreOptions, reporter: &Reporter) -> Result<()> {
    let started = std::time::Instant::now();
    let mut clock = std::time::Instant::now();
    let mut lap = || {
        let now = std::time::Instant::now();
        let dt = now.duration_since(clock).as_secs_f64();
        clock = now;
        dt
    };
    let mut timings =
        Timings { device: opts.device.clone(), dtype: dtype_name(opts.dtype).into(), ..Default::default() };
    let input_bytes = artifact::read_bytes(&opts.inputs)?;
    let inputs: Artifact<ModelInputs> =
        artifact::from_bytes(&input_bytes).with_context(|| format!("{}", opts.inputs))?;
    let inputs = inputs.payload;
    let mut provenance = Provenance::default();
    provenance.source("inputs", &opts.inputs, artifact::sha256_bytes(&input_bytes));
    timings.read_inputs = lap();
    artifact::model_provenance(&opts.model_dir, &mut provenance)?;
    timings.hash_model = lap();
    provenance
        .param("method", opts.method.as_str())
        .param("dtype", dtype_name(opts.dtype))
        .param("formats", opts.formats.join(","))
        .param("disable", opts.disable.join(","))
        .param("exclude_cost", opts.exclude_cost.join(","))
        .param("group_rules", opts.group_rules.as_ref().map_or("modelopt-default".into(), |r| r.join(" ")));
    if opts.true_cost {
        provenance.param("cost", "true-cost");
    }
    if opts.cost_model == CostModel::ActiveMoe {
        provenance.param("cost_model", "active_moe");
    }
    if let Some(n) = opts.calib_samples {
        provenance.param("calib_samples", n);
    }
    if let Some(n) = opts.num_samples {
        provenance.param("num_samples", n);
    }
    if let Some((i, n)) = opts.shard {
        provenance.param("shard", format!("{i}/{n}"));
    }

    let device = parse_device(&opts.device)?;
    // Held until the run ends; taken before the model loads, so the weights count in the limit.
    let _limit = opts.gpu_memory_limit.map(|bytes| MemoryLimit::new(&device, bytes)).transpose()?;
    let watermark = PoolWatermark::new(&device)?;
    let held_before_load = watermark.as_ref().map(|w| w.in_use()).transpose()?.unwrap_or(0);
    // The ballast of --gpu-memory-limit is not the run's: count from what was held before.
    let above = |(used, reserved): (u64, u64)| {
        [used.saturating_sub(held_before_load), reserved.saturating_sub(held_before_load)]
    };
    let model = Qwen3VL::load(&opts.model_dir, opts.dtype, &device)
        .with_context(|| format!("loading model from {}", opts.model_dir.display()))?;
    // The experts are calibrated as ModelOpt calibrates them for max-calibrated formats; its AWQ
    // and SmoothQuant passes over fused experts are not reproduced.
    if model.config().is_moe() {
        if let Some(f) =
            opts.formats.iter().find(|f| format_by_name(f).is_ok_and(|f| f.calibration() != Calibration::Max))
        {
            bail!(
                "{}: format '{f}' calibrates with AWQ or SmoothQuant, which qsens does not run on the routed experts \
                 of a mixture-of-experts checkpoint yet; score it with max-calibrated formats (FP8, NVFP4, INT8, MXFP8, ...)",
                opts.model_dir.display()
            );
        }
    }
    validate_inputs(&inputs, &model, opts.method).with_context(|| format!("{}", opts.inputs))?;
    let (plan, skeleton) = plan(opts, &model, &inputs)?;
    timings.load_model = lap();
    if let Some(w) = &watermark {
        let model = w.in_use()? - held_before_load;
        let load_model_peak = w.take()?;
        timings.gpu_memory = Some(GpuMemory { model, load_model_peak: above(load_model_peak), ..Default::default() });
    }

    let state_path = match (&opts.state, &opts.output) {
        (Some(p), _) => Some(p.clone()),
        (None, Location::File(p)) => Some(PathBuf::from(format!("{}.partial", p.display()))),
        (None, Location::Std) => None,
    };
    if opts.resume && state_path.is_none() {
        bail!("--resume needs a state file: write the output to a file (-o FILE) or pass --state FILE");
    }

    // Resume (when the saved state belongs to this very run) or calibrate.
    let saved = match (&state_path, opts.resume) {
        (Some(p), true) if p.exists() => {
            let loc = Location::File(p.clone());
            let saved = artifact::read::<Scores>(loc.clone()).and_then(|s| {
                state::check_resumable(&s, &provenance, &loc)?;
                let (a, b) = (&s.payload, &skeleton);
                let layer_keys =
                    |x: &Scores| x.layers.iter().map(|l| (l.name.clone(), l.group.clone())).collect::<Vec<_>>();
                let group_keys = |x: &Scores| x.groups.iter().map(|g| (g.name.clone(), g.disabled)).collect::<Vec<_>>();
                let same_plan = a.formats == b.formats
                    && a.method == b.method
                    && a.num_inputs == b.num_inputs
                    && layer_keys(a) == layer_keys(b)
                    && group_keys(a) == group_keys(b)
                    && a.samples.iter().all(|x| plan.to_score.contains(&x.index));
                ensure!(same_plan, "{loc}: saved state does not match this run's layers, groups and samples");
                Ok(s)
            });
            match saved {
                Ok(s) => {
                    reporter.note(format!(
                        "resuming from {} ({} of {} samples done)",
                        p.display(),
                        s.payload.samples.len(),
                        plan.to_score.len()
                    ));
                    Some(s)
                }
                Err(e) => {
                    reporter.note(format!("not resuming: {}; starting over", crate::cli::one_line(&e)));
                    None
                }
            }
        }
        _ => None,
    };
    let mut run = match saved {
        Some(s) => s,
        None => {
            let mut fresh = Artifact::new(TOOL, provenance.clone(), skeleton);
            timings.calibration_formats =
                calibrate(&model, &inputs, &plan, opts.batch_tokens, &mut fresh.payload, reporter)?;
            if let Some(p) = &state_path {
                artifact::write(Location::File(p.clone()), &fresh)?;
            }
            fresh
        }
    };
    timings.calibration = lap();
    if let (Some(w), Some(m)) = (&watermark, &mut timings.gpu_memory) {
        m.calibration_peak = above(w.take()?);
    }

    let input_amax: Vec<f32> = run.payload.layers.iter().map(|l| l.input_amax as f32).collect();
    let weight_stats: Vec<quant::WeightStats> =
        run.payload.layers.iter().map(|l| quant::WeightStats { amax: l.weight_amax as f32 }).collect();
    let format_calibration = run
        .payload
        .layers
        .iter()
        .enumerate()
        .map(|(id, l)| {
            l.format_calibration
                .iter()
                .map(|c| c.as_ref().map(|c| gradient::FormatCalibration::new(c, model.linear(id).weight())).transpose())
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut quant = LayerQuant {
        formats: &plan.formats,
        input_amax: &input_amax,
        weight_stats: &weight_stats,
        format_calibration,
        skip: &plan.skip,
        cached_weights: None,
    };
    if device.is_cpu() {
        let linears: Vec<&Linear> = (0..model.layers().len()).map(|i| model.linear(i)).collect();
        quant.cache_weights(&linears)?;
    }
    let experts_amax = plan
        .experts
        .iter()
        .map(|s| Ok((s.layer, experts::amax_of(&run.payload.layers[s.entry])?, !s.disabled)))
        .collect::<Result<Vec<_>>>()?;

    let pending: Vec<usize> =
        plan.to_score.iter().copied().filter(|i| !run.payload.samples.iter().any(|s| s.index == *i)).collect();
    // The state is rewritten whole; space the writes so they cost at most ~10 % of the run
    // (every sample while the state is small, less often for long runs with large states).
    let mut last_save = (std::time::Instant::now(), std::time::Duration::ZERO);
    let bar = reporter.bar(plan.to_score.len() as u64, "scoring");
    bar.set_position((plan.to_score.len() - pending.len()) as u64);
    // MoE gradient scoring runs one sample per forward: the experts' tap scores a whole input.
    let budget = if model.config().is_moe() && opts.method == Method::Gradient { 1 } else { opts.batch_tokens };
    let pending_packs = packs(&pending, |i| inputs.samples[i].input_ids.len(), budget);
    reporter.detail(format!(
        "scoring {} samples in {} forwards (--batch-tokens {budget})",
        pending.len(),
        pending_packs.len()
    ));
    for pack in pending_packs {
        let samples: Vec<&SampleInputs> = pack.iter().map(|&i| &inputs.samples[i]).collect();
        bar.set_message(samples.iter().map(|s| s.id.as_str()).collect::<Vec<_>>().join(", "));
        let input = samples
            .iter()
            .map(|s| model_input(s, &inputs))
            .collect::<Result<Vec<_>>>()
            .and_then(|parts| Ok(Input::pack(&parts)?))?;
        let summary_of = |index: usize, loss: Option<f32>| {
            let sample = &inputs.samples[index];
            SampleSummary {
                index,
                id: sample.id.clone(),
                num_tokens: sample.input_ids.len(),
                num_image_tokens: sample.mm_token_type_ids.iter().filter(|&&t| t == 1).count(),
                num_label_tokens: sample.labels.iter().skip(1).filter(|&&l| l != -100).count(),
                loss: loss.map(f64::from),
            }
        };
        let scored = match opts.method {
            Method::Gradient => {
                // The first pack's forward is weighed (one stream sync; the others run unsynchronized).
                let weigh = watermark.as_ref().filter(|_| pack[0] == pending[0]);
                score_gradient(&model, &input, &quant, &experts_amax, weigh).map(
                    |Scored { samples: per_sample, kept }| {
                        if let (Some(kept), Some(m)) = (kept, &mut timings.gpu_memory) {
                            m.kept_for_backward = kept.saturating_sub(held_before_load + m.model);
                        }
                        for (&index, (loss, values)) in pack.iter().zip(per_sample) {
                            state::push_sample(&mut run.payload, summary_of(index, Some(loss)), Some(&values), None);
                        }
                    },
                )
            }
            Method::KlDiv => score_kl(&model, &input, &quant, &plan, &experts_amax, &run.payload).map(|per_sample| {
                for (&index, (loss, values)) in pack.iter().zip(per_sample) {
                    state::push_sample(&mut run.payload, summary_of(index, loss), None, Some(&values));
                }
            }),
        };
        if let Err(err) = scored {
            // Every finished sample is kept, so `--resume` continues from this pack.
            let saved = match &state_path {
                Some(p) => {
                    artifact::write(Location::File(p.clone()), &run)?;
                    format!(
                        "{} finished samples saved in {} (rerun with --resume to continue{})",
                        run.payload.samples.len(),
                        p.display(),
                        if pack.len() > 1 { ", with a lower --batch-tokens" } else { "" }
                    )
                }
                None => "nothing saved (-o -: no state file)".into(),
            };
            return Err(sample_failure(err, "scoring", &pack, &inputs, &device, &saved));
        }
        if let Some(p) = &state_path {
            if last_save.0.elapsed() >= last_save.1 * 10 {
                let t = std::time::Instant::now();
                artifact::write(Location::File(p.clone()), &run)?;
                last_save = (std::time::Instant::now(), t.elapsed());
            }
        }
        bar.inc(pack.len() as u64);
    }
    bar.finish_and_clear();
    timings.scoring = lap();
    timings.samples_scored = pending.len();
    if let (Some(w), Some(m)) = (&watermark, &mut timings.gpu_memory) {
        m.scoring_peak = above(w.take()?);
        let phase = |[used, reserved]: [u64; 2]| format!("{} ({} reserved)", gib(used), gib(reserved));
        reporter.detail(format!(
            "GPU memory held by tensors: model {}; peak while loading {}, calibrating {}, scoring {}; the first sample's forward kept {} for its backward",
            gib(m.model),
            phase(m.load_model_peak),
            phase(m.calibration_peak),
            phase(m.scoring_peak),
            gib(m.kept_for_backward)
        ));
    }

    state::recompute_totals(&mut run.payload);
    finish(&run, state_path.as_deref(), &opts.output)?;
    timings.write = lap();
    timings.total = started.elapsed().as_secs_f64();
    reporter.detail(format!(
        "timings: read inputs {:.2} s, hash model {:.2} s, load model {:.2} s, calibration {:.2} s, scoring {:.2} s ({} samples), write {:.2} s, total {:.2} s",
        timings.read_inputs, timings.hash_model, timings.load_model, timings.calibration, timings.scoring,
        timings.samples_scored, timings.write, timings.total
    ));
    if let Some(path) = &opts.timings {
        let json = serde_json::to_vec_pretty(&timings)?;
        artifact::write_file_atomic(path, &json)?;
    }
    reporter.note(format!(
        "scored {} samples × {} layers ({} groups), method {}, → {}",
        run.payload.samples.len(),
        run.payload.layers.len(),
        run.payload.groups.len(),
        opts.method.as_str(),
        opts.output
    ));
    Ok(())
}

/// Writes the finished artifact and retires the state file. Where the state and the output are
/// files of the same encoding, the artifact is written over the state and then renamed onto the
/// output: a kill at any point leaves either the state (a rerun with `--resume` finishes from it)
/// or the output, never both, so an interrupted run leaves no stale state behind.
fn finish(run: &Artifact<Scores>, state: Option<&Path>, output: &Location) -> Result<()> {
    if let (Some(p), Location::File(out)) = (state, output) {
        if Location::from(p).is_json() == output.is_json() {
            artifact::write(Location::from(p), run)?;
            // A failed rename (e.g. across file systems) falls back to writing the output.
            if std::fs::rename(p, out).is_ok() {
                return Ok(());
            }
        }
    }
    artifact::write(output.clone(), run)?;
    if let Some(p) = state {
        // The finished artifact supersedes the state; a failure to remove it is harmless.
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Max calibration over the calibration samples (packed up to `batch_tokens`: a maximum over rows
/// does not depend on how they are grouped); fills `input_amax` and `weight_amax`, then the
/// formats' own calibrations (one sample per forward). Returns the seconds those took.
fn calibrate(
    model: &Qwen3VL,
    inputs: &ModelInputs,
    plan: &Plan,
    batch_tokens: usize,
    scores: &mut Scores,
    reporter: &Reporter,
) -> Result<f64> {
    let num_layers = model.layers().len();
    let mut tap = calibrate::AmaxTap::new(num_layers, model.device())?;
    let blocks = experts::blocks(model);
    let mut with_experts = experts::CalibrationTap::new(&mut tap, &blocks, model.device())?;
    let bar = reporter.bar(plan.calibration.len() as u64, "calibrating");
    calibration_forwards(model, inputs, &plan.calibration, batch_tokens, &mut with_experts, bar)?;
    let experts_amax = with_experts.finish()?;
    let input_amax = tap.finish()?;
    for (id, layer) in scores.layers.iter_mut().take(num_layers).enumerate() {
        layer.input_amax = input_amax[id] as f64;
        layer.weight_amax = quant::WeightStats::of(model.linear(id).weight())?.amax as f64;
    }
    for (slot, ((_, block), (_, amax))) in plan.experts.iter().zip(blocks.iter().zip(&experts_amax)) {
        let entry = &mut scores.layers[slot.entry];
        entry.input_amax = amax.gate_up_input as f64;
        entry.weight_amax = amax.gate_up_weight.iter().chain(&amax.down_weight).fold(0.0f32, |a, &b| a.max(b)) as f64;
        entry.experts = Some(experts::record(block, amax));
    }
    // Formats with their own calibration: a record per layer and format (None for the others).
    let started = std::time::Instant::now();
    let mut records = vec![vec![None; scores.formats.len()]; scores.layers.len()];
    if plan.formats.iter().any(|f| matches!(f.calibration(), Calibration::AwqLite { .. })) {
        awq_lite(model, inputs, plan, &mut records, reporter)?;
    }
    if plan.formats.iter().any(|f| matches!(f.calibration(), Calibration::SmoothQuant { .. })) {
        smooth_quant(model, inputs, plan, scores, &mut records, reporter)?;
    }
    if plan.formats.iter().any(|f| f.calibration() != Calibration::Max) {
        for (layer, record) in scores.layers.iter_mut().zip(records) {
            layer.format_calibration = record;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The weight dtype's rounding of an f32 value (ModelOpt casts smoothing scales and amax to it).
fn dtype_rounding(dtype: candle_core::DType) -> impl Fn(f32) -> f32 {
    move |v| match dtype {
        candle_core::DType::BF16 => half::bf16::from_f32(v).to_f32(),
        candle_core::DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// SmoothQuant for the formats that use it (`quant::smoothquant`): one pass over every
/// calibration sample gathers the per-channel input amax of every layer (quantization off, as
/// ModelOpt's `max_calibrate` with the input quantizers set per channel), then each linear
/// layer's pre-quant scale, smoothing and input amax. Disabled layers get no record; the patch
/// embedding (a convolution) and layers no calibration token reached keep plain max calibration.
fn smooth_quant(
    model: &Qwen3VL,
    inputs: &ModelInputs,
    plan: &Plan,
    scores: &Scores,
    records: &mut [Vec<Option<crate::artifact::scores::FormatCalibration>>],
    reporter: &Reporter,
) -> Result<()> {
    use crate::artifact::scores::FormatCalibration;
    use crate::model::LayerKind;
    let num_layers = model.layers().len();
    let mut cache = calibrate::AwqCacheTap::new(|id| !plan.skip[id], num_layers, false);
    let bar = reporter.bar(plan.calibration.len() as u64, "SmoothQuant: per-channel input amax");
    calibration_forwards(model, inputs, &plan.calibration, 1, &mut cache, bar)?;
    let channel_amax: Vec<Vec<f32>> = cache
        .layers
        .iter()
        .map(|c| c.as_ref().map_or(Ok(Vec::new()), |c| c.channel_amax()))
        .collect::<candle_core::Result<_>>()?;
    let round = dtype_rounding(model.dtype());
    for (f, format) in plan.formats.iter().enumerate() {
        let Calibration::SmoothQuant { alpha } = format.calibration() else { continue };
        for id in (0..num_layers).filter(|&id| !plan.skip[id]) {
            let channel_amax = channel_amax[id].as_slice();
            if model.layers()[id].kind != LayerKind::Linear || channel_amax.is_empty() {
                records[id][f] = Some(FormatCalibration::max(scores.layers[id].input_amax));
                continue;
            }
            let weight = model.linear(id).weight();
            let weight_amax = quant::smoothquant::weight_channel_amax_of(weight)?;
            let p = quant::smoothquant::pre_quant_scale(channel_amax, &weight_amax, alpha);
            // ModelOpt: (per-channel amax in the dtype · pre_quant_scale in f32).amax(), cast to the dtype.
            let amax = round(channel_amax.iter().zip(&p).fold(0f32, |m, (&a, &p)| m.max(round(a) * p)));
            let smoothing = quant::smoothquant::Smoothing::from_pre_quant_scale(alpha, p, &round);
            records[id][f] = Some(FormatCalibration {
                method: "smoothquant".into(),
                alpha: Some(alpha as f64),
                input_scale: smoothing.input_scale,
                weight_scale: smoothing.weight_scale,
                input_amax: amax as f64,
            });
        }
    }
    Ok(())
}

/// One forward of each of `samples` through `tap`, quantization off; consecutive samples packed
/// into one forward up to `batch_tokens` tokens (1: one at a time).
fn calibration_forwards(
    model: &Qwen3VL,
    inputs: &ModelInputs,
    samples: &[usize],
    batch_tokens: usize,
    tap: &mut dyn crate::model::Tap,
    bar: indicatif::ProgressBar,
) -> Result<()> {
    let opts = ForwardOptions { logits: LogitsMode::None, keep: Keep::Nothing, trace: false };
    for pack in packs(samples, |i| inputs.samples[i].input_ids.len(), batch_tokens) {
        bar.set_message(pack.iter().map(|&i| inputs.samples[i].id.as_str()).collect::<Vec<_>>().join(", "));
        let parts = pack.iter().map(|&i| model_input(&inputs.samples[i], inputs)).collect::<Result<Vec<_>>>()?;
        if let Err(err) = Input::pack(&parts).and_then(|input| model.forward(&input, tap, &opts)) {
            let device = model.device();
            return Err(sample_failure(
                err.into(),
                "calibration forward of",
                &pack,
                inputs,
                device,
                "nothing saved yet",
            ));
        }
        bar.inc(pack.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

/// The error of a sample (or a pack of samples) that failed: which samples, how long they are
/// and, for a GPU out-of-memory fault, how much memory was asked for and what the card had left —
/// in place of the driver's own words, so the one-line message says what to do.
fn sample_failure(
    err: anyhow::Error,
    stage: &str,
    pack: &[usize],
    inputs: &ModelInputs,
    device: &Device,
    saved: &str,
) -> anyhow::Error {
    let describe = |&i: &usize| {
        let s = &inputs.samples[i];
        format!("{i} ({}, {} tokens)", s.id, s.input_ids.len())
    };
    let which = match pack {
        [one] => format!("{stage} sample {}", describe(one)),
        _ => {
            let tokens: usize = pack.iter().map(|&i| inputs.samples[i].input_ids.len()).sum();
            let names: Vec<String> = pack.iter().map(describe).collect();
            format!("{stage} samples {} packed into one forward of {tokens} tokens", names.join(", "))
        }
    };
    match OutOfMemory::of(&err) {
        Some(oom) => anyhow::anyhow!("{which}: {}; {saved}", oom.describe(device)),
        None => err.context(format!("{which}; {saved}")),
    }
}

/// AWQ-lite for the formats that use it (`quant::awq`): a pass that gathers activation
/// statistics, then per AWQ format a pass that tries every α on every linear layer, then each
/// layer's smoothing. Disabled layers are not smoothed, nor is the patch embedding (a
/// convolution), which ModelOpt keeps quantized in the format during the search instead.
/// Like ModelOpt's auto_quantize ("AWQ takes longer"), AWQ calibrates on the first quarter of
/// the calibration samples (at least one); its input amax comes from those samples too.
fn awq_lite(
    model: &Qwen3VL,
    inputs: &ModelInputs,
    plan: &Plan,
    records: &mut [Vec<Option<crate::artifact::scores::FormatCalibration>>],
    reporter: &Reporter,
) -> Result<()> {
    use crate::artifact::scores::FormatCalibration;
    use crate::model::LayerKind;
    let num_layers = model.layers().len();
    let samples = &plan.calibration[..(plan.calibration.len() / 4).max(1).min(plan.calibration.len())];
    let is_linear = |id: usize| model.layers()[id].kind == LayerKind::Linear;

    // Phase times for `-v` (the device synchronized at each boundary, so queued work is counted
    // where it was queued).
    let mut phases: Vec<(String, f64)> = Vec::new();
    let mut search_split: Vec<String> = Vec::new();
    let mut last = std::time::Instant::now();
    let mut phase = |name: String| -> Result<()> {
        model.device().synchronize()?;
        phases.push((name, last.elapsed().as_secs_f64()));
        last = std::time::Instant::now();
        Ok(())
    };
    let mut cache = calibrate::AwqCacheTap::new(|id| !plan.skip[id], num_layers, true);
    let bar = reporter.bar(samples.len() as u64, "AWQ-lite: activation scales");
    calibration_forwards(model, inputs, samples, 1, &mut cache, bar)?;
    phase("statistics pass".into())?;
    let channel_amax: Vec<Vec<f32>> = cache
        .layers
        .iter()
        .map(|c| c.as_ref().map_or(Ok(Vec::new()), |c| c.channel_amax()))
        .collect::<candle_core::Result<_>>()?;
    let input_amax: Vec<f32> = channel_amax.iter().map(|c| c.iter().fold(0f32, |m, &v| m.max(v))).collect();
    let mut act_scales: Vec<Option<Vec<f32>>> = Vec::with_capacity(num_layers);
    for (id, c) in cache.layers.iter().enumerate() {
        let act = match c {
            Some(c) if is_linear(id) => c.act_scale()?,
            _ => None,
        };
        // ModelOpt disables AWQ for a layer whose scales hold a NaN.
        act_scales.push(act.filter(|act| !act.iter().any(|v| v.is_nan())));
    }

    // The search pass keeps every searched layer's inputs on the device; in chunks of layers
    // whose inputs take at most a quarter of the weights' bytes (one pass of forwards each), so
    // the peak stays near a plain forward's whatever the number of samples.
    let own_input_bytes: Vec<usize> =
        cache.layers.iter().map(|c| c.as_ref().map_or(0, |c| c.own_input_bytes)).collect();
    let weight_bytes: usize =
        (0..num_layers).map(|id| model.linear(id).weight()).map(|w| w.elem_count() * w.dtype().size_in_bytes()).sum();
    let chunks = calibrate::budget_chunks(&own_input_bytes, (weight_bytes / 4).max(512 << 20));

    let round = dtype_rounding(model.dtype());
    for (f, format) in plan.formats.iter().enumerate() {
        let Calibration::AwqLite { block } = format.calibration() else { continue };
        let mut searches = (0..num_layers)
            .map(|id| {
                act_scales[id]
                    .as_ref()
                    .map(|act| calibrate::AwqFormatSearch::new(act, model.linear(id).weight(), block))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let quantized: Vec<Option<f32>> =
            (0..num_layers).map(|id| (!plan.skip[id] && !is_linear(id)).then_some(input_amax[id])).collect();
        phase(format!("{} candidates", format.name()))?;
        let (mut passes, mut forwards_s, mut losses_s) = (0, 0.0, 0.0);
        for chunk in &chunks {
            if !chunk.clone().any(|id| searches[id].is_some()) {
                continue;
            }
            passes += 1;
            let clock = std::time::Instant::now();
            let in_chunk = (0..num_layers).map(|id| if chunk.contains(&id) { searches[id].take() } else { None });
            let mut search = calibrate::AwqSearchTap::new(format.as_ref(), in_chunk.collect(), quantized.clone());
            let what =
                format!("AWQ-lite: searching α for {} (layers {}–{})", format.name(), chunk.start, chunk.end - 1);
            calibration_forwards(model, inputs, samples, 1, &mut search, reporter.bar(samples.len() as u64, &what))?;
            model.device().synchronize()?;
            forwards_s += clock.elapsed().as_secs_f64();
            let clock = std::time::Instant::now();
            search.search(|id| model.linear(id))?;
            for id in chunk.clone() {
                searches[id] = search.searches[id].take();
            }
            model.device().synchronize()?;
            losses_s += clock.elapsed().as_secs_f64();
        }
        phase(format!("{} search", format.name()))?;
        search_split.push(format!(
            "{} search: {passes} pass(es) of forwards {forwards_s:.2} s, α losses {losses_s:.2} s",
            format.name()
        ));

        for id in (0..num_layers).filter(|&id| !plan.skip[id]) {
            let plain = FormatCalibration::max(input_amax[id] as f64);
            let (Some(s), Some(act)) = (&searches[id], &act_scales[id]) else {
                records[id][f] = Some(plain);
                continue;
            };
            let Some(alpha) = quant::awq::best_alpha(&s.losses) else {
                records[id][f] = Some(plain);
                continue;
            };
            let best = quant::awq::scale(act, &s.weight_scale, alpha);
            let chosen = quant::awq::Smoothing::new(alpha, &best, &round);
            // ModelOpt: (per-channel amax · pre_quant_scale in f32).amax(), cast to the dtype.
            let amax = round(channel_amax[id].iter().zip(&best).fold(0f32, |m, (a, s)| m.max(a * (1.0 / s))));
            records[id][f] = Some(FormatCalibration {
                method: "awq_lite".into(),
                alpha: Some(alpha as f64),
                input_scale: chosen.input_scale,
                weight_scale: chosen.weight_scale,
                input_amax: amax as f64,
            });
        }
    }
    let phases: Vec<String> = phases.iter().map(|(name, s)| format!("{name} {s:.2} s")).collect();
    reporter.detail(format!("AWQ-lite on {} samples: {}", samples.len(), phases.join(", ")));
    for split in search_split {
        reporter.detail(split);
    }
    Ok(())
}

/// One sample's contributions, `[layer or group][format]`.
type Contributions = Vec<Vec<f64>>;

/// What [`score_gradient`] gives: each sample's loss and contributions, and the bytes in use
/// after the forward when it was weighed.
struct Scored {
    samples: Vec<(f32, Contributions)>,
    kept: Option<u64>,
}

/// Per sparse layer: (decoder layer, its experts' calibration, whether its group is scored).
type ExpertsAmaxes = [(usize, ExpertsAmax, bool)];

/// One input (one sample, or several packed), gradient method: per sample `(loss, [layer][format]
/// contributions)`, the experts' entries after the Linear layers'; and, when weighed, the bytes
/// in use after the forward.
fn score_gradient(
    model: &Qwen3VL,
    input: &Input,
    quant: &LayerQuant,
    experts_amax: &ExpertsAmaxes,
    weigh: Option<&PoolWatermark>,
) -> Result<Scored> {
    let opts = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Backward, trace: false };
    let fwd = model.forward(input, &mut NoTap, &opts)?;
    // Bytes in use after the forward: the model and what the forward keeps for the backward.
    let kept = weigh.map(|w| w.in_use()).transpose()?;
    ensure!(fwd.loss.is_some(), "the sample has no label tokens, so there is no loss to differentiate");
    let rows = (0..model.layers().len())
        .map(|id| Ok(model.sample_rows(&fwd, id)?.to_vec()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut tap = GradientTap::packed(quant, rows);
    let mut with_experts = experts::GradientTap {
        inner: &mut tap,
        formats: quant.formats,
        amax: experts_amax,
        scores: vec![Vec::new(); experts_amax.len()],
    };
    model.backward(&fwd, &mut with_experts)?;
    let expert_scores = with_experts.scores;
    let mut per_sample = tap.finish()?;
    ensure!(
        expert_scores.is_empty() || per_sample.len() == 1,
        "internal: the experts are scored one sample per forward"
    );
    for values in &mut per_sample {
        for per_format in &expert_scores {
            let mut v = vec![0.0; quant.formats.len()];
            for (f, t) in per_format.iter().enumerate() {
                v[f] = t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
            values.push(v);
        }
        for v in values.iter_mut() {
            v.push(0.0); // NONE
        }
    }
    ensure!(
        fwd.sample_losses.len() == per_sample.len(),
        "internal: {} losses for {} samples",
        fwd.sample_losses.len(),
        per_sample.len()
    );
    let losses = fwd
        .sample_losses
        .iter()
        .map(|l| l.context("a sample has no label tokens, so there is no loss to differentiate"))
        .collect::<Result<Vec<_>>>()?;
    Ok(Scored { samples: losses.into_iter().zip(per_sample).collect(), kept })
}

/// One input (one sample, or several packed), kl_div method: per sample `(loss if the sample has
/// labels, [group][format] contributions)`. Each re-forward runs every packed sample at once.
fn score_kl(
    model: &Qwen3VL,
    input: &Input,
    quant: &LayerQuant,
    plan: &Plan,
    experts_amax: &ExpertsAmaxes,
    scores: &Scores,
) -> Result<Vec<(Option<f32>, Contributions)>> {
    let opts = ForwardOptions { logits: LogitsMode::All, keep: Keep::Resume, trace: false };
    let mut base = model.forward(input, &mut NoTap, &opts)?;
    // The base distribution replaces the [L, vocab] logits, which are not kept.
    let logits = base.logits.take().context("forward returned no logits")?;
    let kl_base = kl::KlBase::packed(&logits, input.segments())?;
    drop(logits);
    let samples = input.segments().len();
    // Per group and format, each sample's KL (f64 [samples], on the device until the end).
    let mut kls: Vec<Vec<Tensor>> = Vec::with_capacity(scores.groups.len());
    for (g, group) in scores.groups.iter().enumerate() {
        let mut per_format = Vec::with_capacity(plan.formats.len());
        if !group.disabled {
            if let Some(k) = plan.experts.iter().position(|s| s.group == g) {
                // A sparse layer's experts, alone fake-quantized: resume at its decoder layer.
                let (layer, amax, _) = &experts_amax[k];
                for format in &plan.formats {
                    let mut tap = experts::QuantizeExpertsTap { layer: *layer, format: format.as_ref(), amax };
                    let hidden = model.forward_from_hidden(&base, plan.experts[k].resume_from, &mut tap)?;
                    per_format.push(kl::head_kl(model, quant, &[], 0, &kl_base, &hidden)?);
                }
            } else {
                let members = &plan.group_members[g];
                for f in 0..plan.formats.len() {
                    let mut tap = kl::GroupQuantTap { quant, members, format: f };
                    let hidden = model.forward_from_hidden(&base, members[0], &mut tap)?;
                    per_format.push(kl::head_kl(model, quant, members, f, &kl_base, &hidden)?);
                }
            }
        }
        kls.push(per_format);
    }
    // One sync: every group's and format's KLs, [groups·formats, samples].
    let flat: Vec<Tensor> = kls.iter().flatten().cloned().collect();
    let values = match flat.is_empty() {
        true => Vec::new(),
        false => Tensor::stack(&flat, 0)?.to_device(&Device::Cpu)?.to_vec2::<f64>()?,
    };
    let mut values = values.into_iter();
    let mut per_sample = vec![Vec::with_capacity(kls.len()); samples];
    for per_format in &kls {
        let mut rows = vec![vec![0.0; plan.formats.len() + 1]; samples];
        for f in 0..per_format.len() {
            let v = values.next().context("internal: too few KL values")?;
            for (row, v) in rows.iter_mut().zip(v) {
                row[f] = v;
            }
        }
        for (sample, row) in per_sample.iter_mut().zip(rows) {
            sample.push(row);
        }
    }
    // A sample without label tokens has no loss (it is still scored).
    let losses: Vec<Option<f32>> = match base.sample_losses.as_slice() {
        [] => vec![None; samples],
        losses => {
            ensure!(losses.len() == samples, "internal: {} losses for {samples} samples", losses.len());
            losses.to_vec()
        }
    };
    Ok(losses.into_iter().zip(per_sample).collect())
}

/// `score-layers --merge`: combines shard artifacts into the unsharded result.
pub fn merge(shards: &[Location], output: &Location, reporter: &Reporter) -> Result<()> {
    let shards = shards
        .iter()
        .map(|loc| Ok((loc.clone(), artifact::read::<Scores>(loc.clone())?)))
        .collect::<Result<Vec<_>>>()?;
    let merged = state::merge_shards(shards)?;
    artifact::write(output.clone(), &merged)?;
    reporter.note(format!("merged {} samples → {output}", merged.payload.samples.len()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::inputs::{ProcessorSettings, SampleInputs, SpecialTokens};

    /// Packs keep the samples' order, fill up to the budget, and put a longer sample alone.
    #[test]
    fn packs_fill_the_budget_in_order() {
        let tokens = [300, 300, 300, 900, 2500, 100, 100];
        let of = |i: usize| tokens[i];
        let all: Vec<usize> = (0..tokens.len()).collect();
        assert_eq!(packs(&all, of, 1000), vec![vec![0, 1, 2], vec![3], vec![4], vec![5, 6]]);
        assert_eq!(packs(&all, of, 1200), vec![vec![0, 1, 2], vec![3], vec![4], vec![5, 6]]);
        // Exactly full: 300 + 300 + 300 + 900 = 1800.
        assert_eq!(packs(&all, of, 1800), vec![vec![0, 1, 2, 3], vec![4], vec![5, 6]]);
        let singles: Vec<Vec<usize>> = all.iter().map(|&i| vec![i]).collect();
        assert_eq!(packs(&all, of, 1), singles);
        assert_eq!(packs(&all, of, 0), singles);
        assert_eq!(packs(&all, of, 10_000), vec![all.clone()]);
        // A resumed run packs what is left, in order.
        assert_eq!(packs(&[2, 3, 5], of, 1200), vec![vec![2, 3], vec![5]]);
        assert!(packs(&[], of, 1000).is_empty());
    }

    fn sample(id: &str, len: usize) -> SampleInputs {
        SampleInputs {
            id: id.into(),
            text: String::new(),
            input_ids: vec![1; len],
            labels: vec![-100; len],
            attention_mask: vec![1; len],
            mm_token_type_ids: vec![0; len],
            position_ids: vec![(0..len as i64).collect(); 3],
            rope_delta: 0,
            images: Vec::new(),
        }
    }

    /// A failed pack's line names every sample in it and the forward's tokens; one sample's names it.
    #[test]
    fn a_failed_pack_names_its_samples() {
        let inputs = ModelInputs {
            processor: ProcessorSettings {
                patch_size: 16,
                temporal_patch_size: 2,
                merge_size: 2,
                min_pixels: 0,
                max_pixels: 0,
                rescale_factor: 1.0,
                image_mean: [0.5; 3],
                image_std: [0.5; 3],
            },
            special_tokens: SpecialTokens { image_pad: 0, vision_start: 0, vision_end: 0, im_start: 0, im_end: 0 },
            samples: vec![sample("a", 274), sample("b", 300), sample("c", 10)],
        };
        let line = |pack: &[usize]| {
            let err = sample_failure(anyhow::anyhow!("boom"), "scoring", pack, &inputs, &Device::Cpu, "saved");
            format!("{err:#}")
        };
        assert_eq!(
            line(&[0, 1]),
            "scoring samples 0 (a, 274 tokens), 1 (b, 300 tokens) packed into one forward of 574 tokens; saved: boom"
        );
        assert_eq!(line(&[2]), "scoring sample 2 (c, 10 tokens); saved: boom");
    }
}
