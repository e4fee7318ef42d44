//! Models, with the hooks (taps) that scoring needs.
//!
//! A *quantizable layer* is every `Linear` of the model plus the vision patch embedding (a Conv3d
//! whose kernel equals its stride, i.e. a Linear over flattened patches). Each has a dense
//! [`LayerId`] (its index in [`LayerInfo`] order, which is HF's `named_modules()` order) and its HF
//! module name. A [`Tap`] sees every quantizable layer in the forward pass (and may replace its
//! output) and, in the backward pass, receives the layer's input, output and ∂loss/∂output.
//!
//! The backward pass is written out by hand (not candle's autograd): it computes activation
//! gradients only (no weight gradients), keeps what each block needs and nothing more, and can
//! use fused kernels in the forward. See `qwen3_vl` for the model itself.

pub mod linear;
pub mod loader;
pub mod qwen3_vl;

use candle_core::{Result, Tensor};

use qwen3_vl::moe::SparseMoeBlock;

pub use linear::Linear;

/// Dense index of a quantizable layer.
pub type LayerId = usize;

/// Which part of the model a layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tower {
    Vision,
    Text,
    LmHead,
}

impl Tower {
    pub fn as_str(self) -> &'static str {
        match self {
            Tower::Vision => "vision",
            Tower::Text => "text",
            Tower::LmHead => "lm_head",
        }
    }
}

/// What kind of module a quantizable layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    Linear,
    /// The Conv3d patch embedding, applied as a Linear over flattened `(C, T, P, P)` patches.
    PatchEmbed,
}

impl LayerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::Linear => "linear",
            LayerKind::PatchEmbed => "patch_embed",
        }
    }
}

/// Static description of one quantizable layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// HF module name, e.g. `model.visual.blocks.0.attn.qkv` or `lm_head`.
    pub name: String,
    pub tower: Tower,
    pub kind: LayerKind,
    pub in_features: usize,
    pub out_features: usize,
}

impl LayerInfo {
    /// Number of weight parameters (bias excluded), ModelOpt's cost unit.
    pub fn params(&self) -> u64 {
        (self.in_features * self.out_features) as u64
    }
}

/// Observes (and optionally alters) the quantizable layers during a pass.
///
/// All tensors handed to a tap are 2-D `[rows, features]` in the model's compute dtype and device.
pub trait Tap {
    /// Forward of layer `id` with input `x` (`[rows, in]`). Return `Some(y)` to replace the
    /// layer's output (e.g. computed with fake-quantized input and weight), `None` for the plain
    /// `linear.forward(x)`.
    fn forward(&mut self, _id: LayerId, _linear: &Linear, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Backward of layer `id`: `x` is the input it saw in the forward, `y` its plain output and
    /// `dy` = ∂loss/∂y (`[rows, out]`). Called once per layer per backward, in reverse order.
    fn backward(&mut self, _id: LayerId, _linear: &Linear, _x: &Tensor, _y: &Tensor, _dy: &Tensor) -> Result<()> {
        Ok(())
    }

    /// Forward of a sparse MoE block with input `x` `[L, hidden]`. Return `Some(y)` to replace
    /// the block's output (e.g. with its experts fake-quantized), `None` for the plain block.
    fn moe_forward(&mut self, _block: &SparseMoeBlock, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Inside a sparse MoE block's plain forward, once per expert that received tokens: `act`
    /// `[n, I]` is the input of expert `expert`'s down_proj for its `n` (token, slot) pairs,
    /// before the mixing weight (what calibrating down_proj's input quantizer needs).
    fn moe_expert_input(&mut self, _block: &SparseMoeBlock, _expert: usize, _act: &Tensor) -> Result<()> {
        Ok(())
    }

    /// Backward of a sparse MoE block (router and fused experts, which are no [`Linear`]):
    /// `x` its input, `y` its plain output, `dy` = ∂loss/∂y, each `[L, hidden]`. Called in the
    /// same reverse order as [`Tap::backward`].
    fn moe_backward(&mut self, _block: &SparseMoeBlock, _x: &Tensor, _y: &Tensor, _dy: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// A tap that does nothing: the plain model.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTap;

impl Tap for NoTap {}
