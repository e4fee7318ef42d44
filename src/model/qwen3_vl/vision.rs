//! Vision tower (HF `Qwen3VLVisionModel`): patch embedding, ViT blocks with 2-D rotary and
//! per-frame (block-diagonal, bidirectional) attention, the patch merger and the deepstack mergers.
//! Every block has a forward that can keep what its hand-written backward needs.

use candle_core::{DType, Result, Tensor};

use super::fused::{self, segmented_attention_backward, segmented_attention_forward};
use super::ops::{AttnSpec, LayerNorm, LnStats};
use super::rope::CosSin;
use super::{tapped, Registry};
use crate::model::{LayerId, Tap};

/// Per-sample vision inputs, fixed for the whole pass.
pub struct VisionSample {
    /// `[N, C·T·P·P]` in the model dtype.
    pub pixels: Tensor,
    /// 2-D rotary tables `[N, head_dim/2]` in the accumulation dtype.
    pub rope: CosSin,
    /// One `(start, len)` attention segment per frame (HF `cu_seqlens`).
    pub segments: Vec<(usize, usize)>,
    /// Interpolated learned position embedding `[N, hidden]`, model dtype.
    pub pos: Tensor,
}

/// HF `Qwen3VLVisionBlock`.
#[derive(Debug)]
pub struct VisionBlock {
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub qkv: LayerId,
    pub proj: LayerId,
    pub fc1: LayerId,
    pub fc2: LayerId,
    pub heads: usize,
    pub head_dim: usize,
}

/// What a vision block keeps for its backward.
pub struct VisionBlockSaved {
    x: Tensor,
    ln1: LnStats,
    n1: Tensor,
    qkv_y: Tensor,
    /// Rotated q, k and v, `[H, N, hd]`, model dtype.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    /// Attention output `[N, hidden]` (proj input).
    attn: Tensor,
    proj_y: Tensor,
    h_mid: Tensor,
    ln2: LnStats,
    n2: Tensor,
    fc1_used: Tensor,
    fc1_y: Tensor,
    act: Tensor,
    fc2_y: Tensor,
}

impl VisionBlock {
    /// Segment-wise attention over `[H, N, hd]` q/k/v: `(o [H, N, hd], lse [H, N])`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, vs: &VisionSample) -> Result<(Tensor, Tensor)> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        segmented_attention_forward(q, k, v, &vs.segments, |len| AttnSpec::full(1, scale, self.heads, len))
    }

    pub fn forward(
        &self,
        x: &Tensor,
        vs: &VisionSample,
        reg: &Registry,
        tap: &mut dyn Tap,
        save: bool,
    ) -> Result<(Tensor, Option<VisionBlockSaved>)> {
        let (n, dim) = x.dims2()?;
        // 1. Attention: norm1 → qkv → rotary (f32) on q, k → (3, H, N, hd), one fused pass
        let (n1, ln1) = self.norm1.forward(x)?;
        let (qkv, qkv_y) = tapped(reg, self.qkv, &n1, tap, save)?;
        let qkv_h = fused::vision_qkv_rope(&qkv, &vs.rope.cos, &vs.rope.sin, self.heads)?;
        let (q, k, v) = (qkv_h.get(0)?, qkv_h.get(1)?, qkv_h.get(2)?);
        let (o, lse) = self.attend(&q, &k, &v, vs)?;
        // 2. (H, N, hd) → (N, H·hd) → proj; residual fused into norm2
        let attn = o.transpose(0, 1)?.contiguous()?.reshape((n, dim))?;
        let (a, proj_y) = tapped(reg, self.proj, &attn, tap, save)?;
        // 3. MLP: norm2 → fc1 → gelu(tanh) → fc2, residual
        let (h_mid, n2, ln2) = self.norm2.forward_add(x, &a)?;
        let (f1, fc1_y) = tapped(reg, self.fc1, &n2, tap, save)?;
        let act = f1.gelu()?;
        let (f2, fc2_y) = tapped(reg, self.fc2, &act, tap, save)?;
        let out = (&h_mid + f2)?;
        let saved = save.then(|| VisionBlockSaved {
            x: x.clone(),
            ln1,
            n1,
            qkv_y,
            q,
            k,
            v,
            lse,
            attn,
            proj_y,
            h_mid,
            ln2,
            n2,
            fc1_used: f1,
            fc1_y,
            act,
            fc2_y,
        });
        Ok((out, saved))
    }

    /// ∂loss/∂x from ∂loss/∂out; reports fc2, fc1, proj, qkv to the tap.
    pub fn backward(
        &self,
        s: &VisionBlockSaved,
        dout: &Tensor,
        vs: &VisionSample,
        reg: &Registry,
        tap: &mut dyn Tap,
    ) -> Result<Tensor> {
        let (h, hd) = (self.heads, self.head_dim);
        // MLP branch
        let (fc1, fc2) = (reg.linear(self.fc1), reg.linear(self.fc2));
        tap.backward(self.fc2, fc2, &s.act, &s.fc2_y, dout)?;
        let dact = fc2.backward_input(dout)?;
        let df1 = fused::gelu_tanh_backward(&s.fc1_used, &dact)?;
        tap.backward(self.fc1, fc1, &s.n2, &s.fc1_y, &df1)?;
        let dn2 = fc1.backward_input(&df1)?;
        let dh_mid = self.norm2.backward_add(&s.h_mid, &s.ln2, &dn2, dout)?;
        // Attention branch
        let (qkv, proj) = (reg.linear(self.qkv), reg.linear(self.proj));
        tap.backward(self.proj, proj, &s.attn, &s.proj_y, &dh_mid)?;
        let dattn = proj.backward_input(&dh_mid)?;
        // (N, H·hd) → dO (H, N, hd) and delta = rowsum(dO∘O) [H, N] with O the proj input
        let (do_, delta) = fused::attention_bwd_prep(&dattn, &s.attn, h)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let (dq, dk, dv) = segmented_attention_backward(&s.q, &s.k, &s.v, &s.lse, &delta, &do_, &vs.segments, |len| {
            AttnSpec::full(1, scale, h, len)
        })?;
        // Inverse rotation (f32) and (H, N, hd) ×3 → (N, 3·hidden), one fused pass
        let dqkv = fused::vision_qkv_rope_backward(&dq, &dk, &dv, &vs.rope.cos, &vs.rope.sin)?;
        tap.backward(self.qkv, qkv, &s.n1, &s.qkv_y, &dqkv)?;
        let dn1 = qkv.backward_input(&dqkv)?;
        self.norm1.backward_add(&s.x, &s.ln1, &dn1, &dh_mid)
    }
}

/// HF `Qwen3VLVisionPatchMerger`: LayerNorm (before the 2×2 merge, or after it with
/// `postshuffle`), fc1, exact GELU, fc2.
#[derive(Debug)]
pub struct PatchMerger {
    pub norm: LayerNorm,
    pub fc1: LayerId,
    pub fc2: LayerId,
    pub postshuffle: bool,
    /// `hidden · merge²`.
    pub merged_dim: usize,
}

pub struct MergerSaved {
    x: Tensor,
    ln: LnStats,
    normed: Tensor,
    fc1_used: Tensor,
    fc1_y: Tensor,
    act: Tensor,
    fc2_y: Tensor,
}

impl PatchMerger {
    /// `x` `[N, hidden]` → `[N / merge², out_hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        reg: &Registry,
        tap: &mut dyn Tap,
        save: bool,
    ) -> Result<(Tensor, Option<MergerSaved>)> {
        let (n, dim) = x.dims2()?;
        let rows = n * dim / self.merged_dim;
        let (normed, ln) = if self.postshuffle {
            self.norm.forward(&x.reshape((rows, self.merged_dim))?)?
        } else {
            let (y, st) = self.norm.forward(x)?;
            (y.reshape((rows, self.merged_dim))?, st)
        };
        let (f1, fc1_y) = tapped(reg, self.fc1, &normed, tap, save)?;
        let act = f1.gelu_erf()?;
        let (out, fc2_y) = tapped(reg, self.fc2, &act, tap, save)?;
        let saved = save.then(|| MergerSaved { x: x.clone(), ln, normed, fc1_used: f1, fc1_y, act, fc2_y });
        Ok((out, saved))
    }

    pub fn backward(&self, s: &MergerSaved, dout: &Tensor, reg: &Registry, tap: &mut dyn Tap) -> Result<Tensor> {
        let (fc1, fc2) = (reg.linear(self.fc1), reg.linear(self.fc2));
        tap.backward(self.fc2, fc2, &s.act, &s.fc2_y, dout)?;
        let dact = fc2.backward_input(dout)?;
        let df1 = fused::gelu_erf_backward(&s.fc1_used, &dact)?;
        tap.backward(self.fc1, fc1, &s.normed, &s.fc1_y, &df1)?;
        let dnormed = fc1.backward_input(&df1)?;
        let shape = s.x.shape().clone();
        if self.postshuffle {
            let xr = s.x.reshape(dnormed.shape())?;
            self.norm.backward(&xr, &s.ln, &dnormed)?.reshape(shape)
        } else {
            self.norm.backward(&s.x, &s.ln, &dnormed.reshape(shape)?)
        }
    }
}

/// The vision tower's weights.
#[derive(Debug)]
pub struct VisionModel {
    pub patch_embed: LayerId,
    /// Learned position table `[side², hidden]`.
    pub pos_embed: Tensor,
    pub side: usize,
    pub blocks: Vec<VisionBlock>,
    pub merger: PatchMerger,
    pub deepstack: Vec<PatchMerger>,
    /// Source block of each deepstack merger.
    pub deepstack_index: Vec<usize>,
    pub merge: usize,
    pub head_dim: usize,
}

impl VisionModel {
    /// HF `fast_pos_embed_interpolate` from the host-side tables: `Σ_k table[idx_k] · w_k` in the
    /// model dtype, summed corner by corner as HF does.
    pub fn interpolated_pos(&self, idx: &[Vec<u32>; 4], w: &[Vec<f32>; 4]) -> Result<Tensor> {
        let dev = self.pos_embed.device();
        let dt = self.pos_embed.dtype();
        let mut acc: Option<Tensor> = None;
        for k in 0..4 {
            let n = idx[k].len();
            let ids = Tensor::from_slice(&idx[k], n, dev)?;
            let wt = Tensor::from_slice(&w[k], (n, 1), dev)?.to_dtype(dt)?;
            let term = self.pos_embed.index_select(&ids, 0)?.broadcast_mul(&wt)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        match acc {
            Some(a) => Ok(a),
            None => candle_core::bail!("no corners"),
        }
    }

    /// Deepstack merger fed by the output of block `j`, if any.
    pub fn deepstack_after(&self, j: usize) -> impl Iterator<Item = usize> + '_ {
        self.deepstack_index.iter().enumerate().filter(move |(_, &s)| s == j).map(|(k, _)| k)
    }
}

/// The model dtype's patch-embed input: pixels cast (HF `pixel_values.type(visual.dtype)`).
pub fn pixels_to(pixels: &Tensor, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    pixels.to_device(device)?.to_dtype(dtype)
}
