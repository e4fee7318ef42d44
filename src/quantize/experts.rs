//! A mixture-of-experts checkpoint's routed experts in the written checkpoint.
//!
//! The released Qwen3-VL-MoE layout stores each sparse layer's experts fused, `mlp.experts.gate_up_proj`
//! `[E, H, 2I]` and `mlp.experts.down_proj` `[E, I, H]`, with no scales. A quantized expert needs
//! its own weight scale and the layer's input scales, which the fused names cannot carry, so when
//! the recipe quantizes any experts every sparse layer is written per expert in nn.Linear
//! orientation, as ModelOpt 0.47's exporter writes them (`_export_fused_experts`) and as vLLM's
//! per-expert MoE loaders take them:
//! `mlp.experts.<e>.{gate,up}_proj.weight` `[I, H]` and `mlp.experts.<e>.down_proj.weight` `[H, I]`,
//! FP8 with `weight_scale` (gate and up share their expert's fused amax) and `input_scale` (the
//! layer's, repeated under every expert), or in the input dtype for an unquantized layer. The
//! router (`mlp.gate`) is copied and stays unquantized. Transformers does not read this layout
//! back (it expects the fused names); a recipe with every expert 16-bit keeps the fused tensors.

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::Dtype;

use super::shards::TensorSpec;
use super::{decode, element_size, max_abs, Source};
use crate::artifact::manifest::{LayerEntry, Manifest};
use crate::model::loader::Checkpoint;
use crate::quant::served::ServedFormat;
use crate::quant::{fp8, NONE};

/// One sparse layer written per expert.
#[derive(Debug, Clone)]
pub struct SplitExperts {
    /// `model.language_model.layers.N.mlp.experts`.
    pub name: String,
    pub num_experts: usize,
    /// The layer's scales when the recipe puts its experts in FP8.
    pub fp8: Option<Fp8Scales>,
}

#[derive(Debug, Clone)]
pub struct Fp8Scales {
    /// Per expert, from the checkpoint's weights (amax / 448).
    pub gate_up_weight: Vec<f32>,
    pub down_weight: Vec<f32>,
    /// The layer's calibrated input scales (amax / 448).
    pub gate_up_input: f32,
    pub down_input: f32,
}

/// The sparse layers to write per expert: none unless the recipe quantizes some experts (then
/// all, so the checkpoint has one layout). Refuses formats other than FP8 for the experts.
pub fn plan(m: &Manifest, manifest_name: &str, checkpoint: &Checkpoint) -> Result<Vec<SplitExperts>> {
    let layers: Vec<&LayerEntry> = m.layers.iter().filter(|l| l.kind == "experts").collect();
    for l in &layers {
        ensure!(
            l.chosen == NONE || l.chosen == "FP8",
            "{manifest_name}: layer {} (a sparse layer's routed experts) is {} in the recipe; quantize writes experts \
             in FP8 only",
            l.name,
            l.chosen
        );
    }
    if layers.iter().all(|l| l.chosen == NONE) {
        return Ok(Vec::new());
    }
    layers
        .iter()
        .map(|l| {
            let calibration = l.experts.as_ref().with_context(|| {
                format!("{manifest_name}: layer {} has no experts calibration (a manifest of an older qsens?)", l.name)
            })?;
            let num_experts = calibration.num_experts;
            let fp8 = if l.chosen == "FP8" {
                let per_expert = |suffix: &str| -> Result<Vec<f32>> {
                    let tensor = format!("{}.{suffix}", l.name);
                    let (dtype, shape) = stored(checkpoint, &tensor)?;
                    ensure!(
                        shape.len() == 3 && shape[0] == num_experts,
                        "`{tensor}` has shape {shape:?}, not [{num_experts}, .., ..] as the manifest's experts"
                    );
                    let block = shape[1] * shape[2] * element_size(dtype)?;
                    checkpoint.with_mapped(&tensor, |b| {
                        b.chunks_exact(block)
                            .map(|expert| max_abs(expert, dtype).map(|a| ServedFormat::Fp8.weight_scale(a)))
                            .collect::<Result<Vec<f32>>>()
                    })?
                };
                Some(Fp8Scales {
                    gate_up_weight: per_expert("gate_up_proj")?,
                    down_weight: per_expert("down_proj")?,
                    gate_up_input: fp8::checkpoint_scale(l.input_amax as f32),
                    down_input: fp8::checkpoint_scale(calibration.down_input_amax as f32),
                })
            } else {
                None
            };
            Ok(SplitExperts { name: l.name.clone(), num_experts, fp8 })
        })
        .collect()
}

fn stored(checkpoint: &Checkpoint, name: &str) -> Result<(Dtype, Vec<usize>)> {
    let t = checkpoint.tensors().into_iter().find(|t| t.0 == name);
    let (_, dtype, shape) = t.with_context(|| format!("`{name}` is missing from the checkpoint"))?;
    Ok((dtype, shape.to_vec()))
}

/// The per-expert tensors that replace checkpoint tensor `name` (`dtype`, `shape`), or `None`
/// when it is no fused experts tensor of a split layer.
pub fn output_tensors<'a>(
    split: &'a [SplitExperts],
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<Option<Vec<(TensorSpec, Source)>>> {
    let Some((layer, fused)) = split.iter().find_map(|s| {
        let rest = name.strip_prefix(s.name.as_str())?.strip_prefix('.')?;
        matches!(rest, "gate_up_proj" | "down_proj").then_some((s, rest))
    }) else {
        return Ok(None);
    };
    let [experts, rows, cols] = shape else { bail!("`{name}` has shape {shape:?}, not [experts, .., ..]") };
    ensure!(*experts == layer.num_experts, "`{name}` holds {experts} experts, the manifest {}", layer.num_experts);
    let scales = |weight: &'a [f32], input| Some(ExpertScales { weight, input });
    let projections: Vec<Projection> = match fused {
        "gate_up_proj" => {
            ensure!(cols % 2 == 0, "`{name}` has an odd number of columns ({cols}) for gate and up");
            let half = cols / 2;
            let s = layer.fp8.as_ref().and_then(|f| scales(&f.gate_up_weight, f.gate_up_input));
            vec![
                Projection { name: "gate_proj", col0: 0, cols: half, scales: s },
                Projection { name: "up_proj", col0: half, cols: half, scales: s },
            ]
        }
        _ => {
            let s = layer.fp8.as_ref().and_then(|f| scales(&f.down_weight, f.down_input));
            vec![Projection { name: "down_proj", col0: 0, cols: *cols, scales: s }]
        }
    };
    let mut out = Vec::new();
    for e in 0..*experts {
        for &Projection { name: proj, col0, cols: width, scales } in &projections {
            let spec = |suffix: &str, dtype: Dtype, shape: Vec<usize>| TensorSpec {
                name: format!("{}.{e}.{proj}.{suffix}", layer.name),
                dtype,
                shape,
            };
            let slice =
                |fp8_scale| Source::ExpertSlice { tensor: name.to_string(), expert: e, col0, cols: width, fp8_scale };
            match scales {
                Some(ExpertScales { weight: weight_scales, input: input_scale }) => {
                    let w = weight_scales[e];
                    out.push((spec("weight", Dtype::F8_E4M3, vec![width, *rows]), slice(Some(w))));
                    out.push((spec("weight_scale", Dtype::F32, vec![]), Source::Scale(w)));
                    out.push((spec("input_scale", Dtype::F32, vec![]), Source::Scale(input_scale)));
                }
                None => out.push((spec("weight", dtype, vec![width, *rows]), slice(None))),
            }
        }
    }
    Ok(Some(out))
}

/// One output projection of a fused experts tensor: its name, its columns in the fused tensor and,
/// in FP8, its scales.
#[derive(Clone, Copy)]
struct Projection<'a> {
    name: &'static str,
    col0: usize,
    cols: usize,
    scales: Option<ExpertScales<'a>>,
}

/// Per-expert weight scales and the layer's input scale of one projection.
#[derive(Clone, Copy)]
struct ExpertScales<'a> {
    weight: &'a [f32],
    input: f32,
}

/// Expert `expert`'s columns `col0..col0 + cols` of a fused `[E, R, C]` tensor, transposed to
/// `[cols, R]` (nn.Linear orientation): E4M3 codes with `fp8_scale`, else the stored bytes.
pub fn slice_bytes(
    bytes: &[u8],
    dtype: Dtype,
    shape: &[usize],
    expert: usize,
    col0: usize,
    cols: usize,
    fp8_scale: Option<f32>,
) -> Result<Vec<u8>> {
    let [_, r, c] = shape else { bail!("a fused experts tensor of shape {shape:?}") };
    let (r, c) = (*r, *c);
    let width = element_size(dtype)?;
    let expert_bytes = &bytes[expert * r * c * width..(expert + 1) * r * c * width];
    let element = |row: usize, col: usize| &expert_bytes[(row * c + col) * width..(row * c + col + 1) * width];
    let mut out = Vec::with_capacity(cols * r * fp8_scale.map_or(width, |_| 1));
    for col in col0..col0 + cols {
        for row in 0..r {
            match fp8_scale {
                Some(scale) => out.push(fp8::e4m3_code(decode(element(row, col), dtype), scale)),
                None => out.extend_from_slice(element(row, col)),
            }
        }
    }
    Ok(out)
}
