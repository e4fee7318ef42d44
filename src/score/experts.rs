//! The routed experts of a mixture-of-experts checkpoint (`qwen3_vl_moe`) in `score-layers`, as
//! ModelOpt 0.47's auto_quantize treats them (docs/moe.md): all experts of one sparse layer are
//! one layer of kind `experts` and one group; they are calibrated on the block's input (one input
//! amax per projection, one weight amax per expert) and scored on the block's output, with the
//! router never quantized.

use anyhow::{ensure, Result};
use candle_core::Tensor;

use crate::artifact::scores::{ExpertsCalibration, LayerScores};
use crate::model::qwen3_vl::moe::{ExpertsAmax, SparseMoeBlock};
use crate::model::qwen3_vl::Qwen3VL;
use crate::model::{LayerId, Linear, Tap};
use crate::quant::{fp8, sensitivity, Format};

/// The HF module name of decoder layer `layer`'s experts (ModelOpt's group and module name).
pub fn experts_name(layer: usize) -> String {
    format!("model.language_model.layers.{layer}.mlp.experts")
}

/// One sparse layer's experts in a run: where they sit in the model and in the scores artifact.
#[derive(Debug, Clone)]
pub struct ExpertsSlot {
    /// Decoder layer index.
    pub layer: usize,
    /// Index in `Scores::layers` (after the model's Linear layers).
    pub entry: usize,
    /// Index in `Scores::groups`.
    pub group: usize,
    /// The decoder layer's first Linear: a kl_div re-forward of the experts resumes there.
    pub resume_from: LayerId,
    /// Kept unquantized (`--disable`): not scored.
    pub disabled: bool,
}

/// The sparse layers of `model`, in layer order, as (decoder layer, block).
pub fn blocks(model: &Qwen3VL) -> Vec<(usize, &SparseMoeBlock)> {
    (0..model.config().text_config.num_hidden_layers).filter_map(|i| model.moe_block(i).map(|b| (i, b))).collect()
}

/// The scores-artifact record of a calibration.
pub fn record(block: &SparseMoeBlock, amax: &ExpertsAmax) -> ExpertsCalibration {
    let shape = block.shape();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect();
    ExpertsCalibration {
        num_experts: shape.experts,
        top_k: shape.top_k,
        down_input_amax: amax.down_input as f64,
        gate_up_weight_amax: f64s(&amax.gate_up_weight),
        down_weight_amax: f64s(&amax.down_weight),
        tokens_routed: amax.tokens_routed.clone(),
    }
}

/// The calibration a scores-artifact entry holds (amax are f32 values stored as f64: exact).
pub fn amax_of(entry: &LayerScores) -> Result<ExpertsAmax> {
    let c =
        entry.experts.as_ref().ok_or_else(|| anyhow::anyhow!("layer '{}' has no experts calibration", entry.name))?;
    ensure!(
        c.gate_up_weight_amax.len() == c.num_experts
            && c.down_weight_amax.len() == c.num_experts
            && c.tokens_routed.len() == c.num_experts,
        "layer '{}': experts calibration does not have one entry per expert ({})",
        entry.name,
        c.num_experts
    );
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
    Ok(ExpertsAmax {
        gate_up_input: entry.input_amax as f32,
        down_input: c.down_input_amax as f32,
        gate_up_weight: f32s(&c.gate_up_weight_amax),
        down_weight: f32s(&c.down_weight_amax),
        tokens_routed: c.tokens_routed.clone(),
    })
}

/// Calibration: passes the Linear layers to `inner` and folds each sparse block's input (gate_up's
/// input quantizer) and each expert's down_proj input (down's) into the layer's input amax, inside
/// the plain forward, quantization off. The amax stay on the device until [`CalibrationTap::finish`].
pub struct CalibrationTap<'a> {
    inner: &'a mut dyn Tap,
    /// Decoder layer of each sparse layer, in `blocks` order.
    layers: Vec<usize>,
    /// f32 `[2 · sparse layers]`: gate_up's then down's input amax of each sparse layer.
    input_amax: Tensor,
    /// Per sparse layer: weight amax and tokens routed (input amax filled in by `finish`).
    amax: Vec<ExpertsAmax>,
}

impl<'a> CalibrationTap<'a> {
    /// Every expert gets its weight amax before any token is seen, as in ModelOpt.
    pub fn new(
        inner: &'a mut dyn Tap,
        blocks: &[(usize, &SparseMoeBlock)],
        device: &candle_core::Device,
    ) -> Result<Self> {
        Ok(CalibrationTap {
            inner,
            layers: blocks.iter().map(|(l, _)| *l).collect(),
            input_amax: Tensor::zeros(2 * blocks.len(), candle_core::DType::F32, device)?,
            amax: blocks.iter().map(|(_, b)| b.weight_amax()).collect::<candle_core::Result<_>>()?,
        })
    }

    /// The calibration of every sparse layer, as (decoder layer, amax), in `blocks` order.
    pub fn finish(self) -> Result<Vec<(usize, ExpertsAmax)>> {
        let input_amax = self.input_amax.to_vec1::<f32>()?;
        Ok(self
            .layers
            .into_iter()
            .zip(self.amax)
            .enumerate()
            .map(|(slot, (layer, mut amax))| {
                (amax.gate_up_input, amax.down_input) = (input_amax[2 * slot], input_amax[2 * slot + 1]);
                (layer, amax)
            })
            .collect())
    }

    fn slot(&self, block: &SparseMoeBlock) -> Option<usize> {
        self.layers.iter().position(|&l| l == block.layer())
    }
}

impl Tap for CalibrationTap<'_> {
    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.inner.forward(id, linear, x)
    }
    fn moe_forward(&mut self, block: &SparseMoeBlock, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let Some(slot) = self.slot(block) {
            fp8::update_amax(&self.input_amax, 2 * slot, x)?;
        }
        Ok(None)
    }
    fn moe_expert_input(&mut self, block: &SparseMoeBlock, expert: usize, act: &Tensor) -> candle_core::Result<()> {
        if let Some(slot) = self.slot(block) {
            fp8::update_amax(&self.input_amax, 2 * slot + 1, act)?;
            self.amax[slot].tokens_routed[expert] += act.dim(0)? as u64;
        }
        Ok(())
    }
}

/// Gradient method: passes the Linear layers' backward to `inner` and scores each sparse layer's
/// experts per format as ModelOpt does, `Σ (∂L/∂Y ⊙ (Y_q − Y))²` on the block output `Y` (already
/// routing-weighted) with only that block's experts fake-quantized.
pub struct GradientTap<'a> {
    pub inner: &'a mut dyn Tap,
    pub formats: &'a [Box<dyn Format>],
    /// Per sparse layer: (decoder layer, calibration, scored): unscored layers (a disabled group)
    /// keep zeros.
    pub amax: &'a [(usize, ExpertsAmax, bool)],
    /// Per sparse layer (as `amax`), per format: this sample's score, an f32 scalar on the device.
    pub scores: Vec<Vec<Tensor>>,
}

impl Tap for GradientTap<'_> {
    fn backward(
        &mut self,
        id: LayerId,
        linear: &Linear,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<()> {
        self.inner.backward(id, linear, x, y, dy)
    }
    fn moe_backward(&mut self, block: &SparseMoeBlock, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<()> {
        let Some(slot) = self.amax.iter().position(|(l, _, _)| *l == block.layer()) else {
            return Ok(());
        };
        let (_, amax, scored) = &self.amax[slot];
        if !scored {
            return Ok(());
        }
        let mut per_format = Vec::with_capacity(self.formats.len());
        for format in self.formats {
            let yq = block.forward_quantized(x, format.as_ref(), amax)?;
            per_format.push(sensitivity::gradient_score(dy, y, &yq)?);
        }
        self.scores[slot] = per_format;
        Ok(())
    }
}

/// kl_div method: the model with one sparse layer's experts fake-quantized in one format.
pub struct QuantizeExpertsTap<'a> {
    pub layer: usize,
    pub format: &'a dyn Format,
    pub amax: &'a ExpertsAmax,
}

impl Tap for QuantizeExpertsTap<'_> {
    fn moe_forward(&mut self, block: &SparseMoeBlock, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if block.layer() != self.layer {
            return Ok(None);
        }
        block.forward_quantized(x, self.format, self.amax).map(Some)
    }
}
