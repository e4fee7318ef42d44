//! What a served FP8 checkpoint computes: the one place that turns a recipe (a format per layer
//! and the calibrated amax) into the layers a serving engine runs in FP8, with their per-tensor
//! scales. `quantize` writes this plan; `evaluate` measures it, either from the plan itself or
//! from the checkpoint `quantize` wrote (both give the same numbers).
//!
//! Rules, from how the loaders work (docs/quantize.md names the code each comes from):
//! - Only `FP8` (E4M3, per-tensor weight scale, static per-tensor input scale) is written; every
//!   other layer stays in the checkpoint's 16/32-bit dtype.
//! - A fused layer's shards (q/k/v of one attention, gate/up of one MLP) are one matrix in the
//!   serving engine, so they must share a precision. The engine serves them with the largest of
//!   their weight scales (it requantizes the other shards to it) and the largest input scale;
//!   with `fuse_scales` the plan uses those shared scales itself, so the checkpoint holds exactly
//!   what is served.
//! - A tied `lm_head` is the token embedding: engines serve it from the embedding table, 16-bit.
//! - The patch embedding is a Conv3d: no engine loads it in FP8 (ModelOpt's exporter also writes
//!   it unquantized), so it stays 16-bit.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::fp8;
use crate::model::qwen3_vl::Qwen3VL;
use crate::model::{LayerId, LayerKind, Linear, Tap};

/// The name of the one format a checkpoint can hold besides `NONE`.
pub const FP8: &str = "FP8";

/// One layer of a recipe, as `quantize` and `evaluate` see it.
#[derive(Debug, Clone)]
pub struct RecipeLayer {
    /// HF module name.
    pub name: String,
    pub kind: LayerKind,
    /// `FP8` or `NONE` (other formats are refused).
    pub format: String,
    /// Calibrated input amax (max |x| over the calibration samples).
    pub input_amax: f32,
    /// max |W| of the weight as it will be quantized.
    pub weight_amax: f32,
}

/// A layer stored in FP8.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Layer {
    pub name: String,
    /// `amax_w / 448` (with `fuse_scales`, the largest over the fused layer's shards).
    pub weight_scale: f32,
    /// `amax_in / 448`, likewise.
    pub input_scale: f32,
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
                "the patch embedding is a Conv3d, which no serving engine loads in FP8 (ModelOpt's exporter \
                 also writes it unquantized): kept 16-bit"
            }
        }
    }
}

/// The layers a served checkpoint runs in FP8.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServedPlan {
    /// In recipe (model) order.
    pub fp8: Vec<Fp8Layer>,
    /// Layers the recipe quantizes that stay 16-bit.
    pub kept: Vec<(String, KeptReason)>,
    /// Shards whose weight scale the shared fused scale changed (`fuse_scales` only).
    pub fused_scale_changes: Vec<String>,
}

impl ServedPlan {
    pub fn get(&self, name: &str) -> Option<&Fp8Layer> {
        self.fp8.iter().find(|l| l.name == name)
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

fn is_fp8(format: &str) -> Result<bool> {
    match format.to_ascii_uppercase().as_str() {
        "FP8" | "FP8_DEFAULT_CFG" => Ok(true),
        "NONE" => Ok(false),
        other => bail!("format '{other}' cannot be written to a checkpoint yet (FP8 and NONE can)"),
    }
}

/// The served plan of a recipe. `tied_lm_head`: the model's lm_head is its token embedding.
/// Errors name the fused layers whose shards the recipe splits.
pub fn plan(layers: &[RecipeLayer], tied_lm_head: bool, fuse_scales: bool) -> Result<ServedPlan> {
    let mut chosen = Vec::with_capacity(layers.len());
    for l in layers {
        chosen.push(is_fp8(&l.format).map_err(|e| anyhow::anyhow!("layer {}: {e}", l.name))?);
    }
    // Shards of one fused layer must share a precision.
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
        .filter(|(_, m)| m.iter().any(|&i| chosen[i]) && !m.iter().all(|&i| chosen[i]))
        .map(|(_, m)| {
            m.iter()
                .map(|&i| format!("{} {}", layers[i].name, if chosen[i] { "FP8" } else { "NONE" }))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect();
    if !split.is_empty() {
        bail!(
            "the recipe splits {} fused layer(s) that serving engines run as one matrix, so their shards must \
             share a precision: {}",
            split.len(),
            split.join("; ")
        );
    }

    let mut plan = ServedPlan::default();
    for (i, l) in layers.iter().enumerate() {
        if !chosen[i] {
            continue;
        }
        if l.kind == LayerKind::PatchEmbed {
            plan.kept.push((l.name.clone(), KeptReason::PatchEmbed));
            continue;
        }
        if l.name == "lm_head" && tied_lm_head {
            plan.kept.push((l.name.clone(), KeptReason::TiedLmHead));
            continue;
        }
        let (mut weight_amax, mut input_amax) = (l.weight_amax, l.input_amax);
        if fuse_scales {
            if let Some(key) = fused_layer_of(&l.name) {
                let (_, members) = fused.iter().find(|(k, _)| *k == key).expect("grouped above");
                weight_amax = members.iter().map(|&m| layers[m].weight_amax).fold(f32::MIN, f32::max);
                input_amax = members.iter().map(|&m| layers[m].input_amax).fold(f32::MIN, f32::max);
                if weight_amax != l.weight_amax {
                    plan.fused_scale_changes.push(l.name.clone());
                }
            }
        }
        plan.fp8.push(Fp8Layer {
            name: l.name.clone(),
            weight_scale: fp8::checkpoint_scale(weight_amax),
            input_scale: fp8::checkpoint_scale(input_amax),
        });
    }
    Ok(plan)
}

/// Dequantized FP8 weights by layer and weight scale, shared by the taps of several recipes.
#[derive(Debug, Default)]
pub struct DequantizedWeights(std::collections::HashMap<(LayerId, u32), Tensor>);

/// Runs a model as the served checkpoint computes it: the FP8 layers' inputs quantized with their
/// static scale, their weights dequantized from E4M3.
#[derive(Debug, Default)]
pub struct ServedTap {
    /// Per layer id: the static input scale of an FP8 layer.
    input_scales: Vec<Option<f32>>,
    /// Per layer id: the dequantized weight, when the model holds the unquantized one.
    weights: Vec<Option<Tensor>>,
}

impl ServedTap {
    /// For a model loaded from the unquantized checkpoint: weights are fake-quantized with exactly
    /// the arithmetic of the checkpoint writer (once per layer and scale, shared through `cache`
    /// by every recipe that needs them).
    pub fn from_plan(plan: &ServedPlan, model: &Qwen3VL, cache: &mut DequantizedWeights) -> Result<Self> {
        let n = model.layers().len();
        let mut tap = ServedTap { input_scales: vec![None; n], weights: vec![None; n] };
        for l in &plan.fp8 {
            let Some(id) = model.layer_id(&l.name) else { bail!("the model has no layer `{}`", l.name) };
            tap.input_scales[id] = Some(l.input_scale);
            let weight = match cache.0.get(&(id, l.weight_scale.to_bits())) {
                Some(w) => w.clone(),
                None => {
                    let w = fp8::fake_quant_with_scale(model.linear(id).weight(), l.weight_scale)?;
                    cache.0.insert((id, l.weight_scale.to_bits()), w.clone());
                    w
                }
            };
            tap.weights[id] = Some(weight);
        }
        Ok(tap)
    }

    /// For a model loaded from a quantized checkpoint (its FP8 weights already dequantized at
    /// load): only the inputs of the layers with an `input_scale` are quantized.
    pub fn from_input_scales(input_scales: Vec<Option<f32>>) -> Self {
        let n = input_scales.len();
        ServedTap { input_scales, weights: vec![None; n] }
    }

    /// Layers run in FP8.
    pub fn num_quantized(&self) -> usize {
        self.input_scales.iter().filter(|s| s.is_some()).count()
    }
}

impl Tap for ServedTap {
    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(scale) = self.input_scales.get(id).copied().flatten() else { return Ok(None) };
        let xq = fp8::fake_quant_with_scale(x, scale)?;
        let w = self.weights[id].as_ref().unwrap_or(linear.weight());
        linear.forward_with(&xq, w).map(Some)
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
        assert!(plan(&[layer("x", "NVFP4", 1.0, 1.0)], true, false).unwrap_err().to_string().contains("NVFP4"));
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
        assert_eq!(fused.get("a.mlp.down_proj").unwrap().input_scale, 5.0 / 448.0);
        assert_eq!(fused.fused_scale_changes, vec!["a.mlp.gate_proj".to_string()]);
        // An untied lm_head is written in FP8.
        assert!(plan(&layers, false, false).unwrap().get("lm_head").is_some());
    }
}
