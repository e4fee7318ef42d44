//! What a served checkpoint computes: the one place that turns a recipe (a format per layer and
//! the calibrated amax) into the layers a serving engine runs quantized, with their scales.
//! `quantize` writes this plan; `evaluate` measures it, either from the plan itself or from the
//! checkpoint `quantize` wrote (both give the same numbers).
//!
//! Rules, from how the loaders work (docs/quantize.md names the code each comes from):
//! - Three formats are written, as ModelOpt's exporter writes them: `FP8` (E4M3, per-tensor
//!   weight scale, static per-tensor input scale), `NVFP4` (E2M1 in 16-blocks with E4M3 block
//!   scales and a per-tensor `weight_scale_2`, static per-tensor input scale) and `W4A16_NVFP4`
//!   (the same weights, 16-bit inputs). Every other layer stays in the checkpoint's dtype.
//! - A fused layer's shards (q/k/v of one attention, gate/up of one MLP) are one matrix in the
//!   serving engine, so they must share a format. The engine serves them with the largest of
//!   their per-tensor scales. For NVFP4 ModelOpt's exporter writes that shared amax itself (a
//!   block scale only means something relative to its `weight_scale_2`), so the plan always
//!   does; for FP8 it keeps each shard's own scale unless `fuse_scales`, with which the plan uses
//!   the shared scales, so the checkpoint holds exactly what is served.
//! - A tied `lm_head` is the token embedding: engines serve it from the embedding table, 16-bit.
//! - The patch embedding is a Conv3d: no engine loads it quantized (ModelOpt's exporter also
//!   writes it unquantized), so it stays 16-bit.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::{fp8, nvfp4};
use crate::model::loader::Checkpoint;
use crate::model::qwen3_vl::moe::{ExpertsAmax, Projection, SparseMoeBlock};
use crate::model::qwen3_vl::Qwen3VL;
use crate::model::{LayerId, LayerKind, Linear, Tap};

/// The name of FP8 per-tensor, the format every checkpoint layout can hold.
pub const FP8: &str = "FP8";

/// A format a checkpoint can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServedFormat {
    Fp8,
    Nvfp4,
    W4a16Nvfp4,
}

impl ServedFormat {
    /// The format of a recipe's format name (short or ModelOpt config name); `None` for `NONE`.
    /// Errors name formats that cannot be written yet.
    pub fn parse(name: &str) -> Result<Option<Self>> {
        if name.eq_ignore_ascii_case(super::NONE) {
            return Ok(None);
        }
        let format = super::format_by_name(name)?;
        Ok(Some(match format.name() {
            "FP8" => ServedFormat::Fp8,
            "NVFP4" => ServedFormat::Nvfp4,
            "W4A16_NVFP4" => ServedFormat::W4a16Nvfp4,
            other if format.calibration() != super::Calibration::Max => bail!(
                "format '{other}' cannot be written to a checkpoint yet: its smoothing (pre_quant_scale) is not \
                 exported (FP8, NVFP4 and W4A16_NVFP4 can be)"
            ),
            other => {
                bail!("format '{other}' cannot be written to a checkpoint yet (FP8, NVFP4 and W4A16_NVFP4 can be)")
            }
        }))
    }

    /// ModelOpt's `quant_algo`.
    pub fn quant_algo(self) -> &'static str {
        match self {
            ServedFormat::Fp8 => "FP8",
            ServedFormat::Nvfp4 => "NVFP4",
            ServedFormat::W4a16Nvfp4 => "W4A16_NVFP4",
        }
    }

    /// Elements per block scale (`group_size`), for the block formats.
    pub fn group_size(self) -> Option<usize> {
        match self {
            ServedFormat::Fp8 => None,
            ServedFormat::Nvfp4 | ServedFormat::W4a16Nvfp4 => Some(nvfp4::BLOCK_SIZE),
        }
    }

    /// Whether the served layer quantizes its input (with a static `input_scale`).
    pub fn quantizes_input(self) -> bool {
        self != ServedFormat::W4a16Nvfp4
    }

    /// The per-tensor weight scale stored for a weight amax: FP8's `weight_scale`, NVFP4's
    /// `weight_scale_2`.
    pub fn weight_scale(self, weight_amax: f32) -> f32 {
        match self {
            ServedFormat::Fp8 => fp8::checkpoint_scale(weight_amax),
            ServedFormat::Nvfp4 | ServedFormat::W4a16Nvfp4 => nvfp4::global_scale(weight_amax),
        }
    }

    /// The static `input_scale` stored for a calibrated input amax.
    pub fn input_scale(self, input_amax: f32) -> Option<f32> {
        match self {
            ServedFormat::Fp8 => Some(fp8::checkpoint_scale(input_amax)),
            ServedFormat::Nvfp4 => Some(nvfp4::global_scale(input_amax)),
            ServedFormat::W4a16Nvfp4 => None,
        }
    }
}

/// One layer of a recipe, as `quantize` and `evaluate` see it.
#[derive(Debug, Clone)]
pub struct RecipeLayer {
    /// HF module name.
    pub name: String,
    pub kind: LayerKind,
    /// A format name ([`ServedFormat::parse`]) or `NONE`.
    pub format: String,
    /// Calibrated input amax (max |x| over the calibration samples).
    pub input_amax: f32,
    /// max |W| of the weight as it will be quantized.
    pub weight_amax: f32,
}

/// A layer stored quantized.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedLayer {
    pub name: String,
    pub format: ServedFormat,
    /// The weight amax the scales come from (a fused layer's shared one where it applies).
    pub weight_amax: f32,
    /// [`ServedFormat::weight_scale`] of `weight_amax`.
    pub weight_scale: f32,
    /// The input amax (shared like `weight_amax`) and [`ServedFormat::input_scale`] of it.
    pub input_amax: f32,
    pub input_scale: Option<f32>,
}

impl ServedLayer {
    /// A layer in `format` with its scales from these amax.
    fn new(name: &str, format: ServedFormat, weight_amax: f32, input_amax: f32) -> Self {
        ServedLayer {
            name: name.to_string(),
            format,
            weight_amax,
            weight_scale: format.weight_scale(weight_amax),
            input_amax,
            input_scale: format.input_scale(input_amax),
        }
    }
}

/// Why a layer the recipe quantizes stays 16-bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptReason {
    TiedLmHead,
    PatchEmbed,
}

impl KeptReason {
    pub fn explain(self) -> &'static str {
        match self {
            KeptReason::TiedLmHead => {
                "lm_head is tied to the token embedding, which serving engines load 16-bit: kept 16-bit"
            }
            KeptReason::PatchEmbed => {
                "the patch embedding is a Conv3d, which no serving engine loads quantized (ModelOpt's exporter \
                 also writes it unquantized): kept 16-bit"
            }
        }
    }
}

/// The layers a served checkpoint runs quantized.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServedPlan {
    /// In recipe (model) order.
    pub layers: Vec<ServedLayer>,
    /// Layers the recipe quantizes that stay 16-bit.
    pub kept: Vec<(String, KeptReason)>,
    /// Shards whose scales the shared fused amax changed (NVFP4 always, FP8 with `fuse_scales`).
    pub fused_scale_changes: Vec<String>,
    /// The recipe as scored rather than as served ([`plan_as_scored`]).
    pub as_scored: bool,
}

impl ServedPlan {
    pub fn get(&self, name: &str) -> Option<&ServedLayer> {
        self.layers.iter().find(|l| l.name == name)
    }

    /// The formats used, in order of first use.
    pub fn formats(&self) -> Vec<ServedFormat> {
        let mut out: Vec<ServedFormat> = Vec::new();
        for l in &self.layers {
            if !out.contains(&l.format) {
                out.push(l.format);
            }
        }
        out
    }
}

/// The fused layer a module is a shard of in the serving engine (`…self_attn.qkv_proj` for
/// q/k/v, `…mlp.gate_up_proj` for gate/up), as vLLM's `packed_modules_mapping` for Qwen3-VL.
pub fn fused_layer_of(name: &str) -> Option<String> {
    let (prefix, last) = name.rsplit_once('.')?;
    match last {
        "q_proj" | "k_proj" | "v_proj" if prefix.ends_with("self_attn") => Some(format!("{prefix}.qkv_proj")),
        "gate_proj" | "up_proj" if prefix.ends_with("mlp") => Some(format!("{prefix}.gate_up_proj")),
        _ => None,
    }
}

fn format_label(f: Option<ServedFormat>) -> &'static str {
    f.map_or(super::NONE, ServedFormat::quant_algo)
}

/// The served plan of a recipe. `tied_lm_head`: the model's lm_head is its token embedding.
/// Errors name the fused layers whose shards the recipe splits.
pub fn plan(layers: &[RecipeLayer], tied_lm_head: bool, fuse_scales: bool) -> Result<ServedPlan> {
    let mut chosen = Vec::with_capacity(layers.len());
    for l in layers {
        chosen.push(ServedFormat::parse(&l.format).map_err(|e| anyhow::anyhow!("layer {}: {e}", l.name))?);
    }
    // Shards of one fused layer must share a format.
    let mut fused: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        if let Some(key) = fused_layer_of(&l.name) {
            match fused.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => fused.push((key, vec![i])),
            }
        }
    }
    let split: Vec<String> = fused
        .iter()
        .filter(|(_, m)| m.iter().any(|&i| chosen[i] != chosen[m[0]]))
        .map(|(_, m)| {
            m.iter().map(|&i| format!("{} {}", layers[i].name, format_label(chosen[i]))).collect::<Vec<_>>().join(", ")
        })
        .collect();
    if !split.is_empty() {
        bail!(
            "the recipe splits {} fused layer(s) that serving engines run as one matrix, so their shards must \
             share a format: {}",
            split.len(),
            split.join("; ")
        );
    }

    let mut plan = ServedPlan::default();
    for (i, l) in layers.iter().enumerate() {
        let Some(format) = chosen[i] else { continue };
        if l.kind == LayerKind::PatchEmbed {
            plan.kept.push((l.name.clone(), KeptReason::PatchEmbed));
            continue;
        }
        if l.name == "lm_head" && tied_lm_head {
            plan.kept.push((l.name.clone(), KeptReason::TiedLmHead));
            continue;
        }
        let (mut weight_amax, mut input_amax) = (l.weight_amax, l.input_amax);
        let shared = fuse_scales || format != ServedFormat::Fp8;
        if let Some(key) = fused_layer_of(&l.name).filter(|_| shared) {
            let (_, members) = fused.iter().find(|(k, _)| *k == key).expect("grouped above");
            weight_amax = members.iter().map(|&m| layers[m].weight_amax).fold(f32::MIN, f32::max);
            if format.quantizes_input() {
                input_amax = members.iter().map(|&m| layers[m].input_amax).fold(f32::MIN, f32::max);
            }
            if weight_amax != l.weight_amax || input_amax != l.input_amax {
                plan.fused_scale_changes.push(l.name.clone());
            }
        }
        plan.layers.push(ServedLayer::new(&l.name, format, weight_amax, input_amax));
    }
    Ok(plan)
}

/// The recipe as `score-layers` measured it and ModelOpt's fake quantization (`mtq.quantize`)
/// computes it: every layer it quantizes, the patch embedding and a tied lm_head included, each
/// with its own amax (no fused sharing), NVFP4 weights with the fake quantization's arithmetic
/// instead of the exporter's. Not a checkpoint: what the predicted objective was measured on.
pub fn plan_as_scored(layers: &[RecipeLayer]) -> Result<ServedPlan> {
    let mut plan = ServedPlan { as_scored: true, ..ServedPlan::default() };
    for l in layers {
        let format = ServedFormat::parse(&l.format).map_err(|e| anyhow::anyhow!("layer {}: {e}", l.name))?;
        let Some(format) = format else { continue };
        plan.layers.push(ServedLayer::new(&l.name, format, l.weight_amax, l.input_amax));
    }
    Ok(plan)
}

/// Dequantized weights by layer, format, weight scale and arithmetic (as scored or as served),
/// shared by the taps of several recipes.
#[derive(Debug, Default)]
pub struct DequantizedWeights(std::collections::HashMap<(LayerId, ServedFormat, u32, bool), Tensor>);

/// How a served layer quantizes its input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputQuant {
    /// FP8 E4M3 with the static per-tensor `input_scale`.
    Fp8 { input_scale: f32 },
    /// NVFP4 with the static per-tensor global scale `input_scale` (amax / 2688) and dynamic
    /// E4M3 16-block scales, as ModelOpt's fake quantization computes it.
    Nvfp4 { input_scale: f32 },
}

impl InputQuant {
    /// The input quantization of a served layer, if it has one.
    pub fn of(format: ServedFormat, input_scale: Option<f32>) -> Option<Self> {
        let input_scale = input_scale?;
        match format {
            ServedFormat::Fp8 => Some(InputQuant::Fp8 { input_scale }),
            ServedFormat::Nvfp4 => Some(InputQuant::Nvfp4 { input_scale }),
            ServedFormat::W4a16Nvfp4 => None,
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            InputQuant::Fp8 { input_scale } => fp8::fake_quant_with_scale(x, input_scale),
            InputQuant::Nvfp4 { input_scale } => nvfp4::fake_quant_tensor_with_global_scale(x, input_scale),
        }
    }
}

/// The weight a served layer holds, dequantized, in the weight's dtype and device: exactly what
/// the checkpoint writer stores (FP8: `e4m3(W / weight_scale) · weight_scale`; NVFP4: the
/// exporter's codes and block scales, decoded).
pub fn dequantized_weight(weight: &Tensor, format: ServedFormat, weight_scale: f32) -> candle_core::Result<Tensor> {
    match format {
        ServedFormat::Fp8 => fp8::fake_quant_with_scale(weight, weight_scale),
        ServedFormat::Nvfp4 | ServedFormat::W4a16Nvfp4 => super::host::on_host(weight, |w| {
            let (rows, cols) = w.dims2()?;
            let values = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let packed = nvfp4::encode_weight(&values, cols, weight_scale);
            let decoded = nvfp4::decode_weight(&packed, cols, weight_scale);
            Tensor::from_vec(decoded, (rows, cols), w.device())?.to_dtype(w.dtype())
        }),
    }
}

/// Runs a model as the served checkpoint computes it: the quantized layers' inputs quantized
/// with their static scales, their weights dequantized from the checkpoint's codes.
#[derive(Debug, Default)]
pub struct ServedTap {
    /// Per layer id: how the layer's input is quantized.
    inputs: Vec<Option<InputQuant>>,
    /// Per layer id: the dequantized weight, when the model holds the unquantized one.
    weights: Vec<Option<Tensor>>,
    /// Sparse layers whose experts are FP8: (decoder layer, how).
    experts: Vec<(usize, ExpertsQuant)>,
}

/// A sparse layer's FP8 experts (`quantize`'s `experts` writes them per expert).
#[derive(Debug, Clone)]
enum ExpertsQuant {
    /// As the checkpoint serves them: each expert's weights decoded from its E4M3 codes and its
    /// own scale (`[E, H, 2I]`, `[E, I, H]`), each projection's input at the layer's static scale.
    Served { gate_up: Tensor, down: Tensor, gate_up_input: f32, down_input: f32 },
    /// As scored: ModelOpt's fake quantization with the calibrated amax.
    AsScored(ExpertsAmax),
}

impl ServedTap {
    /// For a model loaded from the unquantized checkpoint: weights are quantized with exactly the
    /// arithmetic of the checkpoint writer (of the fake quantization for a plan as scored), once
    /// per layer, format and scale, shared through `cache` by every recipe that needs them.
    pub fn from_plan(plan: &ServedPlan, model: &Qwen3VL, cache: &mut DequantizedWeights) -> Result<Self> {
        let n = model.layers().len();
        let mut tap = ServedTap { inputs: vec![None; n], weights: vec![None; n], experts: Vec::new() };
        for l in &plan.layers {
            let Some(id) = model.layer_id(&l.name) else { bail!("the model has no layer `{}`", l.name) };
            tap.inputs[id] = InputQuant::of(l.format, l.input_scale);
            let key = (id, l.format, l.weight_scale.to_bits(), plan.as_scored);
            let weight = match cache.0.get(&key) {
                Some(w) => w.clone(),
                None => {
                    let w = model.linear(id).weight();
                    let w = match l.format {
                        ServedFormat::Nvfp4 | ServedFormat::W4a16Nvfp4 if plan.as_scored => {
                            nvfp4::fake_quant_tensor_with_global_scale(w, l.weight_scale)
                        }
                        _ => dequantized_weight(w, l.format, l.weight_scale),
                    }
                    .map_err(|e| anyhow::anyhow!("layer {}: {e}", l.name))?;
                    cache.0.insert(key, w.clone());
                    w
                }
            };
            tap.weights[id] = Some(weight);
        }
        Ok(tap)
    }

    /// For a model loaded from a quantized checkpoint (its weights already dequantized at load):
    /// only the inputs of the layers with an input quantization are quantized.
    fn from_inputs(inputs: Vec<Option<InputQuant>>) -> Self {
        let n = inputs.len();
        ServedTap { inputs, weights: vec![None; n], experts: Vec::new() }
    }

    /// Serves sparse layer `block`'s experts in FP8 with these input amax (gate_up's, down's;
    /// each expert's weight amax is its own, from the model), as the checkpoint `quantize` writes
    /// computes them, or, `as_scored`, as ModelOpt's fake quantization does.
    pub fn add_fp8_experts(
        &mut self,
        block: &SparseMoeBlock,
        gate_up_input_amax: f32,
        down_input_amax: f32,
        as_scored: bool,
    ) -> Result<()> {
        let mut amax = block.weight_amax()?;
        (amax.gate_up_input, amax.down_input) = (gate_up_input_amax, down_input_amax);
        let quant = if as_scored {
            ExpertsQuant::AsScored(amax)
        } else {
            let (gate_up, down) = block.expert_weights();
            let served = |w: &Tensor, amax: &[f32]| -> Result<Tensor> {
                let experts = (0..amax.len())
                    .map(|e| dequantized_weight(&w.get(e)?, ServedFormat::Fp8, ServedFormat::Fp8.weight_scale(amax[e])))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::stack(&experts, 0)?)
            };
            ExpertsQuant::Served {
                gate_up: served(gate_up, &amax.gate_up_weight)?,
                down: served(down, &amax.down_weight)?,
                gate_up_input: fp8::checkpoint_scale(gate_up_input_amax),
                down_input: fp8::checkpoint_scale(down_input_amax),
            }
        };
        self.experts.push((block.layer(), quant));
        Ok(())
    }

    /// Layers whose inputs are quantized.
    pub fn num_quantized_inputs(&self) -> usize {
        self.inputs.iter().filter(|s| s.is_some()).count()
    }
}

/// The served layers of a quantized checkpoint (a layer's format follows from the scales it
/// carries: `weight_scale_2` is NVFP4, with an `input_scale` W4A4, without W4A16; an
/// `input_scale` alone is FP8) and the tap that runs them on the model loaded from it (whose
/// weights the loader has already dequantized).
pub fn from_checkpoint(model: &Qwen3VL, ck: &Checkpoint) -> Result<(ServedPlan, ServedTap)> {
    let mut inputs = Vec::with_capacity(model.layers().len());
    let mut layers = Vec::new();
    for l in model.layers() {
        let scalar = |suffix: &str| ck.scalar_f32(&format!("{}.{suffix}", l.name));
        let input_scale = scalar("input_scale")?;
        let format = match (scalar("weight_scale_2")?, input_scale) {
            (Some(_), Some(_)) => Some(ServedFormat::Nvfp4),
            (Some(_), None) => Some(ServedFormat::W4a16Nvfp4),
            (None, Some(_)) => Some(ServedFormat::Fp8),
            (None, None) => None,
        };
        inputs.push(format.and_then(|f| InputQuant::of(f, input_scale)));
        if let Some(format) = format {
            let weight_scale = scalar(if format == ServedFormat::Fp8 { "weight_scale" } else { "weight_scale_2" })?;
            layers.push(ServedLayer {
                name: l.name.clone(),
                format,
                // The checkpoint stores scales, not the amax they came from.
                weight_amax: f32::NAN,
                weight_scale: weight_scale.unwrap_or(f32::NAN),
                input_amax: f32::NAN,
                input_scale,
            });
        }
    }
    if layers.is_empty() {
        bail!("no layer has an input_scale or weight_scale_2; is it a qsens/ModelOpt quantized checkpoint?");
    }
    Ok((ServedPlan { layers, ..ServedPlan::default() }, ServedTap::from_inputs(inputs)))
}

impl Tap for ServedTap {
    fn moe_forward(&mut self, block: &SparseMoeBlock, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some((_, quant)) = self.experts.iter().find(|(l, _)| *l == block.layer()) else { return Ok(None) };
        match quant {
            ExpertsQuant::AsScored(amax) => block.forward_quantized(x, &super::Fp8PerTensor, amax).map(Some),
            ExpertsQuant::Served { gate_up, down, gate_up_input, down_input } => block
                .forward_with(x, &|e| gate_up.get(e), &|e| down.get(e), &|t, projection| match projection {
                    Projection::GateUp => fp8::fake_quant_with_scale(t, *gate_up_input),
                    Projection::Down => fp8::fake_quant_with_scale(t, *down_input),
                })
                .map(Some),
        }
    }

    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let input = self.inputs.get(id).copied().flatten();
        let weight = self.weights.get(id).and_then(Option::as_ref);
        if input.is_none() && weight.is_none() {
            return Ok(None);
        }
        let xq = match input {
            Some(q) => q.apply(x)?,
            None => x.clone(),
        };
        linear.forward_with(&xq, weight.unwrap_or(linear.weight())).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, format: &str, w: f32, x: f32) -> RecipeLayer {
        RecipeLayer { name: name.into(), kind: LayerKind::Linear, format: format.into(), input_amax: x, weight_amax: w }
    }

    #[test]
    fn fused_layers_follow_vllm_packing() {
        assert_eq!(fused_layer_of("m.layers.0.self_attn.k_proj").as_deref(), Some("m.layers.0.self_attn.qkv_proj"));
        assert_eq!(fused_layer_of("m.layers.0.mlp.up_proj").as_deref(), Some("m.layers.0.mlp.gate_up_proj"));
        assert_eq!(fused_layer_of("m.layers.0.mlp.down_proj"), None);
        assert_eq!(fused_layer_of("m.layers.0.self_attn.o_proj"), None);
        assert_eq!(fused_layer_of("model.visual.blocks.0.attn.qkv"), None);
    }

    #[test]
    fn split_fused_layer_is_refused() {
        let layers = [
            layer("a.self_attn.q_proj", "FP8", 1.0, 1.0),
            layer("a.self_attn.k_proj", "NONE", 1.0, 1.0),
            layer("a.self_attn.v_proj", "FP8", 1.0, 1.0),
        ];
        let err = plan(&layers, true, false).unwrap_err().to_string();
        assert!(err.contains("a.self_attn.k_proj NONE"), "{err}");
        // Two quantized formats split a fused layer too.
        let mixed = [layer("a.mlp.gate_proj", "NVFP4", 1.0, 1.0), layer("a.mlp.up_proj", "FP8", 1.0, 1.0)];
        let err = plan(&mixed, true, false).unwrap_err().to_string();
        assert!(err.contains("a.mlp.gate_proj NVFP4, a.mlp.up_proj FP8"), "{err}");
        // Formats without a checkpoint encoding are named.
        assert!(plan(&[layer("x", "MXFP8", 1.0, 1.0)], true, false).unwrap_err().to_string().contains("MXFP8"));
        let awq = plan(&[layer("x", "NVFP4_AWQ_LITE_CFG", 1.0, 1.0)], true, false).unwrap_err().to_string();
        assert!(awq.contains("NVFP4_AWQ_LITE") && awq.contains("smoothing (pre_quant_scale)"), "{awq}");
        let sq = plan(&[layer("x", "INT8_SMOOTHQUANT", 1.0, 1.0)], true, false).unwrap_err().to_string();
        assert!(sq.contains("INT8_SMOOTHQUANT") && sq.contains("smoothing (pre_quant_scale)"), "{sq}");
    }

    #[test]
    fn shared_scales_are_the_largest_and_changes_are_named() {
        let layers = [
            layer("a.mlp.gate_proj", "FP8", 2.0, 3.0),
            layer("a.mlp.up_proj", "FP8", 4.0, 3.0),
            layer("a.mlp.down_proj", "FP8", 1.0, 5.0),
            layer("lm_head", "FP8", 1.0, 1.0),
        ];
        let own = plan(&layers, true, false).unwrap();
        assert_eq!(own.get("a.mlp.gate_proj").unwrap().weight_scale, 2.0 / 448.0);
        assert_eq!(own.kept, vec![("lm_head".to_string(), KeptReason::TiedLmHead)]);
        let fused = plan(&layers, true, true).unwrap();
        assert_eq!(fused.get("a.mlp.gate_proj").unwrap().weight_scale, 4.0 / 448.0);
        assert_eq!(fused.get("a.mlp.up_proj").unwrap().weight_scale, 4.0 / 448.0);
        assert_eq!(fused.get("a.mlp.down_proj").unwrap().input_scale, Some(5.0 / 448.0));
        assert_eq!(fused.fused_scale_changes, vec!["a.mlp.gate_proj".to_string()]);
        // An untied lm_head is written in FP8.
        assert!(plan(&layers, false, false).unwrap().get("lm_head").is_some());
    }

    #[test]
    fn nvfp4_shards_always_share_the_largest_amax_as_modelopt_exports_them() {
        let layers = [
            layer("a.self_attn.q_proj", "NVFP4", 2.0, 3.0),
            layer("a.self_attn.k_proj", "NVFP4", 4.0, 3.0),
            layer("a.self_attn.v_proj", "NVFP4", 1.0, 6.0),
            layer("a.mlp.gate_proj", "W4A16_NVFP4_CFG", 2.0, 3.0),
            layer("a.mlp.up_proj", "W4A16_NVFP4", 1.0, 9.0),
            layer("a.mlp.down_proj", "NVFP4_DEFAULT_CFG", 1.5, 7.0),
        ];
        let p = plan(&layers, true, false).unwrap();
        for shard in ["q_proj", "k_proj", "v_proj"] {
            let l = p.get(&format!("a.self_attn.{shard}")).unwrap();
            assert_eq!((l.weight_amax, l.input_amax), (4.0, 6.0));
            assert_eq!(l.weight_scale, nvfp4::global_scale(4.0));
            assert_eq!(l.input_scale, Some(nvfp4::global_scale(6.0)));
        }
        // Weight-only shards share the weight amax; they store no input scale.
        let up = p.get("a.mlp.up_proj").unwrap();
        assert_eq!((up.format, up.weight_amax, up.input_scale), (ServedFormat::W4a16Nvfp4, 2.0, None));
        assert_eq!(p.get("a.mlp.down_proj").unwrap().weight_scale, nvfp4::global_scale(1.5));
        assert_eq!(
            p.fused_scale_changes,
            ["a.self_attn.q_proj", "a.self_attn.k_proj", "a.self_attn.v_proj", "a.mlp.up_proj"]
        );
        assert_eq!(p.formats(), [ServedFormat::Nvfp4, ServedFormat::W4a16Nvfp4]);
    }
}
