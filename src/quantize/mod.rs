//! Stage 6, `quantize`: checkpoint + manifest → a quantized HF checkpoint a serving engine loads.
//!
//! The recipe's FP8 layers get `weight` float8_e4m3fn (`e4m3(W / weight_scale)`, as ModelOpt's
//! exporter computes it), `weight_scale = amax_w / 448` and a static `input_scale = amax_in /
//! 448` from the calibration the scores were made with; NVFP4 and W4A16_NVFP4 layers get ModelOpt's
//! packed E2M1 `weight`, E4M3 block `weight_scale`, `weight_scale_2` (and, NVFP4, `input_scale`);
//! every other tensor is copied bit for bit. Which layers end up quantized is
//! [`crate::quant::served`]'s plan (shared with `evaluate`). Two layouts: ModelOpt's unified HF
//! format ([`modelopt`], every format) and llm-compressor's compressed-tensors
//! ([`compressed_tensors`], FP8). A mixture-of-experts model's FP8 experts are written per expert
//! (`experts`, modelopt layout). Everything is checked before anything is written; tensors are
//! streamed one at a time into a temporary directory beside the target, renamed at the end.

pub mod compressed_tensors;
mod experts;
pub mod modelopt;
pub mod shards;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use safetensors::tensor::Dtype;
use serde_json::{json, Value};

use crate::artifact::manifest::Manifest;
use crate::artifact::scores::Scores;
use crate::artifact::{self, Artifact, Location, Provenance};
use crate::cli::Reporter;
use crate::model::loader::{Checkpoint, INDEX_FILE};
use crate::model::qwen3_vl::Config;
use crate::model::LayerKind;
use crate::quant::served::{self, KeptReason, RecipeLayer, ServedFormat, ServedLayer, ServedPlan};
use crate::quant::{fp8, nvfp4};
use shards::{Bytes, TensorSpec};

pub const TOOL: &str = "quantize";

/// The checkpoint layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// `modelopt`, except for an FP8-only recipe with vision layers in FP8: `compressed-tensors`
    /// (the layout vLLM loads correctly for the recipe).
    Auto,
    /// ModelOpt's unified HF format (`hf_quant_config.json`, `quant_method: "modelopt"`).
    Modelopt,
    /// llm-compressor's `float-quantized` format (`quant_method: "compressed-tensors"`).
    CompressedTensors,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Auto => "auto",
            Layout::Modelopt => "modelopt",
            Layout::CompressedTensors => "compressed-tensors",
        }
    }
}

/// Everything `quantize` needs.
#[derive(Debug, Clone)]
pub struct QuantizeArgs {
    /// The unquantized HF checkpoint the manifest's scores were made from.
    pub model_dir: PathBuf,
    pub manifest: Location,
    /// The scores the manifest was made from (optional: the manifest carries their amax and
    /// digest; given, they are checked against it).
    pub scores: Option<Location>,
    pub output: PathBuf,
    pub layout: Layout,
    /// Write fused layers' shards with their shared (largest) scales.
    pub fuse_scales: bool,
    pub max_shard_size: u64,
    /// Replace an existing output directory.
    pub force: bool,
    /// Write FP8 vision layers in the modelopt layout although vLLM loads them wrongly.
    pub skip_vllm_checks: bool,
}

/// Where an output tensor's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    /// The input tensor of the same name, bit for bit.
    Copy,
    /// The input weight `name`, quantized to E4M3 with `scale`.
    Fp8 { weight: String, scale: f32 },
    /// The input weight `name` as NVFP4 with `weight_scale_2`: its packed E2M1 codes.
    Nvfp4Codes { weight: String, weight_scale_2: f32 },
    /// The same, its E4M3 block scales.
    Nvfp4BlockScales { weight: String, weight_scale_2: f32 },
    /// A one-element scale tensor.
    Scale(f32),
    /// One expert's columns `col0..col0 + cols` of a fused `[E, R, C]` experts tensor, transposed
    /// (`experts::slice_bytes`): E4M3 with `fp8_scale`, else in the stored dtype.
    ExpertSlice { tensor: String, expert: usize, col0: usize, cols: usize, fp8_scale: Option<f32> },
}

/// A checked job: nothing has been written yet.
struct Job {
    checkpoint: Checkpoint,
    layout: Layout,
    plan: ServedPlan,
    tensors: Vec<TensorSpec>,
    sources: Vec<Source>,
    config_json: String,
    hf_quant_config: Option<Value>,
    /// Files copied unchanged (tokenizer, chat template, processor and generation configs).
    copies: Vec<PathBuf>,
    metadata: HashMap<String, String>,
    notes: Vec<String>,
}

/// Runs `quantize`.
pub fn run(args: &QuantizeArgs, reporter: &Reporter) -> Result<()> {
    let job = prepare(args)?;
    for note in &job.notes {
        reporter.note(note);
    }
    write(args, &job, reporter)?;
    let bytes: u64 = job.tensors.iter().map(|t| t.byte_len() as u64).sum();
    let counts: Vec<String> = job
        .plan
        .formats()
        .iter()
        .map(|f| format!("{} {}", job.plan.layers.iter().filter(|l| l.format == *f).count(), f.quant_algo()))
        .collect();
    reporter.note(format!(
        "wrote {} quantized layers ({}), layout {}, {:.2} GB of tensors → {}",
        job.plan.layers.len(),
        counts.join(", "),
        job.layout.as_str(),
        bytes as f64 / 1e9,
        args.output.display()
    ));
    Ok(())
}

/// Every check, and the whole output described, before anything is written.
fn prepare(args: &QuantizeArgs) -> Result<Job> {
    let out = &args.output;
    if out.exists() && !args.force {
        bail!("{} already exists (pass --force to replace it)", out.display());
    }
    if let (Ok(a), Ok(b)) = (out.canonicalize(), args.model_dir.canonicalize()) {
        ensure!(a != b, "{}: the output would replace the input checkpoint", out.display());
    }

    let manifest_bytes = artifact::read_bytes(&args.manifest)?;
    let manifest: Artifact<Manifest> =
        artifact::from_bytes(&manifest_bytes).with_context(|| format!("{}", args.manifest))?;
    let manifest_digest = artifact::sha256_bytes(&manifest_bytes);
    let m = &manifest.payload;
    let scores_digest = &m.scores_source.digest;
    if let Some(loc) = &args.scores {
        check_scores(loc, &args.manifest, m)?;
    }
    let checkpoint = Checkpoint::open_streaming(&args.model_dir)
        .with_context(|| format!("opening checkpoint in {}", args.model_dir.display()))?;
    check_same_model(&args.manifest, &m.scores_source.provenance, &args.model_dir)?;
    let config_path = args.model_dir.join("config.json");
    let config_text =
        std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let config_value: Value =
        serde_json::from_str(&config_text).with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    ensure!(
        config_value.get("quantization_config").is_none(),
        "{}: the checkpoint is already quantized (config.json has a quantization_config)",
        config_path.display()
    );
    let config = Config::from_json_str(&config_text).with_context(|| format!("parsing {}", config_path.display()))?;
    let stored: HashMap<&str, (Dtype, &[usize])> =
        checkpoint.tensors().into_iter().map(|(n, d, s)| (n, (d, s))).collect();

    // The recipe, with each quantized weight's amax taken from the checkpoint itself.
    let mut recipe = Vec::with_capacity(m.layers.len());
    let mut weight_dtypes: HashMap<String, Dtype> = HashMap::new();
    // A sparse layer's experts are no Linear: written per expert on their own (experts.rs).
    let split_experts = experts::plan(m, &args.manifest.to_string(), &checkpoint)?;
    for l in &m.layers {
        if l.kind == "experts" {
            continue;
        }
        let kind = if l.kind == LayerKind::PatchEmbed.as_str() { LayerKind::PatchEmbed } else { LayerKind::Linear };
        let mut weight_amax = l.weight_amax as f32;
        let weight = format!("{}.weight", l.name);
        let writes_weight =
            l.chosen != crate::quant::NONE && kind == LayerKind::Linear && stored.contains_key(weight.as_str());
        if writes_weight {
            let (dtype, shape) = stored[weight.as_str()];
            let want = [l.shape[0] as usize, l.shape[1] as usize];
            ensure!(
                shape == want,
                "{}: layer {} has shape {:?} in the manifest but `{weight}` is {:?} in {} (a manifest of another model?)",
                args.manifest,
                l.name,
                want,
                shape,
                args.model_dir.display()
            );
            weight_amax =
                checkpoint.with_mapped(&weight, |b| max_abs(b, dtype))?.with_context(|| format!("`{weight}`"))?;
            weight_dtypes.insert(l.name.clone(), dtype);
        }
        recipe.push(RecipeLayer {
            name: l.name.clone(),
            kind,
            format: l.chosen.clone(),
            input_amax: l.input_amax as f32,
            weight_amax,
        });
    }
    let mut plan = served::plan(&recipe, config.tie_word_embeddings(), args.fuse_scales)
        .with_context(|| format!("{}", args.manifest))?;
    for l in &plan.layers {
        ensure!(
            weight_dtypes.contains_key(&l.name),
            "{}: `{}.weight` is missing from the checkpoint in {}",
            args.manifest,
            l.name,
            args.model_dir.display()
        );
        if let Some(block) = l.format.group_size() {
            let cols = stored[format!("{}.weight", l.name).as_str()].1[1];
            ensure!(
                cols % block == 0,
                "{}: layer {} has {cols} input features, not a multiple of {}'s {block}-element blocks",
                args.manifest,
                l.name,
                l.format.quant_algo()
            );
        }
    }

    let mut notes = Vec::new();
    let formats = plan.formats();
    let tower_of: HashMap<&str, &str> = m.layers.iter().map(|l| (l.name.as_str(), l.tower.as_str())).collect();
    let vision: Vec<&str> =
        plan.layers.iter().map(|l| l.name.as_str()).filter(|n| tower_of.get(n) == Some(&"vision")).collect();
    let only_fp8 = formats.iter().all(|f| *f == ServedFormat::Fp8);
    let layout = match args.layout {
        Layout::Auto if only_fp8 && !vision.is_empty() => {
            notes.push(format!(
                "layout: compressed-tensors ({} vision layers are in FP8, which vLLM's modelopt loader would load wrongly)",
                vision.len()
            ));
            Layout::CompressedTensors
        }
        Layout::Auto => {
            notes.push("layout: modelopt (ModelOpt's own format, which vLLM loads correctly for this recipe)".into());
            Layout::Modelopt
        }
        other => other,
    };
    let fp8_experts: Vec<&str> = split_experts.iter().filter(|s| s.fp8.is_some()).map(|s| s.name.as_str()).collect();
    if layout != Layout::Modelopt && !fp8_experts.is_empty() {
        bail!(
            "{}: the recipe puts the routed experts of {} sparse layers in FP8 ({}), which quantize writes in the modelopt \
             layout only: use --layout modelopt{}",
            args.manifest,
            fp8_experts.len(),
            abbreviate(&fp8_experts, 3),
            if vision.is_empty() { "" } else { " and keep the vision tower 16-bit (search --disable 'model.visual.*')" }
        );
    }
    if !split_experts.is_empty() {
        notes.push(format!(
            "experts: {} sparse layers written per expert (`mlp.experts.<e>.{{gate,up,down}}_proj`, as ModelOpt's exporter \
             and vLLM's per-expert MoE loaders name them), {} of them in FP8",
            split_experts.len(),
            fp8_experts.len()
        ));
    }
    if layout == Layout::CompressedTensors && !only_fp8 {
        let other: Vec<&str> = formats.iter().filter(|f| **f != ServedFormat::Fp8).map(|f| f.quant_algo()).collect();
        bail!(
            "{}: the recipe has {} layers, which the compressed-tensors layout does not write yet (FP8 only): use \
             --layout modelopt",
            args.manifest,
            other.join(" and ")
        );
    }
    // vLLM's single-format ModelOpt loaders (FP8, NVFP4) leave every layer named `visual`
    // unquantized; its MIXED_PRECISION loader follows `quantized_layers` and has no such rule.
    if layout == Layout::Modelopt && formats.len() == 1 && !vision.is_empty() && !args.skip_vllm_checks {
        let format = formats[0].quant_algo();
        let way_out = if only_fp8 { "use --layout compressed-tensors, " } else { "" };
        bail!(
            "{}: the recipe puts {} vision layers in {format} ({}), but vLLM's ModelOpt {format} loader treats every \
             layer named `visual` as unquantized and would load them wrongly: {way_out}keep the vision tower 16-bit \
             (search --disable 'model.visual.*'), or pass --skip-vllm-checks to write ModelOpt's layout anyway",
            args.manifest,
            vision.len(),
            abbreviate(&vision, 4)
        );
    }
    for (name, why) in &plan.kept {
        notes.push(format!("{name}: {}", why.explain()));
    }
    let changed: Vec<&str> = plan.fused_scale_changes.iter().map(String::as_str).collect();
    if !changed.is_empty() {
        notes.push(format!(
            "{} fused-layer shards take their layer's largest amax ({}): {}",
            changed.len(),
            if args.fuse_scales {
                "--fuse-scales"
            } else {
                "NVFP4 shards share one global scale, as ModelOpt writes them"
            },
            abbreviate(&changed, 6)
        ));
    }
    if !args.fuse_scales {
        let differing = unfused_scale_shards(&plan);
        if !differing.is_empty() {
            notes.push(format!(
                "{} FP8 fused-layer shards have their own weight scale; vLLM requantizes them to their layer's largest \
                 scale when it loads them (--fuse-scales writes the shared scales instead)",
                differing.len()
            ));
        }
    }

    // compressed-tensors stores scales in the model dtype: the codes are made with the scale as stored.
    if layout == Layout::CompressedTensors {
        for l in &mut plan.layers {
            let dtype = weight_dtypes[&l.name];
            l.weight_scale = round_to(dtype, l.weight_scale);
            l.input_scale = l.input_scale.map(|s| round_to(dtype, s));
        }
    }

    let (tensors, sources) = output_tensors(&checkpoint, &plan, &split_experts, layout, &weight_dtypes)?;

    // Provenance rides in the config's `producer`, a key every loader ignores (ModelOpt's own
    // names its exporter there); the safetensors header keeps only `format: pt`, since its
    // metadata map is written in hash order and would make the files differ run to run.
    let producer = json!({
        "name": "qsens",
        "version": env!("CARGO_PKG_VERSION"),
        "tool": TOOL,
        "manifest": manifest_digest,
        "scores": scores_digest,
        "layout": layout.as_str(),
        "fuse_scales": args.fuse_scales,
    });
    let quantized: std::collections::HashSet<&str> = plan.layers.iter().map(|l| l.name.as_str()).collect();
    let (quantization_config, hf_quant_config) = match layout {
        Layout::Modelopt => {
            // ModelOpt counts the patch embedding as quantized when the recipe has it, although its
            // exporter writes it unquantized: the summary follows ModelOpt so the file is its own.
            let chosen: HashMap<&str, &str> = m.layers.iter().map(|l| (l.name.as_str(), l.chosen.as_str())).collect();
            let mut counted: Vec<(String, ServedFormat)> = Vec::new();
            for l in &m.layers {
                let format = match plan.get(&l.name) {
                    Some(s) => Some(s.format),
                    None if plan.kept.iter().any(|(n, r)| *n == l.name && *r == KeptReason::PatchEmbed) => {
                        ServedFormat::parse(chosen[l.name.as_str()])?
                    }
                    None => None,
                };
                let format = format.or_else(|| fp8_experts.contains(&l.name.as_str()).then_some(ServedFormat::Fp8));
                if let Some(f) = format {
                    counted.push((l.name.clone(), f));
                }
            }
            let counted_names: Vec<String> = counted.iter().map(|(n, _)| n.clone()).collect();
            let unquantized: Vec<String> =
                modules_with_quantizers(m, &stored).into_iter().filter(|n| !counted_names.contains(n)).collect();
            let exclude = modelopt::exclude_summary(&unquantized, &counted_names);
            (
                modelopt::quantization_config(&counted, &exclude, producer.clone()),
                Some(modelopt::hf_quant_config(&counted, &exclude, producer.clone())),
            )
        }
        _ => {
            let ignore: Vec<String> = m
                .layers
                .iter()
                .filter(|l| l.kind != LayerKind::PatchEmbed.as_str() && !quantized.contains(l.name.as_str()))
                .map(|l| l.name.clone())
                .collect();
            (compressed_tensors::quantization_config(&ignore, producer.clone()), None)
        }
    };
    let config_json = with_quantization_config(&config_text, &quantization_config)
        .with_context(|| format!("adding quantization_config to {}", config_path.display()))?;

    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(Job {
        checkpoint,
        layout,
        plan,
        tensors,
        sources,
        config_json,
        hf_quant_config,
        copies: files_to_copy(&args.model_dir)?,
        metadata,
        notes,
    })
}

/// The scores must be the very file the manifest was made from, and agree on every amax.
fn check_scores(loc: &Location, manifest_loc: &Location, m: &Manifest) -> Result<()> {
    let bytes = artifact::read_bytes(loc)?;
    let digest = artifact::sha256_bytes(&bytes);
    ensure!(
        digest == m.scores_source.digest,
        "{loc}: not the scores {manifest_loc} was made from (the manifest records {}, this file is {digest})",
        m.scores_source.digest
    );
    let scores: Artifact<Scores> = artifact::from_bytes(&bytes).with_context(|| format!("{loc}"))?;
    // Amax are f32 values (stored as f64); compare them as such.
    let by_name: HashMap<&str, f32> =
        scores.payload.layers.iter().map(|l| (l.name.as_str(), l.input_amax as f32)).collect();
    for l in &m.layers {
        let amax = by_name.get(l.name.as_str()).copied();
        ensure!(
            amax == Some(l.input_amax as f32),
            "{loc}: layer {} has input amax {:?}, the manifest {manifest_loc} carries {}",
            l.name,
            amax,
            l.input_amax
        );
    }
    Ok(())
}

/// The model the scores were made from must be this checkpoint: same config.json and weight files
/// (by content digest, whatever the directory).
fn check_same_model(manifest: &Location, recorded: &Provenance, dir: &Path) -> Result<()> {
    let recorded: Vec<(&str, String, &str)> = recorded
        .sources
        .iter()
        .filter(|s| s.role == "model-config" || s.role == "model-weights")
        .map(|s| (s.role.as_str(), file_name(&s.path), s.digest.as_str()))
        .collect();
    ensure!(
        !recorded.is_empty(),
        "{manifest}: its scores record no model digests, so the checkpoint cannot be checked"
    );
    let mut here = Provenance::default();
    artifact::model_provenance(dir, &mut here)?;
    let here: BTreeMap<(String, String), String> =
        here.sources.iter().map(|s| ((s.role.clone(), file_name(&s.path)), s.digest.clone())).collect();
    for (role, file, digest) in &recorded {
        match here.get(&(role.to_string(), file.clone())) {
            Some(d) if d == digest => {}
            Some(d) => bail!(
                "{manifest} was made from another model: {} in {} has digest {d}, the scores were made from {digest}",
                file,
                dir.display()
            ),
            None => bail!("{manifest} was made from another model: {} has no {file}", dir.display()),
        }
    }
    let weight_files = recorded.iter().filter(|r| r.0 == "model-weights").count();
    let here_files = here.keys().filter(|k| k.0 == "model-weights").count();
    ensure!(
        weight_files == here_files,
        "{manifest} was made from another model: {} has {here_files} weight files, the scores' model had {weight_files}",
        dir.display()
    );
    Ok(())
}

fn file_name(path: &str) -> String {
    Path::new(path).file_name().map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned())
}

/// Names, the first `n` of them and how many more.
fn abbreviate(names: &[&str], n: usize) -> String {
    let mut s = names.iter().take(n).copied().collect::<Vec<_>>().join(", ");
    if names.len() > n {
        s.push_str(&format!(", and {} more", names.len() - n));
    }
    s
}

/// FP8 shards of fused layers whose weight scale is not their layer's largest.
fn unfused_scale_shards(plan: &ServedPlan) -> Vec<&str> {
    let fp8 = || plan.layers.iter().filter(|l| l.format == ServedFormat::Fp8);
    let mut largest: HashMap<String, f32> = HashMap::new();
    for l in fp8() {
        if let Some(key) = served::fused_layer_of(&l.name) {
            let e = largest.entry(key).or_insert(0.0);
            *e = e.max(l.weight_scale);
        }
    }
    fp8()
        .filter(|l| served::fused_layer_of(&l.name).is_some_and(|k| largest[&k] != l.weight_scale))
        .map(|l| l.name.as_str())
        .collect()
}

/// max |x| of a stored float tensor, decoded in parallel chunks without an f32 copy.
fn max_abs(bytes: &[u8], dtype: Dtype) -> Result<f32> {
    use rayon::prelude::*;
    let width = element_size(dtype)?;
    Ok(bytes
        .par_chunks(width << 16)
        .map(|c| c.chunks_exact(width).fold(0f32, |m, b| m.max(decode(b, dtype).abs())))
        .reduce(|| 0.0, f32::max))
}

/// Little-endian stored floats as f32, decoded in parallel.
fn to_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    map_elements(bytes, dtype, |x| x)
}

/// `f` of every stored float (decoded to f32), in parallel, without an f32 copy of the tensor.
fn map_elements<T: Copy + Default + Send>(bytes: &[u8], dtype: Dtype, f: impl Fn(f32) -> T + Sync) -> Result<Vec<T>> {
    use rayon::prelude::*;
    let width = element_size(dtype)?;
    let mut out = vec![T::default(); bytes.len() / width];
    out.par_chunks_mut(1 << 16).zip(bytes.par_chunks(width << 16)).for_each(|(o, b)| {
        for (o, b) in o.iter_mut().zip(b.chunks_exact(width)) {
            *o = f(decode(b, dtype));
        }
    });
    Ok(out)
}

fn element_size(dtype: Dtype) -> Result<usize> {
    match dtype {
        Dtype::F32 => Ok(4),
        Dtype::BF16 | Dtype::F16 => Ok(2),
        other => bail!("weights stored as {other:?} cannot be quantized (F32, BF16 or F16)"),
    }
}

#[inline]
fn decode(b: &[u8], dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => f16::from_le_bytes([b[0], b[1]]).to_f32(),
    }
}

/// `value` rounded to `dtype` (bf16 / f16 / f32).
fn round_to(dtype: Dtype, value: f32) -> f32 {
    match dtype {
        Dtype::BF16 => bf16::from_f32(value).to_f32(),
        Dtype::F16 => f16::from_f32(value).to_f32(),
        _ => value,
    }
}

fn scalar_bytes(dtype: Dtype, value: f32) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => bf16::from_f32(value).to_le_bytes().to_vec(),
        Dtype::F16 => f16::from_f32(value).to_le_bytes().to_vec(),
        _ => value.to_le_bytes().to_vec(),
    }
}

/// The output tensors in name order, and where each one's bytes come from.
fn output_tensors(
    checkpoint: &Checkpoint,
    plan: &ServedPlan,
    split_experts: &[experts::SplitExperts],
    layout: Layout,
    weight_dtypes: &HashMap<String, Dtype>,
) -> Result<(Vec<TensorSpec>, Vec<Source>)> {
    let by_weight: HashMap<String, &ServedLayer> =
        plan.layers.iter().map(|l| (format!("{}.weight", l.name), l)).collect();
    let mut out: Vec<(TensorSpec, Source)> = Vec::new();
    for (name, dtype, shape) in checkpoint.tensors() {
        ensure!(
            ![".weight_scale", ".weight_scale_2", ".input_scale"].iter().any(|s| name.ends_with(s)),
            "the checkpoint already holds quantization scales (`{name}`)"
        );
        if let Some(per_expert) = experts::output_tensors(split_experts, name, dtype, shape)? {
            out.extend(per_expert);
            continue;
        }
        let Some(l) = by_weight.get(name) else {
            out.push((TensorSpec { name: name.to_string(), dtype, shape: shape.to_vec() }, Source::Copy));
            continue;
        };
        let spec = |suffix: &str, dtype: Dtype, shape: Vec<usize>| TensorSpec {
            name: format!("{}.{suffix}", l.name),
            dtype,
            shape,
        };
        let (scale_dtype, scale_shape) = match layout {
            Layout::CompressedTensors => (weight_dtypes[&l.name], vec![1]),
            _ => (Dtype::F32, vec![]),
        };
        let weight = name.to_string();
        match l.format {
            ServedFormat::Fp8 => {
                out.push((
                    spec("weight", Dtype::F8_E4M3, shape.to_vec()),
                    Source::Fp8 { weight, scale: l.weight_scale },
                ));
                out.push((spec("weight_scale", scale_dtype, scale_shape.clone()), Source::Scale(l.weight_scale)));
            }
            ServedFormat::Nvfp4 | ServedFormat::W4a16Nvfp4 => {
                let (rows, cols) = (shape[0], shape[1]);
                let weight_scale_2 = l.weight_scale;
                out.push((
                    spec("weight", Dtype::U8, vec![rows, cols / 2]),
                    Source::Nvfp4Codes { weight: weight.clone(), weight_scale_2 },
                ));
                out.push((
                    spec("weight_scale", Dtype::F8_E4M3, vec![rows, cols / nvfp4::BLOCK_SIZE]),
                    Source::Nvfp4BlockScales { weight, weight_scale_2 },
                ));
                out.push((spec("weight_scale_2", scale_dtype, scale_shape.clone()), Source::Scale(weight_scale_2)));
            }
        }
        if let Some(input_scale) = l.input_scale {
            out.push((spec("input_scale", scale_dtype, scale_shape), Source::Scale(input_scale)));
        }
    }
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(out.into_iter().unzip())
}

/// ModelOpt's modules with quantizers, in `named_modules()` order: every scored layer (Linear,
/// the Conv3d patch embedding, lm_head) and the embeddings (`nn.Embedding` is a quant module too).
fn modules_with_quantizers(m: &Manifest, stored: &HashMap<&str, (Dtype, &[usize])>) -> Vec<String> {
    let mut names = Vec::with_capacity(m.layers.len() + 2);
    let pos_embed = "model.visual.pos_embed";
    let embed_tokens = "model.language_model.embed_tokens";
    for l in &m.layers {
        if l.tower == "text"
            && !names.iter().any(|n| n == embed_tokens)
            && stored.contains_key("model.language_model.embed_tokens.weight")
        {
            names.push(embed_tokens.to_string());
        }
        // A sparse layer's router: no quantizer in ModelOpt, but its exporter lists it as
        // unquantized, before the experts, as the module order has it.
        if l.kind == "experts" {
            let router = l.name.replace(".mlp.experts", ".mlp.gate");
            if stored.contains_key(format!("{router}.weight").as_str()) {
                names.push(router);
            }
        }
        names.push(l.name.clone());
        if l.kind == LayerKind::PatchEmbed.as_str() && stored.contains_key("model.visual.pos_embed.weight") {
            names.push(pos_embed.to_string());
        }
    }
    names
}

/// `config.json` with `quantization_config` added as its last key, the rest of the text unchanged.
fn with_quantization_config(text: &str, quantization_config: &Value) -> Result<String> {
    let end = text.rfind('}').context("config.json is not a JSON object")?;
    let body = text[..end].trim_end();
    let pretty = serde_json::to_string_pretty(quantization_config)?.replace('\n', "\n  ");
    let out = format!("{body},\n  \"quantization_config\": {pretty}\n}}\n");
    // The result must parse to the original object plus the new key.
    let mut parsed: Value = serde_json::from_str(&out)?;
    let added = parsed.as_object_mut().and_then(|o| o.remove("quantization_config"));
    ensure!(added.as_ref() == Some(quantization_config), "internal: quantization_config did not round-trip");
    ensure!(parsed == serde_json::from_str::<Value>(text)?, "internal: config.json changed beyond quantization_config");
    Ok(out)
}

/// Files of the checkpoint directory that go over unchanged: everything but the weights, their
/// index and the configs rewritten here.
fn files_to_copy(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let weights = [".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json"].iter().any(|s| name.ends_with(s));
        let rewritten = name == "config.json" || name == "hf_quant_config.json";
        if path.is_file() && !weights && !rewritten && !name.starts_with('.') {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Writes the job into a temporary directory beside the output and renames it into place.
fn write(args: &QuantizeArgs, job: &Job, reporter: &Reporter) -> Result<()> {
    let out = &args.output;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let stem = out.file_name().map_or_else(|| "checkpoint".into(), |n| n.to_string_lossy().into_owned());
    // Named as every artifact's temporaries, `.<name>.<pid>.<random>.tmp`, so that a rerun removes
    // what a killed run left.
    artifact::remove_stale_temporaries(out);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{stem}.{}.", std::process::id()))
        .suffix(".tmp")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;

    let assignment = shards::assign(&job.tensors, args.max_shard_size);
    let files = shards::file_names(assignment.len());
    let total: u64 = job.tensors.iter().map(|t| t.byte_len() as u64).sum();
    let bar = reporter.bar(total, "writing");
    let source_of: HashMap<&str, &Source> = job.tensors.iter().map(|t| t.name.as_str()).zip(&job.sources).collect();
    for (shard, file) in assignment.iter().zip(&files) {
        let specs: Vec<&TensorSpec> = shard.iter().map(|&i| &job.tensors[i]).collect();
        shards::write_file(&tmp.path().join(file), &specs, &job.metadata, |t| {
            let bytes = produce(&job.checkpoint, t, source_of[t.name.as_str()])?;
            bar.inc(bytes.byte_len() as u64);
            Ok(bytes)
        })?;
    }
    bar.finish_and_clear();
    if files.len() > 1 {
        let index = shards::index_json(&job.tensors, &assignment, &files)?;
        std::fs::write(tmp.path().join(INDEX_FILE), index)?;
    }
    std::fs::write(tmp.path().join("config.json"), &job.config_json)?;
    if let Some(hf) = &job.hf_quant_config {
        std::fs::write(tmp.path().join("hf_quant_config.json"), serde_json::to_string_pretty(hf)? + "\n")?;
    }
    for src in &job.copies {
        let name = src.file_name().expect("a file");
        std::fs::copy(src, tmp.path().join(name)).with_context(|| format!("copying {}", src.display()))?;
    }

    // Into place: an existing output (--force) is moved aside first and removed after.
    let tmp_path = tmp.keep();
    let old = if out.exists() {
        let old = parent.join(format!(".{stem}.{}.old.tmp", std::process::id()));
        std::fs::rename(out, &old).with_context(|| format!("moving the old {} aside", out.display()))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(&tmp_path, out) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, out);
        }
        let _ = std::fs::remove_dir_all(&tmp_path);
        return Err(e).with_context(|| format!("renaming the new checkpoint to {}", out.display()));
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing the replaced {}", old.display()))?;
    }
    Ok(())
}

/// The bytes of one output tensor: unchanged tensors as a file range the kernel copies, the
/// others computed from the mapped input weight.
fn produce<'a>(checkpoint: &'a Checkpoint, spec: &TensorSpec, source: &Source) -> Result<Bytes<'a>> {
    // A stored weight's dtype and column count.
    let stored = |weight: &str| -> Result<(Dtype, usize)> {
        let t = checkpoint.tensors().into_iter().find(|t| t.0 == weight);
        let (_, dtype, shape) = t.with_context(|| format!("`{weight}` is missing"))?;
        Ok((dtype, shape.last().copied().unwrap_or(1)))
    };
    let widened = |weight: &str| -> Result<(Vec<f32>, usize)> {
        let (dtype, cols) = stored(weight)?;
        Ok((checkpoint.with_mapped(weight, |b| to_f32(b, dtype))??, cols))
    };
    Ok(match source {
        Source::Copy => {
            let (file, offset, len) = checkpoint.byte_range(&spec.name)?;
            Bytes::FileRange { file, offset, len }
        }
        Source::Fp8 { weight, scale } => {
            let (dtype, _) = stored(weight)?;
            Bytes::Owned(checkpoint.with_mapped(weight, |b| map_elements(b, dtype, |w| fp8::e4m3_code(w, *scale)))??)
        }
        Source::Nvfp4Codes { weight, weight_scale_2 } => {
            let (w, cols) = widened(weight)?;
            Bytes::Owned(nvfp4::encode_weight(&w, cols, *weight_scale_2).packed)
        }
        Source::Nvfp4BlockScales { weight, weight_scale_2 } => {
            let (w, cols) = widened(weight)?;
            Bytes::Owned(nvfp4::encode_block_scales(&w, cols, *weight_scale_2))
        }
        Source::Scale(value) => Bytes::Owned(scalar_bytes(spec.dtype, *value)),
        Source::ExpertSlice { tensor, expert, col0, cols, fp8_scale } => {
            let t = checkpoint.tensors().into_iter().find(|t| t.0 == tensor);
            let (_, dtype, shape) = t.with_context(|| format!("`{tensor}` is missing"))?;
            Bytes::Owned(
                checkpoint.with_mapped(tensor, |b| {
                    experts::slice_bytes(b, dtype, shape, *expert, *col0, *cols, *fp8_scale)
                })??,
            )
        }
    })
}
