//! Text decoder (HF `Qwen3VLTextModel`): Qwen3 layers with per-head q/k RMSNorm, interleaved
//! MRoPE, causal GQA attention and a SwiGLU MLP, or in the MoE model a sparse mixture of experts
//! ([`super::moe`]); each with a forward that can keep what its hand-written backward needs.

use candle_core::{Result, Tensor};

use super::fused::{self, segmented_attention_backward, segmented_attention_forward};
use super::moe::{MoeSaved, SparseMoeBlock};
use super::ops::{AttnSpec, CausalMask, RmsNorm};
use super::rope::CosSin;
use super::{tapped, Recomputed, Registry};
use crate::model::{LayerId, NoTap, Tap};

/// Per-sample text inputs shared by all layers.
pub struct TextSample<'a> {
    pub rope: &'a CosSin,
    pub mask: &'a CausalMask,
    /// `(start, len)` of each packed sample's tokens: a token attends only within its own.
    pub segments: &'a [(usize, usize)],
}

/// HF `Qwen3VLTextDecoderLayer`.
#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
    pub q_proj: LayerId,
    pub k_proj: LayerId,
    pub v_proj: LayerId,
    pub o_proj: LayerId,
    pub mlp: Mlp,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The MLP of a decoder layer.
#[derive(Debug)]
pub enum Mlp {
    /// HF `Qwen3VLTextMLP`: `down(silu(gate(x)) · up(x))`.
    Dense { gate_proj: LayerId, up_proj: LayerId, down_proj: LayerId },
    /// HF `Qwen3VLMoeTextSparseMoeBlock` (its router and experts are not quantizable layers).
    Sparse(SparseMoeBlock),
}

/// What an MLP keeps for its backward (its input is recomputed with the attention half).
enum MlpSaved {
    Dense { gate: Tensor, up: Tensor, gate_y: Tensor, up_y: Tensor, act: Tensor, down_y: Tensor },
    Sparse(MoeSaved),
}

/// What a decoder layer keeps for its backward: its input, from which the backward recomputes
/// the attention half (a few dense matmuls; its activations are about half of a layer's), and
/// what the MLP keeps.
pub struct DecoderLayerSaved {
    x: Tensor,
    mlp: MlpSaved,
}

/// The attention half's activations, as its backward needs them.
struct AttentionSaved {
    r1: Tensor,
    n1: Tensor,
    /// Outputs of q/k/v_proj as used (`q`, `k`) and plain (`*_y`, for the tap).
    q: Tensor,
    k: Tensor,
    q_y: Tensor,
    k_y: Tensor,
    v_y: Tensor,
    qr: Tensor,
    kr: Tensor,
    /// Rotated `[H, L, d]` / `[Hkv, L, d]`, and v `[Hkv, L, d]`.
    q_rot: Tensor,
    k_rot: Tensor,
    v_h: Tensor,
    lse: Tensor,
    /// Attention output `[L, H·d]` (o_proj input).
    attn: Tensor,
    o_y: Tensor,
}

/// The attention half's outputs: the residual stream after it, the MLP input and its norm's rstd.
struct AttentionOut {
    h_mid: Tensor,
    n2: Tensor,
    r2: Tensor,
    saved: Option<AttentionSaved>,
}

impl DecoderLayer {
    /// Norm, q/k/v, per-head norm + MRoPE, causal GQA attention, o_proj, residual and the
    /// post-attention norm.
    fn attention(
        &self,
        x: &Tensor,
        ts: &TextSample,
        reg: &Registry,
        tap: &mut dyn Tap,
        save: bool,
    ) -> Result<AttentionOut> {
        let l = x.dim(0)?;
        let (h, hkv, d) = (self.heads, self.kv_heads, self.head_dim);
        // 1. Projections
        let (n1, r1) = self.input_layernorm.forward(x)?;
        let (q, q_y) = tapped(reg, self.q_proj, &n1, tap, save)?;
        let (k, k_y) = tapped(reg, self.k_proj, &n1, tap, save)?;
        let (v, v_y) = tapped(reg, self.v_proj, &n1, tap, save)?;
        // 2. Per-head RMSNorm + MRoPE, (L, H·d) → (H, L, d), one fused pass each
        let (q_rot, qr) = self.q_norm.qk_rope(&q, ts.rope, h)?;
        let (k_rot, kr) = self.k_norm.qk_rope(&k, ts.rope, hkv)?;
        let v_h = v.reshape((l, hkv, d))?.transpose(0, 1)?.contiguous()?;
        // 3. Causal GQA attention, (H, L, d) → (L, H·d) → o_proj; residual fused into the next norm
        let spec = AttnSpec::causal(h / hkv, 1.0 / (d as f64).sqrt(), ts.mask);
        let (o, lse) = segmented_attention_forward(&q_rot, &k_rot, &v_h, ts.segments, |_| spec)?;
        let attn = o.transpose(0, 1)?.contiguous()?.reshape((l, h * d))?;
        let (a, o_y) = tapped(reg, self.o_proj, &attn, tap, save)?;
        let (h_mid, n2, r2) = self.post_attention_layernorm.forward_add(x, &a)?;
        let saved =
            save.then(|| AttentionSaved { r1, n1, q, k, q_y, k_y, v_y, qr, kr, q_rot, k_rot, v_h, lse, attn, o_y });
        Ok(AttentionOut { h_mid, n2, r2, saved })
    }

    /// `rec` receives the MLP's input and output (`mlp_in`, `mlp_out`) and, for a sparse layer,
    /// the router's `router_logits`, `router_topk_ids` and `router_topk_weights`. With `save`,
    /// the tap may observe the attention half's layers but not replace their outputs (the
    /// backward recomputes them plainly).
    pub fn forward(
        &self,
        x: &Tensor,
        ts: &TextSample,
        reg: &Registry,
        tap: &mut dyn Tap,
        save: bool,
        rec: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<(Tensor, Option<DecoderLayerSaved>)> {
        // 1. Attention, residual, post-attention norm
        let AttentionOut { h_mid, n2, .. } = self.attention(x, ts, reg, &mut Recomputed { tap, save }, false)?;
        // 2. MLP (SwiGLU or mixture of experts), residual
        rec("mlp_in", &n2);
        let (down, mlp) = match &self.mlp {
            Mlp::Dense { gate_proj, up_proj, down_proj } => {
                let (gate, gate_y) = tapped(reg, *gate_proj, &n2, tap, save)?;
                let (up, up_y) = tapped(reg, *up_proj, &n2, tap, save)?;
                let act = fused::swiglu(&gate, &up)?;
                let (down, down_y) = tapped(reg, *down_proj, &act, tap, save)?;
                (down, save.then_some(MlpSaved::Dense { gate, up, gate_y, up_y, act, down_y }))
            }
            Mlp::Sparse(moe) => {
                let (plain, routing, saved) =
                    moe.forward_observed(&n2, save, &mut |e, act| tap.moe_expert_input(moe, e, act))?;
                let down = tap.moe_forward(moe, &n2)?.unwrap_or(plain);
                rec("router_logits", &routing.logits);
                rec("router_topk_ids", &routing.ids);
                rec("router_topk_weights", &routing.weights);
                (down, saved.map(MlpSaved::Sparse))
            }
        };
        rec("mlp_out", &down);
        let out = (&h_mid + down)?;
        Ok((out, mlp.map(|mlp| DecoderLayerSaved { x: x.clone(), mlp })))
    }

    /// ∂loss/∂x from ∂loss/∂out; reports down, up, gate, o, v, k, q to the tap.
    pub fn backward(
        &self,
        s: &DecoderLayerSaved,
        dout: &Tensor,
        ts: &TextSample,
        reg: &Registry,
        tap: &mut dyn Tap,
    ) -> Result<Tensor> {
        let l = s.x.dim(0)?;
        let (h, hkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let AttentionOut { h_mid, n2, r2, saved } = self.attention(&s.x, ts, reg, &mut NoTap, true)?;
        let Some(a) = saved else { candle_core::bail!("internal: attention recomputed without its activations") };
        // MLP
        let dh_mid = match (&self.mlp, &s.mlp) {
            (
                Mlp::Dense { gate_proj, up_proj, down_proj },
                MlpSaved::Dense { gate: g, up: u, gate_y, up_y, act, down_y },
            ) => {
                let (gate, up, down) = (reg.linear(*gate_proj), reg.linear(*up_proj), reg.linear(*down_proj));
                tap.backward(*down_proj, down, act, down_y, dout)?;
                let dact = down.backward_input(dout)?;
                let (dg, du) = fused::swiglu_backward(g, u, &dact)?;
                tap.backward(*up_proj, up, &n2, up_y, &du)?;
                tap.backward(*gate_proj, gate, &n2, gate_y, &dg)?;
                // ∂/∂n2 = up + gate input gradients, summed inside the norm's backward
                let (dn2_up, dn2_gate) = (up.backward_input(&du)?, gate.backward_input(&dg)?);
                self.post_attention_layernorm.backward_add(&h_mid, &r2, &[&dn2_up, &dn2_gate], dout)?
            }
            (Mlp::Sparse(moe), MlpSaved::Sparse(saved)) => {
                tap.moe_backward(moe, &n2, saved.output(), dout)?;
                let dn2 = moe.backward(saved, dout)?;
                self.post_attention_layernorm.backward_add(&h_mid, &r2, &[&dn2], dout)?
            }
            _ => candle_core::bail!("internal: MLP cache of the other kind"),
        };
        // Attention
        let o_proj = reg.linear(self.o_proj);
        tap.backward(self.o_proj, o_proj, &a.attn, &a.o_y, &dh_mid)?;
        let dattn = o_proj.backward_input(&dh_mid)?;
        // (L, H·d) → dO (H, L, d) and delta = rowsum(dO∘O) with O the o_proj input, one pass
        let (do_, delta) = fused::attention_bwd_prep(&dattn, &a.attn, h)?;
        let spec = AttnSpec::causal(h / hkv, 1.0 / (d as f64).sqrt(), ts.mask);
        let (dq_rot, dk_rot, dv_h) =
            segmented_attention_backward(&a.q_rot, &a.k_rot, &a.v_h, &a.lse, &delta, &do_, ts.segments, |_| spec)?;
        // Inverse RoPE and the per-head norms, (H, L, d) → (L, H·d)
        let dq = self.q_norm.qk_rope_backward(&dq_rot, &a.q, &a.qr, ts.rope)?;
        let dk = self.k_norm.qk_rope_backward(&dk_rot, &a.k, &a.kr, ts.rope)?;
        let dv = dv_h.transpose(0, 1)?.contiguous()?.reshape((l, hkv * d))?;
        let (qp, kp, vp) = (reg.linear(self.q_proj), reg.linear(self.k_proj), reg.linear(self.v_proj));
        tap.backward(self.v_proj, vp, &a.n1, &a.v_y, &dv)?;
        tap.backward(self.k_proj, kp, &a.n1, &a.k_y, &dk)?;
        tap.backward(self.q_proj, qp, &a.n1, &a.q_y, &dq)?;
        let dn1 = [qp.backward_input(&dq)?, kp.backward_input(&dk)?, vp.backward_input(&dv)?];
        self.input_layernorm.backward_add(&s.x, &a.r1, &[&dn1[0], &dn1[1], &dn1[2]], &dh_mid)
    }
}

impl RmsNorm {
    /// q/k path of the attention: this per-head norm over `x` `[L, heads·d]`, then the text
    /// rotary → `([heads, L, d], rstd)` ([`fused::qk_norm_rope`]).
    fn qk_rope(&self, x: &Tensor, rope: &CosSin, heads: usize) -> Result<(Tensor, Tensor)> {
        fused::qk_norm_rope(x, self.weight(), &rope.cos, &rope.sin, heads, self.eps())
    }

    /// Backward of [`RmsNorm::qk_rope`]: `g` `[heads, L, d]` → `[L, heads·d]`.
    fn qk_rope_backward(&self, g: &Tensor, x: &Tensor, rstd: &Tensor, rope: &CosSin) -> Result<Tensor> {
        fused::qk_norm_rope_backward(g, x, rstd, self.weight(), &rope.cos, &rope.sin)
    }
}

/// The text model's weights.
#[derive(Debug)]
pub struct TextModel {
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}
