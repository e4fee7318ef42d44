//! Qwen3-VL (HF `modeling_qwen3_vl.py`, `Qwen3VLForConditionalGeneration`) with every quantizable
//! layer behind a [`Tap`], a hand-written backward (activation gradients only) and a resumable
//! forward.
//!
//! - [`Qwen3VL::forward`] runs vision tower → merged image embeddings scattered into the
//!   `<|image_pad|>` rows → decoder (deepstack features added after the first layers) → final norm →
//!   `lm_head` → causal-LM loss (f32 logits, shift by one, mean CE over labels ≠ −100).
//! - [`Qwen3VL::backward`] walks the same graph in reverse from the loss and hands every layer's
//!   input, plain output and ∂loss/∂output to the tap.
//! - [`Qwen3VL::forward_from`] recomputes only what depends on a given layer, from the activations
//!   a [`Keep::Resume`] forward cached.
//!
//! The mixture-of-experts model (`qwen3_vl_moe`, e.g. Qwen3-VL-30B-A3B; HF
//! `modeling_qwen3_vl_moe.py`) is the same graph with sparse MoE blocks ([`moe`]) in place of the
//! MLP of its sparse layers and an untied `lm_head`.
//!
//! Numerics follow HF's dtype handling: norms, softmax and the loss in f32 (f64 for an f64 model),
//! text cos/sin cast to the model dtype, vision q/k rotated in f32.

pub mod config;
pub mod fused;
#[cfg(feature = "cuda")]
mod fused_cuda;
pub mod moe;
pub mod ops;
pub mod rope;
pub mod text;
pub mod vision;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{bail, DType, Device, Result, Tensor};

pub use config::{Config, TextConfig, VisionConfig};

use crate::model::loader::Checkpoint;
use crate::model::{LayerId, LayerInfo, LayerKind, Linear, NoTap, Tap, Tower};
use moe::SparseMoeBlock;
use ops::{acc_dtype, cross_entropy, cross_entropy_backward, CausalMask, LayerNorm, RmsNorm};
use rope::CosSin;
use text::{DecoderLayer, DecoderLayerSaved, Mlp, TextModel, TextSample};
use vision::{MergerSaved, PatchMerger, VisionBlock, VisionModel, VisionSample};

/// Label value that HF's loss ignores.
pub const IGNORE_INDEX: i32 = -100;
/// LayerNorm epsilon of the vision tower (hard-coded in HF).
const VISION_LN_EPS: f64 = 1e-6;

/// One sample, or several packed one after another ([`Input::pack`]).
#[derive(Debug, Clone)]
pub struct Input {
    pub input_ids: Vec<u32>,
    /// MRoPE (t, h, w) positions, each of length L (HF `get_rope_index`).
    pub position_ids: [Vec<i64>; 3],
    /// Per position; −100 = ignored. HF shifts: row t−1 predicts `labels[t]`.
    pub labels: Option<Vec<i32>>,
    /// `[N, C·T·P·P]` f32 on any device (the model casts and moves it).
    pub pixel_values: Tensor,
    pub grid_thw: Vec<[u32; 3]>,
    /// The token counts of the samples packed into this input, in order; empty for one sample.
    pub packed: Vec<usize>,
}

impl Input {
    /// Several samples as one input: tokens, positions, labels, images and pixel rows one
    /// sample after another. The model keeps them apart: each sample's tokens attend only to
    /// its own (as its images' patches already do), each sample's first label is ignored as
    /// HF's shift ignores it, and the loss is the sum of the samples' mean losses, so every
    /// sample's gradients are those of its own forward.
    pub fn pack(samples: &[Input]) -> Result<Input> {
        match samples {
            [] => bail!("no samples to pack"),
            [one] => return Ok(one.clone()),
            _ => {}
        }
        if samples.iter().any(|s| !s.packed.is_empty()) {
            bail!("an input that is already packed cannot be packed again")
        }
        let with_labels = samples.iter().filter(|s| s.labels.is_some()).count();
        if with_labels != 0 && with_labels != samples.len() {
            bail!("cannot pack samples with labels together with samples without")
        }
        let mut input_ids = Vec::new();
        let mut position_ids: [Vec<i64>; 3] = Default::default();
        let mut labels = (with_labels > 0).then(Vec::new);
        let mut pixels = Vec::new();
        let mut grid_thw = Vec::new();
        let mut packed = Vec::new();
        for s in samples {
            input_ids.extend_from_slice(&s.input_ids);
            for (all, p) in position_ids.iter_mut().zip(&s.position_ids) {
                all.extend_from_slice(p);
            }
            if let (Some(all), Some(l)) = (labels.as_mut(), s.labels.as_ref()) {
                all.extend_from_slice(l);
            }
            if s.pixel_values.dim(0)? > 0 {
                pixels.push(s.pixel_values.to_device(&Device::Cpu)?);
            }
            grid_thw.extend_from_slice(&s.grid_thw);
            packed.push(s.input_ids.len());
        }
        let width = samples[0].pixel_values.dim(1)?;
        let pixel_values = match pixels.len() {
            0 => Tensor::zeros((0, width), DType::F32, &Device::Cpu)?,
            _ => Tensor::cat(&pixels, 0)?,
        };
        Ok(Input { input_ids, position_ids, labels, pixel_values, grid_thw, packed })
    }

    /// `(start, len)` of each packed sample's tokens (one segment for a single sample).
    pub fn segments(&self) -> Vec<(usize, usize)> {
        if self.packed.is_empty() {
            return vec![(0, self.input_ids.len())];
        }
        let mut start = 0;
        self.packed
            .iter()
            .map(|&len| {
                start += len;
                (start - len, len)
            })
            .collect()
    }
}

/// Which rows of the logits a forward computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// No logits (and no loss). `lm_head`'s tap still sees every row of the final hidden state.
    None,
    /// Only rows `t−1` with `labels[t] ≠ −100`, in order (all the loss and its gradient need).
    LabelPositions,
    /// Every position.
    All,
}

/// What a forward keeps after it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Nothing,
    /// Everything [`Qwen3VL::backward`] needs (needs labels and logits covering them).
    Backward,
    /// The activations [`Qwen3VL::forward_from`] restarts from.
    Resume,
}

#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    pub logits: LogitsMode,
    pub keep: Keep,
    /// Record named intermediates (see [`Forward::trace`]).
    pub trace: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Nothing, trace: false }
    }
}

/// The result of a forward pass.
pub struct Forward {
    /// Mean causal-LM loss, when labels were given and logits cover them (packed samples: the
    /// sum of the samples' mean losses).
    pub loss: Option<f32>,
    /// Each packed sample's mean loss, `None` for a sample without label tokens (the one loss
    /// for an input that is not packed; empty without a loss).
    pub sample_losses: Vec<Option<f32>>,
    /// f32 logits (f64 for an f64 model): `[L, vocab]` for [`LogitsMode::All`], `[n_labels, vocab]`
    /// for [`LogitsMode::LabelPositions`].
    pub logits: Option<Tensor>,
    /// With `trace`: `vision_patch_embed`, `vision_block_in_0`, `vision_block_out_{i}`,
    /// `vision_last_hidden`, `image_embeds`, `deepstack_{k}`, `text_layer_in_{i}`,
    /// `text_final_norm_in`, `text_final_hidden`, `mlp_in_{i}`, `mlp_out_{i}`, and for a sparse
    /// layer `router_logits_{i}`, `router_topk_ids_{i}` (u32), `router_topk_weights_{i}` (2-D,
    /// model dtype; HF names of the reference files).
    pub trace: BTreeMap<String, Tensor>,
    loss_t: Option<Tensor>,
    sample: Option<Sample>,
    bwd: Option<BackwardCache>,
    resume: Option<ResumeCache>,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("loss", &self.loss)
            .field("logits", &self.logits.as_ref().map(|l| l.shape().clone()))
            .field("trace", &self.trace.keys().collect::<Vec<_>>())
            .field("backward", &self.bwd.is_some())
            .field("resume", &self.resume.is_some())
            .finish()
    }
}

impl Forward {
    /// The loss as a 0-d tensor in the accumulation dtype (f64 for an f64 model: finite differences
    /// need more than the f32 of [`Forward::loss`]).
    pub fn loss_tensor(&self) -> Option<&Tensor> {
        self.loss_t.as_ref()
    }
}

/// The model's quantizable layers: weights and static descriptions, indexed by [`LayerId`].
#[derive(Debug, Default)]
pub struct Registry {
    linears: Vec<Linear>,
    infos: Vec<LayerInfo>,
}

impl Registry {
    pub fn linear(&self, id: LayerId) -> &Linear {
        &self.linears[id]
    }

    fn push(&mut self, info: LayerInfo, linear: Linear) -> LayerId {
        self.infos.push(info);
        self.linears.push(linear);
        self.infos.len() - 1
    }
}

/// Runs layer `id` on `x` through the tap. Returns `(used, plain)`: the output the model goes on
/// with (the tap's, if it replaced it) and, when `keep_plain`, the plain `linear.forward(x)`.
pub(crate) fn tapped(
    reg: &Registry,
    id: LayerId,
    x: &Tensor,
    tap: &mut dyn Tap,
    keep_plain: bool,
) -> Result<(Tensor, Tensor)> {
    let lin = reg.linear(id);
    match tap.forward(id, lin, x)? {
        None => {
            let y = lin.forward(x)?;
            Ok((y.clone(), y))
        }
        Some(y) => {
            let plain = if keep_plain { lin.forward(x)? } else { y.clone() };
            Ok((y, plain))
        }
    }
}

/// Where [`Qwen3VL::forward_from`] restarts for a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    PatchEmbed,
    VisionBlock(usize),
    Merger,
    Deepstack(usize),
    TextLayer(usize),
    LmHead,
}

/// Per-sample tensors shared by the whole pass (and by backward / resume).
struct Sample {
    len: usize,
    input_ids: Tensor,
    text_rope: CosSin,
    mask: CausalMask,
    /// Rows of the `<|image_pad|>` tokens, u32 `[T]`.
    vis_idx: Option<Tensor>,
    /// Row map into `cat(token_embeds, image_embeds)` building the decoder input, u32 `[L]`.
    gather: Option<Tensor>,
    /// Shifted label rows (u32 `[n]`) and their targets (u32 `[n]`).
    labels: Option<(Tensor, Tensor)>,
    /// Packed samples only: each label row's weight in the loss, `1 / (its sample's labels)`
    /// (acc `[n]`), so that the loss is the sum of the samples' mean losses.
    label_weights: Option<Tensor>,
    vision: Option<VisionSample>,
    /// Which rows belong to which packed sample.
    rows: PackedRows,
}

/// Which rows of the activations belong to which packed sample, as `(start, len)` per sample
/// (one entry for an input that is not packed).
#[derive(Debug, Clone, Default)]
pub struct PackedRows {
    /// Vision patches: the patch embedding and the vision blocks.
    pub patches: Vec<(usize, usize)>,
    /// Merged patches: the merger and the deepstack mergers.
    pub merged: Vec<(usize, usize)>,
    /// Tokens: the decoder layers, and `lm_head` when it computes every position.
    pub tokens: Vec<(usize, usize)>,
    /// Label rows: `lm_head` when it computes the label positions only.
    pub labels: Vec<(usize, usize)>,
}

/// `(start, len)` of consecutive parts of the given lengths.
fn consecutive(lens: impl IntoIterator<Item = usize>) -> Vec<(usize, usize)> {
    let mut start = 0;
    lens.into_iter()
        .map(|len| {
            start += len;
            (start - len, len)
        })
        .collect()
}

struct HeadSaved {
    /// lm_head input rows and plain output (model dtype).
    x: Tensor,
    y: Tensor,
    /// Logits of the label rows (acc dtype) and their log-sum-exp.
    label_logits: Tensor,
    lse: Tensor,
    /// Whether `x`/`y` cover all L rows (LogitsMode::All) or only the label rows.
    all_rows: bool,
}

struct BackwardCache {
    patch_y: Option<Tensor>,
    /// The input of every vision block: the backward recomputes a block's activations from it
    /// rather than keeping them all (about 0.9 GiB for one 448×448 image on the 30B-A3B).
    block_inputs: Vec<Tensor>,
    merger: Option<MergerSaved>,
    deepstack: Vec<Option<MergerSaved>>,
    layers: Vec<DecoderLayerSaved>,
    final_in: Tensor,
    final_rstd: Tensor,
    head: HeadSaved,
}

#[derive(Default)]
struct ResumeCache {
    /// Inputs of vision blocks 0..depth, then the last block's output (merger input).
    vision_h: Vec<Tensor>,
    deepstack: Vec<Tensor>,
    /// Inputs of text layers 0..n, then the final norm input.
    text_h: Vec<Tensor>,
    /// Output of text layer k before deepstack feature k is added.
    text_pre_ds: Vec<Tensor>,
    final_hidden: Option<Tensor>,
}

/// Every quantizable layer a config implies, in HF `named_modules()` order. The router and experts
/// of a sparse MoE layer are not among them (they are no `Linear`; see [`moe`]).
pub fn expected_layers(cfg: &Config) -> Vec<LayerInfo> {
    let v = &cfg.vision_config;
    let t = &cfg.text_config;
    let mut out = Vec::new();
    let mut push =
        |name: String, tower, kind, i, o| out.push(LayerInfo { name, tower, kind, in_features: i, out_features: o });
    let (vd, md) = (v.hidden_size, v.merged_dim());
    push("model.visual.patch_embed.proj".into(), Tower::Vision, LayerKind::PatchEmbed, v.patch_dim(), vd);
    for i in 0..v.depth {
        let p = format!("model.visual.blocks.{i}");
        push(format!("{p}.attn.qkv"), Tower::Vision, LayerKind::Linear, vd, 3 * vd);
        push(format!("{p}.attn.proj"), Tower::Vision, LayerKind::Linear, vd, vd);
        push(format!("{p}.mlp.linear_fc1"), Tower::Vision, LayerKind::Linear, vd, v.intermediate_size);
        push(format!("{p}.mlp.linear_fc2"), Tower::Vision, LayerKind::Linear, v.intermediate_size, vd);
    }
    let mut merger = |p: String| {
        push(format!("{p}.linear_fc1"), Tower::Vision, LayerKind::Linear, md, md);
        push(format!("{p}.linear_fc2"), Tower::Vision, LayerKind::Linear, md, v.out_hidden_size);
    };
    merger("model.visual.merger".into());
    for k in 0..v.deepstack_visual_indexes.len() {
        merger(format!("model.visual.deepstack_merger_list.{k}"));
    }
    let (d, hd) = (t.hidden_size, t.head_dim());
    let (qd, kvd) = (t.num_attention_heads * hd, t.num_key_value_heads() * hd);
    for i in 0..t.num_hidden_layers {
        let p = format!("model.language_model.layers.{i}");
        push(format!("{p}.self_attn.q_proj"), Tower::Text, LayerKind::Linear, d, qd);
        push(format!("{p}.self_attn.k_proj"), Tower::Text, LayerKind::Linear, d, kvd);
        push(format!("{p}.self_attn.v_proj"), Tower::Text, LayerKind::Linear, d, kvd);
        push(format!("{p}.self_attn.o_proj"), Tower::Text, LayerKind::Linear, qd, d);
        if cfg.moe_layer(i).is_some() {
            continue;
        }
        push(format!("{p}.mlp.gate_proj"), Tower::Text, LayerKind::Linear, d, t.intermediate_size);
        push(format!("{p}.mlp.up_proj"), Tower::Text, LayerKind::Linear, d, t.intermediate_size);
        push(format!("{p}.mlp.down_proj"), Tower::Text, LayerKind::Linear, t.intermediate_size, d);
    }
    push("lm_head".into(), Tower::LmHead, LayerKind::Linear, d, t.vocab_size);
    out
}

/// Reads weights by HF name, counting parameters.
struct WeightReader<'a> {
    ck: &'a Checkpoint,
    dtype: DType,
    device: &'a Device,
    params: u64,
}

impl WeightReader<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.ck.get(name, shape, self.dtype, self.device)?;
        self.params += t.elem_count() as u64;
        Ok(t)
    }

    fn layer_norm(&mut self, p: &str, dim: usize) -> Result<LayerNorm> {
        Ok(LayerNorm::new(
            self.get(&format!("{p}.weight"), &[dim])?,
            self.get(&format!("{p}.bias"), &[dim])?,
            VISION_LN_EPS,
        ))
    }

    fn rms_norm(&mut self, p: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.get(&format!("{p}.weight"), &[dim])?, eps))
    }

    /// Linear `p` (`p.weight` `[out, in]`, `p.bias` if `bias`) registered as the next layer.
    fn linear(&mut self, reg: &mut Registry, p: &str, tower: Tower, i: usize, o: usize, bias: bool) -> Result<LayerId> {
        let w = self.get(&format!("{p}.weight"), &[o, i])?;
        let b = if bias { Some(self.get(&format!("{p}.bias"), &[o])?) } else { None };
        let info = LayerInfo { name: p.to_string(), tower, kind: LayerKind::Linear, in_features: i, out_features: o };
        Ok(reg.push(info, Linear::new(w, b)))
    }
}

/// Qwen3-VL for conditional generation.
pub struct Qwen3VL {
    cfg: Config,
    dtype: DType,
    device: Device,
    reg: Registry,
    vision: VisionModel,
    text: TextModel,
    lm_head: LayerId,
    params: u64,
    starts: Vec<Start>,
}

impl std::fmt::Debug for Qwen3VL {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qwen3VL")
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("layers", &self.reg.infos.len())
            .field("params", &self.params)
            .finish()
    }
}

impl Qwen3VL {
    /// Loads `dir/config.json` and the (single or sharded) safetensors checkpoint, cast to `dtype`
    /// (F32, BF16, F16; F64 on CPU) on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        use anyhow::Context;
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
        let cfg = Config::from_json_str(&text).with_context(|| format!("parsing {}", cfg_path.display()))?;
        if let Err(e) = cfg.validate() {
            anyhow::bail!("{}: unsupported configuration: {e}", cfg_path.display());
        }
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
            anyhow::bail!("unsupported model dtype {dtype:?} (F32, BF16, F16 or F64)");
        }
        let ck = Checkpoint::open(dir).with_context(|| format!("opening checkpoint in {}", dir.display()))?;
        Self::from_checkpoint(cfg, &ck, dtype, device).with_context(|| format!("loading {}", dir.display()))
    }

    fn from_checkpoint(cfg: Config, ck: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let mut wr = WeightReader { ck, dtype, device, params: 0 };
        let mut reg = Registry::default();
        let mut starts = Vec::new();
        let v = &cfg.vision_config;
        let t = &cfg.text_config;

        // Vision tower
        let (vd, md) = (v.hidden_size, v.merged_dim());
        let pw = wr.get(
            "model.visual.patch_embed.proj.weight",
            &[vd, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size],
        )?;
        let pb = wr.get("model.visual.patch_embed.proj.bias", &[vd])?;
        let patch_embed = reg.push(
            LayerInfo {
                name: "model.visual.patch_embed.proj".into(),
                tower: Tower::Vision,
                kind: LayerKind::PatchEmbed,
                in_features: v.patch_dim(),
                out_features: vd,
            },
            // Conv3d with kernel = stride over (C, T, P, P) = a Linear over flattened patches.
            Linear::new(pw.reshape((vd, v.patch_dim()))?, Some(pb)).with_checkpoint_shape(pw.dims()),
        );
        starts.push(Start::PatchEmbed);
        let pos_embed = wr.get("model.visual.pos_embed.weight", &[v.num_position_embeddings, vd])?;
        let mut blocks = Vec::with_capacity(v.depth);
        for i in 0..v.depth {
            let p = format!("model.visual.blocks.{i}");
            let norm1 = wr.layer_norm(&format!("{p}.norm1"), vd)?;
            let norm2 = wr.layer_norm(&format!("{p}.norm2"), vd)?;
            let qkv = wr.linear(&mut reg, &format!("{p}.attn.qkv"), Tower::Vision, vd, 3 * vd, true)?;
            let proj = wr.linear(&mut reg, &format!("{p}.attn.proj"), Tower::Vision, vd, vd, true)?;
            let fc1 =
                wr.linear(&mut reg, &format!("{p}.mlp.linear_fc1"), Tower::Vision, vd, v.intermediate_size, true)?;
            let fc2 =
                wr.linear(&mut reg, &format!("{p}.mlp.linear_fc2"), Tower::Vision, v.intermediate_size, vd, true)?;
            starts.extend([Start::VisionBlock(i); 4]);
            blocks.push(VisionBlock { norm1, norm2, qkv, proj, fc1, fc2, heads: v.num_heads, head_dim: v.head_dim() });
        }
        let merger = |wr: &mut WeightReader, reg: &mut Registry, p: &str, postshuffle: bool| -> Result<PatchMerger> {
            let norm = wr.layer_norm(&format!("{p}.norm"), if postshuffle { md } else { vd })?;
            let fc1 = wr.linear(reg, &format!("{p}.linear_fc1"), Tower::Vision, md, md, true)?;
            let fc2 = wr.linear(reg, &format!("{p}.linear_fc2"), Tower::Vision, md, v.out_hidden_size, true)?;
            Ok(PatchMerger { norm, fc1, fc2, postshuffle, merged_dim: md })
        };
        let main_merger = merger(&mut wr, &mut reg, "model.visual.merger", false)?;
        starts.extend([Start::Merger; 2]);
        let mut deepstack = Vec::new();
        for k in 0..v.deepstack_visual_indexes.len() {
            deepstack.push(merger(&mut wr, &mut reg, &format!("model.visual.deepstack_merger_list.{k}"), true)?);
            starts.extend([Start::Deepstack(k); 2]);
        }
        let vision = VisionModel {
            patch_embed,
            pos_embed,
            side: v.num_grid_per_side(),
            blocks,
            merger: main_merger,
            deepstack,
            deepstack_index: v.deepstack_visual_indexes.clone(),
            merge: v.spatial_merge_size,
            head_dim: v.head_dim(),
        };

        // Text model
        let (d, hd) = (t.hidden_size, t.head_dim());
        let (h, hkv) = (t.num_attention_heads, t.num_key_value_heads());
        let embed_tokens = wr.get("model.language_model.embed_tokens.weight", &[t.vocab_size, d])?;
        let mut layers = Vec::with_capacity(t.num_hidden_layers);
        for i in 0..t.num_hidden_layers {
            let p = format!("model.language_model.layers.{i}");
            let ab = t.attention_bias;
            let q_proj = wr.linear(&mut reg, &format!("{p}.self_attn.q_proj"), Tower::Text, d, h * hd, ab)?;
            let k_proj = wr.linear(&mut reg, &format!("{p}.self_attn.k_proj"), Tower::Text, d, hkv * hd, ab)?;
            let v_proj = wr.linear(&mut reg, &format!("{p}.self_attn.v_proj"), Tower::Text, d, hkv * hd, ab)?;
            let o_proj = wr.linear(&mut reg, &format!("{p}.self_attn.o_proj"), Tower::Text, h * hd, d, ab)?;
            let q_norm = wr.rms_norm(&format!("{p}.self_attn.q_norm"), hd, t.rms_norm_eps)?;
            let k_norm = wr.rms_norm(&format!("{p}.self_attn.k_norm"), hd, t.rms_norm_eps)?;
            starts.extend([Start::TextLayer(i); 4]);
            let mlp = match cfg.moe_layer(i) {
                Some(shape) => {
                    let (e, mi) = (shape.experts, shape.intermediate);
                    let gate = wr.get(&format!("{p}.mlp.gate.weight"), &[e, d])?;
                    // Released fused layout, no `.weight`: x · gate_up_proj[e] = gate ‖ up.
                    let gate_up = wr.get(&format!("{p}.mlp.experts.gate_up_proj"), &[e, d, 2 * mi])?;
                    let down = wr.get(&format!("{p}.mlp.experts.down_proj"), &[e, mi, d])?;
                    Mlp::Sparse(SparseMoeBlock::new(i, gate, gate_up, down, shape)?)
                }
                None => {
                    let mi = t.intermediate_size;
                    let gate_proj = wr.linear(&mut reg, &format!("{p}.mlp.gate_proj"), Tower::Text, d, mi, false)?;
                    let up_proj = wr.linear(&mut reg, &format!("{p}.mlp.up_proj"), Tower::Text, d, mi, false)?;
                    let down_proj = wr.linear(&mut reg, &format!("{p}.mlp.down_proj"), Tower::Text, mi, d, false)?;
                    starts.extend([Start::TextLayer(i); 3]);
                    Mlp::Dense { gate_proj, up_proj, down_proj }
                }
            };
            let input_layernorm = wr.rms_norm(&format!("{p}.input_layernorm"), d, t.rms_norm_eps)?;
            let post_attention_layernorm = wr.rms_norm(&format!("{p}.post_attention_layernorm"), d, t.rms_norm_eps)?;
            layers.push(DecoderLayer {
                input_layernorm,
                post_attention_layernorm,
                q_norm,
                k_norm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                mlp,
                heads: h,
                kv_heads: hkv,
                head_dim: hd,
            });
        }
        let norm = wr.rms_norm("model.language_model.norm", d, t.rms_norm_eps)?;
        let lm_info = LayerInfo {
            name: "lm_head".into(),
            tower: Tower::LmHead,
            kind: LayerKind::Linear,
            in_features: d,
            out_features: t.vocab_size,
        };
        let lm_weight = if cfg.tie_word_embeddings() {
            embed_tokens.clone()
        } else {
            if !ck.contains("lm_head.weight") {
                bail!("tie_word_embeddings is false but the checkpoint has no `lm_head.weight`")
            }
            wr.get("lm_head.weight", &[t.vocab_size, d])?
        };
        let lm_head = reg.push(lm_info, Linear::new(lm_weight, None));
        starts.push(Start::LmHead);
        let params = wr.params;
        let text = TextModel { embed_tokens, layers, norm };
        debug_assert_eq!(starts.len(), reg.infos.len());
        Ok(Qwen3VL { cfg, dtype, device: device.clone(), reg, vision, text, lm_head, params, starts })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameters as HF counts them (a tied `lm_head` once).
    pub fn num_parameters(&self) -> u64 {
        self.params
    }

    /// Every quantizable layer, in HF `named_modules()` order; index = [`LayerId`].
    pub fn layers(&self) -> &[LayerInfo] {
        &self.reg.infos
    }

    pub fn linear(&self, id: LayerId) -> &Linear {
        self.reg.linear(id)
    }

    /// The id of the layer called `name` (HF module name).
    pub fn layer_id(&self, name: &str) -> Option<LayerId> {
        self.reg.infos.iter().position(|l| l.name == name)
    }

    /// The sparse MoE block of decoder layer `i`, if that layer has one.
    pub fn moe_block(&self, i: usize) -> Option<&SparseMoeBlock> {
        match &self.text.layers.get(i)?.mlp {
            Mlp::Sparse(moe) => Some(moe),
            Mlp::Dense { .. } => None,
        }
    }

    pub fn lm_head_id(&self) -> LayerId {
        self.lm_head
    }

    fn prepare(&self, input: &Input) -> Result<Sample> {
        let t = &self.cfg.text_config;
        let v = &self.cfg.vision_config;
        let dev = &self.device;
        let acc = acc_dtype(self.dtype);
        let l = input.input_ids.len();
        if l == 0 {
            bail!("empty input_ids")
        }
        for (a, p) in input.position_ids.iter().enumerate() {
            if p.len() != l {
                bail!("position_ids[{a}] has length {}, input_ids {l}", p.len())
            }
        }
        if let Some(&bad) = input.input_ids.iter().find(|&&x| x as usize >= t.vocab_size) {
            bail!("input id {bad} out of range for vocab {}", t.vocab_size)
        }
        let input_ids = Tensor::from_slice(&input.input_ids, l, dev)?;
        // Image rows and the decoder-input row map.
        let img_rows: Vec<u32> =
            (0..l as u32).filter(|&i| input.input_ids[i as usize] == self.cfg.image_token_id).collect();
        let merge = v.spatial_merge_size as u32;
        let mut patches = 0usize;
        for &[gt, gh, gw] in &input.grid_thw {
            if gh % merge != 0 || gw % merge != 0 || gt == 0 {
                bail!("image grid {:?} is not a multiple of spatial_merge_size {merge}", [gt, gh, gw])
            }
            patches += (gt * gh * gw) as usize;
        }
        let tokens = patches / (merge * merge) as usize;
        if img_rows.len() != tokens {
            bail!("{} image tokens in input_ids but the grids give {tokens} image embeddings", img_rows.len())
        }
        let (vis_idx, gather, vision) = if input.grid_thw.is_empty() {
            (None, None, None)
        } else {
            let mut map: Vec<u32> = (0..l as u32).collect();
            for (j, &r) in img_rows.iter().enumerate() {
                map[r as usize] = (l + j) as u32;
            }
            let pix_shape = input.pixel_values.dims();
            if pix_shape != [patches, v.patch_dim()] {
                bail!("pixel_values has shape {pix_shape:?}, expected [{patches}, {}]", v.patch_dim())
            }
            let pixels = vision::pixels_to(&input.pixel_values, self.dtype, dev)?;
            let coords = rope::vision_patch_coords(&input.grid_thw, v.spatial_merge_size);
            let vrope = rope::vision_cos_sin(&coords, v.head_dim(), acc, dev)?;
            let segments = rope::vision_segments(&input.grid_thw);
            let (idx, w) = rope::pos_interp_tables(&input.grid_thw, self.vision.side, v.spatial_merge_size);
            let pos = self.vision.interpolated_pos(&idx, &w)?;
            (
                Some(Tensor::from_slice(&img_rows, img_rows.len(), dev)?),
                Some(Tensor::from_slice(&map, l, dev)?),
                Some(VisionSample { pixels, rope: vrope, segments, pos }),
            )
        };
        let tokens = input.segments();
        if tokens.iter().map(|&(_, len)| len).sum::<usize>() != l || tokens.iter().any(|&(_, len)| len == 0) {
            bail!("packed sample lengths {:?} do not split the {l} tokens", input.packed)
        }
        // Per packed sample: its label rows (HF's shift ignores each sample's first label).
        let mut label_counts = vec![0usize; tokens.len()];
        let labels = match &input.labels {
            None => None,
            Some(lab) => {
                if lab.len() != l {
                    bail!("labels has length {}, input_ids {l}", lab.len())
                }
                let mut rows = Vec::new();
                let mut targets = Vec::new();
                for (k, &(start, len)) in tokens.iter().enumerate() {
                    for (i, &y) in lab.iter().enumerate().take(start + len).skip(start + 1) {
                        if y == IGNORE_INDEX {
                            continue;
                        }
                        if y < 0 || y as usize >= t.vocab_size {
                            bail!("label {y} at position {i} is neither -100 nor a token id")
                        }
                        rows.push((i - 1) as u32);
                        targets.push(y as u32);
                        label_counts[k] += 1;
                    }
                }
                if rows.is_empty() {
                    None
                } else {
                    let n = rows.len();
                    Some((Tensor::from_vec(rows, n, dev)?, Tensor::from_vec(targets, n, dev)?))
                }
            }
        };
        let label_weights = match (&labels, tokens.len()) {
            (Some(_), 2..) => {
                let w: Vec<f64> = label_counts.iter().flat_map(|&n| std::iter::repeat_n(1.0 / n as f64, n)).collect();
                Some(Tensor::new(w.as_slice(), dev)?.to_dtype(acc)?)
            }
            _ => None,
        };
        let text_rope =
            rope::text_cos_sin(&input.position_ids, t.head_dim(), t.rope_theta(), &t.mrope_section(), self.dtype, dev)?;
        let longest = tokens.iter().map(|&(_, len)| len).max().unwrap_or(l);
        let mask = CausalMask::new(t.num_attention_heads, longest, acc, dev)?;
        let rows = self.packed_rows(input, tokens, &label_counts)?;
        Ok(Sample { len: l, input_ids, text_rope, mask, vis_idx, gather, labels, label_weights, vision, rows })
    }

    /// The rows of each packed sample in every part of the model.
    fn packed_rows(&self, input: &Input, tokens: Vec<(usize, usize)>, label_counts: &[usize]) -> Result<PackedRows> {
        let merge2 = self.cfg.vision_config.spatial_merge_size.pow(2);
        let image_tokens = |id: u32| id == self.cfg.image_token_id;
        // Each sample's images are the next ones in `grid_thw`, as many as its image tokens need.
        let mut grids = input.grid_thw.iter();
        let mut patches = Vec::with_capacity(tokens.len());
        for &(start, len) in &tokens {
            let wanted = input.input_ids[start..start + len].iter().filter(|&&id| image_tokens(id)).count() * merge2;
            let mut got = 0usize;
            while got < wanted {
                let Some(&[gt, gh, gw]) = grids.next() else {
                    bail!("packed samples: too few images for their tokens")
                };
                got += (gt * gh * gw) as usize;
            }
            if got != wanted {
                bail!("packed samples: a sample's images do not match its image tokens")
            }
            patches.push(got);
        }
        Ok(PackedRows {
            merged: consecutive(patches.iter().map(|p| p / merge2)),
            patches: consecutive(patches),
            tokens,
            labels: consecutive(label_counts.iter().copied()),
        })
    }

    /// Decoder input: token embeddings with the image rows replaced (HF `masked_scatter`).
    fn embed(&self, s: &Sample, image_embeds: Option<&Tensor>) -> Result<Tensor> {
        let e = self.text.embed_tokens.index_select(&s.input_ids, 0)?;
        match (image_embeds, &s.gather) {
            (Some(img), Some(map)) => Tensor::cat(&[&e, img], 0)?.index_select(map, 0),
            _ => Ok(e),
        }
    }

    /// Runs the model on `input` (batch size 1).
    pub fn forward(&self, input: &Input, tap: &mut dyn Tap, opts: &ForwardOptions) -> Result<Forward> {
        let s = self.prepare(input)?;
        if opts.keep == Keep::Backward {
            if s.labels.is_none() {
                bail!("Keep::Backward needs labels with at least one label token")
            }
            if opts.logits == LogitsMode::None {
                bail!("Keep::Backward needs logits covering the labels (LabelPositions or All)")
            }
        }
        if opts.logits == LogitsMode::LabelPositions && s.labels.is_none() {
            bail!("LogitsMode::LabelPositions needs labels with at least one label token")
        }
        let start = if s.vision.is_some() { Start::PatchEmbed } else { Start::TextLayer(0) };
        let out = self.run(&s, start, None, tap, opts.keep, opts.trace, opts.logits)?;
        let loss = match &out.loss {
            Some(l) => Some(l.to_dtype(DType::F32)?.to_scalar::<f32>()?),
            None => None,
        };
        let sample_losses = match (&out.nll, loss) {
            // Each sample's mean over its own rows, reduced as an unpacked forward reduces it;
            // one sync for all.
            (Some(nll), _) => {
                let labels = &s.rows.labels;
                let means = labels
                    .iter()
                    .filter(|&&(_, len)| len > 0)
                    .map(|&(start, len)| nll.narrow(0, start, len)?.mean_all()?.to_dtype(DType::F32))
                    .collect::<Result<Vec<_>>>()?;
                let mut means = Tensor::stack(&means, 0)?.to_vec1::<f32>()?.into_iter();
                labels.iter().map(|&(_, len)| if len > 0 { means.next() } else { None }).collect()
            }
            (None, Some(loss)) => vec![Some(loss)],
            (None, None) => Vec::new(),
        };
        let keep_sample = opts.keep != Keep::Nothing;
        Ok(Forward {
            loss,
            sample_losses,
            logits: out.logits,
            trace: out.trace,
            loss_t: out.loss,
            sample: keep_sample.then_some(s),
            bwd: out.bwd,
            resume: out.resume,
        })
    }

    /// Per packed sample of `fwd`, the `(start, len)` rows of layer `id`'s input and output (in
    /// the forward, and in the backward's tap calls). One entry when the input was not packed.
    pub fn sample_rows<'a>(&self, fwd: &'a Forward, id: LayerId) -> Result<&'a [(usize, usize)]> {
        let Some(s) = fwd.sample.as_ref() else { bail!("sample_rows needs a Forward that kept its sample") };
        let r = &s.rows;
        Ok(match self.start_of(id)? {
            Start::PatchEmbed | Start::VisionBlock(_) => &r.patches,
            Start::Merger | Start::Deepstack(_) => &r.merged,
            Start::TextLayer(_) => &r.tokens,
            Start::LmHead => match fwd.bwd.as_ref().map(|b| b.head.all_rows) {
                Some(false) => &r.labels,
                _ => &r.tokens,
            },
        })
    }

    /// The layer group `forward_from` restarts at for `id`.
    fn start_of(&self, id: LayerId) -> Result<Start> {
        match self.starts.get(id) {
            Some(&s) => Ok(s),
            None => bail!("layer id {id} out of range ({} layers)", self.starts.len()),
        }
    }

    /// Re-runs the forward from the block containing layer `start`, reusing every activation of
    /// `fwd` (made with [`Keep::Resume`]) that cannot change; returns logits for ALL positions,
    /// `[L, vocab]` f32 (f64 for an f64 model). With a tap that changes nothing it reproduces a
    /// [`LogitsMode::All`] forward's logits bit-exactly.
    pub fn forward_from(&self, fwd: &Forward, start: LayerId, tap: &mut dyn Tap) -> Result<Tensor> {
        let (Some(prev), Some(s)) = (fwd.resume.as_ref(), fwd.sample.as_ref()) else {
            bail!("forward_from needs a Forward made with Keep::Resume")
        };
        let mut start = self.start_of(start)?;
        if s.vision.is_none()
            && matches!(start, Start::PatchEmbed | Start::VisionBlock(_) | Start::Merger | Start::Deepstack(_))
        {
            // Without an image the vision layers change nothing: just the logits again.
            start = Start::LmHead;
        }
        let out = self.run(s, start, Some(prev), tap, Keep::Nothing, false, LogitsMode::All)?;
        match out.logits {
            Some(l) => Ok(l),
            None => bail!("internal: no logits"),
        }
    }

    /// [`Qwen3VL::forward_from`] up to `lm_head`'s input: the final hidden state `[L, hidden]`
    /// (model dtype), for callers that apply `lm_head` themselves (e.g. by row blocks). The tap
    /// is not asked about `lm_head`.
    pub fn forward_from_hidden(&self, fwd: &Forward, start: LayerId, tap: &mut dyn Tap) -> Result<Tensor> {
        struct HideHead<'a> {
            inner: &'a mut dyn Tap,
            head: LayerId,
        }
        impl Tap for HideHead<'_> {
            fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
                if id == self.head {
                    return Ok(None);
                }
                self.inner.forward(id, linear, x)
            }
            fn moe_forward(&mut self, block: &SparseMoeBlock, x: &Tensor) -> Result<Option<Tensor>> {
                self.inner.moe_forward(block, x)
            }
            fn moe_expert_input(&mut self, block: &SparseMoeBlock, expert: usize, act: &Tensor) -> Result<()> {
                self.inner.moe_expert_input(block, expert, act)
            }
        }
        let (Some(prev), Some(s)) = (fwd.resume.as_ref(), fwd.sample.as_ref()) else {
            bail!("forward_from_hidden needs a Forward made with Keep::Resume")
        };
        let mut start = self.start_of(start)?;
        if s.vision.is_none()
            && matches!(start, Start::PatchEmbed | Start::VisionBlock(_) | Start::Merger | Start::Deepstack(_))
        {
            start = Start::LmHead;
        }
        let mut hide = HideHead { inner: tap, head: self.lm_head };
        let out = self.run(s, start, Some(prev), &mut hide, Keep::Resume, false, LogitsMode::None)?;
        match out.resume.and_then(|r| r.final_hidden) {
            Some(h) => Ok(h),
            None => bail!("internal: no final hidden state"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        s: &Sample,
        start: Start,
        prev: Option<&ResumeCache>,
        tap: &mut dyn Tap,
        keep: Keep,
        trace: bool,
        logits_mode: LogitsMode,
    ) -> Result<RunOut> {
        let save = keep == Keep::Backward;
        let resume = keep == Keep::Resume;
        let reg = &self.reg;
        let vm = &self.vision;
        let n_layers = self.text.layers.len();
        let mut tr = BTreeMap::new();
        let mut rec = |name: String, t: &Tensor| {
            if trace {
                tr.insert(name, t.clone());
            }
        };
        let need_prev = || -> Result<&ResumeCache> {
            match prev {
                Some(p) => Ok(p),
                None => bail!("internal: restart without a resume cache"),
            }
        };
        let mut rc = ResumeCache::default();
        let mut patch_y = None;
        let mut block_inputs = Vec::new();
        let mut merger_saved = None;
        let mut ds_saved: Vec<Option<MergerSaved>> = (0..vm.deepstack.len()).map(|_| None).collect();
        // Deepstack features are used only with images.
        let mut ds: Vec<Option<Tensor>> = match prev {
            Some(p) => p.deepstack.iter().cloned().map(Some).collect(),
            None => vec![None; if s.vision.is_some() { vm.deepstack.len() } else { 0 }],
        };

        // 1. Vision tower, or the text-side entry point.
        enum Entry {
            Embeds(Option<Tensor>),
            Layer(usize, Tensor),
            FinalHidden(Tensor),
        }
        let entry = match start {
            Start::PatchEmbed | Start::VisionBlock(_) | Start::Merger => {
                let Some(vs) = s.vision.as_ref() else { bail!("this sample has no image") };
                let (mut hv, j0) = match start {
                    Start::PatchEmbed => {
                        let (pe, pe_y) = tapped(reg, vm.patch_embed, &vs.pixels, tap, save)?;
                        rec("vision_patch_embed".into(), &pe);
                        patch_y = save.then_some(pe_y);
                        ((pe + &vs.pos)?, 0)
                    }
                    Start::VisionBlock(j) => (need_prev()?.vision_h[j].clone(), j),
                    _ => (need_prev()?.vision_h[vm.blocks.len()].clone(), vm.blocks.len()),
                };
                for j in j0..vm.blocks.len() {
                    if j == 0 {
                        rec("vision_block_in_0".into(), &hv);
                    }
                    if resume {
                        rc.vision_h.push(hv.clone());
                    }
                    // Kept for the backward: the block's input only (recomputed there with the
                    // plain layers, so the tap may observe these layers but not replace them).
                    if save {
                        block_inputs.push(hv.clone());
                    }
                    hv = vm.blocks[j].forward(&hv, vs, reg, &mut Recomputed { tap, save }, false)?.0;
                    rec(format!("vision_block_out_{j}"), &hv);
                    for k in vm.deepstack_after(j) {
                        let (f, ms) = vm.deepstack[k].forward(&hv, reg, tap, save)?;
                        rec(format!("deepstack_{k}"), &f);
                        ds[k] = Some(f);
                        ds_saved[k] = ms;
                    }
                }
                if resume {
                    rc.vision_h.push(hv.clone());
                }
                rec("vision_last_hidden".into(), &hv);
                let (emb, ms) = vm.merger.forward(&hv, reg, tap, save)?;
                rec("image_embeds".into(), &emb);
                merger_saved = ms;
                Entry::Embeds(Some(emb))
            }
            Start::Deepstack(k) => {
                let p = need_prev()?;
                let (f, _) = vm.deepstack[k].forward(&p.vision_h[vm.deepstack_index[k] + 1], reg, tap, false)?;
                let entry = if k < n_layers {
                    let Some(vis) = s.vis_idx.as_ref() else { bail!("internal: no image rows") };
                    Entry::Layer(k + 1, p.text_pre_ds[k].index_add(vis, &f, 0)?)
                } else {
                    Entry::Layer(n_layers, p.text_h[n_layers].clone())
                };
                ds[k] = Some(f);
                entry
            }
            Start::TextLayer(i) => match prev {
                Some(p) => Entry::Layer(i, p.text_h[i].clone()),
                None => Entry::Embeds(None),
            },
            Start::LmHead => Entry::FinalHidden(
                need_prev()?
                    .final_hidden
                    .clone()
                    .ok_or_else(|| candle_core::Error::Msg("internal: no cached final hidden state".into()))?,
            ),
        };

        // 2. Decoder layers, final norm.
        let ts = TextSample { rope: &s.text_rope, mask: &s.mask, segments: &s.rows.tokens };
        let mut layers_saved = Vec::new();
        let mut final_saved = None;
        let fh = match entry {
            Entry::FinalHidden(fh) => fh,
            entry => {
                let (mut h, i0) = match entry {
                    Entry::Embeds(img) => (self.embed(s, img.as_ref())?, 0),
                    Entry::Layer(i, h) => (h, i),
                    Entry::FinalHidden(_) => unreachable!(),
                };
                for i in i0..n_layers {
                    rec(format!("text_layer_in_{i}"), &h);
                    if resume {
                        rc.text_h.push(h.clone());
                    }
                    // Names only when tracing: a forward without a trace formats nothing.
                    let mut rec_layer = |name: &str, t: &Tensor| {
                        if trace {
                            rec(format!("{name}_{i}"), t)
                        }
                    };
                    let (out, sv) = self.text.layers[i].forward(&h, &ts, reg, tap, save, &mut rec_layer)?;
                    h = out;
                    layers_saved.extend(sv);
                    if let Some(Some(f)) = ds.get(i) {
                        if resume {
                            rc.text_pre_ds.push(h.clone());
                        }
                        let Some(vis) = s.vis_idx.as_ref() else { bail!("internal: no image rows") };
                        // HF `_deepstack_process`: h[visual rows] += feature
                        h = h.index_add(vis, f, 0)?;
                    }
                }
                rec("text_final_norm_in".into(), &h);
                if resume {
                    rc.text_h.push(h.clone());
                }
                let (fh, r) = self.text.norm.forward(&h)?;
                if save {
                    final_saved = Some((h, r));
                }
                rec("text_final_hidden".into(), &fh);
                fh
            }
        };
        if resume {
            rc.final_hidden = Some(fh.clone());
            rc.deepstack = ds.into_iter().flatten().collect();
        }

        // 3. lm_head and loss.
        let HeadOut { logits, loss, nll, saved: head } = self.head(s, &fh, logits_mode, tap, save)?;
        let bwd = match (save, final_saved, head) {
            (true, Some((final_in, final_rstd)), Some(head)) => Some(BackwardCache {
                patch_y,
                block_inputs,
                merger: merger_saved,
                deepstack: ds_saved,
                layers: layers_saved,
                final_in,
                final_rstd,
                head,
            }),
            (true, ..) => bail!("internal: incomplete backward cache"),
            _ => None,
        };
        Ok(RunOut { logits, loss, nll, trace: tr, bwd, resume: resume.then_some(rc) })
    }

    /// lm_head on the rows `mode` asks for, and the loss when labels are covered.
    #[allow(clippy::type_complexity)]
    fn head(&self, s: &Sample, fh: &Tensor, mode: LogitsMode, tap: &mut dyn Tap, save: bool) -> Result<HeadOut> {
        let acc = acc_dtype(self.dtype);
        let (x, all_rows) = match mode {
            LogitsMode::None => {
                // Calibration still observes lm_head's input over all positions.
                tap.forward(self.lm_head, self.reg.linear(self.lm_head), fh)?;
                return Ok(HeadOut::default());
            }
            LogitsMode::All => (fh.clone(), true),
            LogitsMode::LabelPositions => match &s.labels {
                Some((rows, _)) => (fh.index_select(rows, 0)?, false),
                None => bail!("LogitsMode::LabelPositions needs labels"),
            },
        };
        let (y, y_plain) = tapped(&self.reg, self.lm_head, &x, tap, save)?;
        // HF: logits.float() before the loss.
        let logits = y.to_dtype(acc)?;
        let Some((rows, targets)) = &s.labels else {
            return Ok(HeadOut { logits: Some(logits), ..Default::default() });
        };
        let label_logits = if all_rows { logits.index_select(rows, 0)? } else { logits.clone() };
        let (loss, lse) = cross_entropy(&label_logits, targets, s.label_weights.as_ref())?;
        // Packed samples: each row's NLL, for the samples' own mean losses.
        let nll = match &s.label_weights {
            Some(_) => Some((&lse - label_logits.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?)?),
            None => None,
        };
        let saved = save.then(|| HeadSaved { x, y: y_plain, label_logits, lse, all_rows });
        Ok(HeadOut { logits: Some(logits), loss: Some(loss), nll, saved })
    }

    /// Backward from the loss; requires a [`Forward`] made with [`Keep::Backward`] and labels.
    /// Computes activation gradients only and calls `tap.backward` for every quantizable layer,
    /// in reverse execution order.
    pub fn backward(&self, fwd: &Forward, tap: &mut dyn Tap) -> Result<()> {
        let (Some(b), Some(s)) = (fwd.bwd.as_ref(), fwd.sample.as_ref()) else {
            bail!("backward needs a Forward made with Keep::Backward")
        };
        let Some((rows, targets)) = &s.labels else { bail!("backward needs labels") };
        let reg = &self.reg;
        let dt = self.dtype;
        let acc = acc_dtype(dt);
        let dev = &self.device;
        let t = &self.cfg.text_config;
        // 1. Loss → lm_head → final hidden
        let hs = &b.head;
        let dl = cross_entropy_backward(&hs.label_logits, &hs.lse, targets, s.label_weights.as_ref())?;
        let lm = reg.linear(self.lm_head);
        let dy = if hs.all_rows {
            Tensor::zeros((s.len, t.vocab_size), acc, dev)?.index_add(rows, &dl, 0)?.to_dtype(dt)?
        } else {
            dl.to_dtype(dt)?
        };
        tap.backward(self.lm_head, lm, &hs.x, &hs.y, &dy)?;
        let dx = lm.backward_input(&dy)?;
        let d_final =
            if hs.all_rows { dx } else { Tensor::zeros((s.len, t.hidden_size), dt, dev)?.index_add(rows, &dx, 0)? };
        // 2. Final norm, decoder layers (collecting the deepstack features' gradients)
        let mut dh = self.text.norm.backward(&b.final_in, &b.final_rstd, &d_final)?;
        let ts = TextSample { rope: &s.text_rope, mask: &s.mask, segments: &s.rows.tokens };
        let n_ds = if s.vision.is_some() { self.vision.deepstack.len() } else { 0 };
        let mut d_ds: Vec<Option<Tensor>> = vec![None; n_ds];
        for (i, layer) in self.text.layers.iter().enumerate().rev() {
            if i < n_ds {
                if let Some(vis) = &s.vis_idx {
                    d_ds[i] = Some(dh.index_select(vis, 0)?);
                }
            }
            dh = layer.backward(&b.layers[i], &dh, &ts, reg, tap)?;
        }
        // 3. Vision tower via the image rows and the deepstack features
        let (Some(vs), Some(vis)) = (s.vision.as_ref(), s.vis_idx.as_ref()) else {
            return Ok(());
        };
        let vm = &self.vision;
        let d_img = dh.index_select(vis, 0)?;
        let Some(ms) = b.merger.as_ref() else { bail!("internal: no merger cache") };
        let mut dv = vm.merger.backward(ms, &d_img, reg, tap)?;
        for j in (0..vm.blocks.len()).rev() {
            for k in vm.deepstack_after(j) {
                let Some(ms) = b.deepstack[k].as_ref() else { bail!("internal: no deepstack cache") };
                // A feature beyond the decoder's depth is never added: zero gradient.
                let g = match d_ds.get(k).cloned().flatten() {
                    Some(g) => g,
                    None => Tensor::zeros(d_img.shape(), dt, dev)?,
                };
                dv = (dv + vm.deepstack[k].backward(ms, &g, reg, tap)?)?;
            }
            let (_, saved) = vm.blocks[j].forward(&b.block_inputs[j], vs, reg, &mut NoTap, true)?;
            let Some(saved) = saved else { bail!("internal: no vision block cache") };
            dv = vm.blocks[j].backward(&saved, &dv, vs, reg, tap)?;
        }
        let Some(pe_y) = b.patch_y.as_ref() else { bail!("internal: no patch-embed cache") };
        tap.backward(vm.patch_embed, reg.linear(vm.patch_embed), &vs.pixels, pe_y, &dv)?;
        Ok(())
    }
}

/// The tap of a part of the forward that a `Keep::Backward` backward recomputes with the plain
/// layers (`save`): it may observe those layers but not replace their outputs, since the
/// gradients would then belong to another model. Without `save`, the tap as it is.
struct Recomputed<'a> {
    tap: &'a mut dyn Tap,
    save: bool,
}

impl Tap for Recomputed<'_> {
    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        match self.tap.forward(id, linear, x)? {
            Some(_) if self.save => bail!(
                "Keep::Backward: the tap replaced the output of layer {id}, which the backward recomputes with the plain layer"
            ),
            y => Ok(y),
        }
    }
}

/// What `lm_head` and the loss give.
#[derive(Default)]
struct HeadOut {
    logits: Option<Tensor>,
    loss: Option<Tensor>,
    /// Packed samples: each label row's NLL.
    nll: Option<Tensor>,
    saved: Option<HeadSaved>,
}

struct RunOut {
    logits: Option<Tensor>,
    loss: Option<Tensor>,
    /// Packed samples: each label row's NLL.
    nll: Option<Tensor>,
    trace: BTreeMap<String, Tensor>,
    bwd: Option<BackwardCache>,
    resume: Option<ResumeCache>,
}
