//! Text decoder (HF `Qwen3VLTextModel`): Qwen3 layers with per-head q/k RMSNorm, interleaved
//! MRoPE, causal GQA attention and a SwiGLU MLP; each with a forward that can keep what its
//! hand-written backward needs.

use candle_core::{Result, Tensor};

use super::ops::{attention_backward, attention_forward, swiglu, swiglu_backward, AttnSpec, CausalMask, RmsNorm};
use super::rope::CosSin;
use super::{tapped, Registry};
use crate::model::{LayerId, Tap};

/// Per-sample text inputs shared by all layers.
pub struct TextSample<'a> {
    pub rope: &'a CosSin,
    pub mask: &'a CausalMask,
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
    pub gate_proj: LayerId,
    pub up_proj: LayerId,
    pub down_proj: LayerId,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What a decoder layer keeps for its backward.
pub struct DecoderLayerSaved {
    x: Tensor,
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
    h_mid: Tensor,
    r2: Tensor,
    n2: Tensor,
    gate: Tensor,
    up: Tensor,
    gate_y: Tensor,
    up_y: Tensor,
    act: Tensor,
    down_y: Tensor,
}

impl DecoderLayer {
    pub fn forward(
        &self,
        x: &Tensor,
        ts: &TextSample,
        reg: &Registry,
        tap: &mut dyn Tap,
        save: bool,
    ) -> Result<(Tensor, Option<DecoderLayerSaved>)> {
        let l = x.dim(0)?;
        let (h, hkv, d) = (self.heads, self.kv_heads, self.head_dim);
        // 1. Projections
        let (n1, r1) = self.input_layernorm.forward(x)?;
        let (q, q_y) = tapped(reg, self.q_proj, &n1, tap, save)?;
        let (k, k_y) = tapped(reg, self.k_proj, &n1, tap, save)?;
        let (v, v_y) = tapped(reg, self.v_proj, &n1, tap, save)?;
        // 2. Per-head RMSNorm on (L·H, d), RoPE on (1, L, H, d), then (H, L, d)
        let (qn, qr) = self.q_norm.forward(&q.reshape((l * h, d))?)?;
        let (kn, kr) = self.k_norm.forward(&k.reshape((l * hkv, d))?)?;
        let q_rot = ts.rope.apply_thd(&qn.reshape((1, l, h, d))?)?.reshape((l, h, d))?.transpose(0, 1)?.contiguous()?;
        let k_rot =
            ts.rope.apply_thd(&kn.reshape((1, l, hkv, d))?)?.reshape((l, hkv, d))?.transpose(0, 1)?.contiguous()?;
        let v_h = v.reshape((l, hkv, d))?.transpose(0, 1)?.contiguous()?;
        // 3. Causal GQA attention, (H, L, d) → (L, H·d) → o_proj, residual
        let spec = AttnSpec::causal(h / hkv, 1.0 / (d as f64).sqrt(), ts.mask);
        let (o, lse) = attention_forward(&q_rot, &k_rot, &v_h, &spec)?;
        let attn = o.transpose(0, 1)?.contiguous()?.reshape((l, h * d))?;
        let (a, o_y) = tapped(reg, self.o_proj, &attn, tap, save)?;
        let h_mid = (x + a)?;
        // 4. SwiGLU MLP, residual
        let (n2, r2) = self.post_attention_layernorm.forward(&h_mid)?;
        let (gate, gate_y) = tapped(reg, self.gate_proj, &n2, tap, save)?;
        let (up, up_y) = tapped(reg, self.up_proj, &n2, tap, save)?;
        let act = swiglu(&gate, &up)?;
        let (down, down_y) = tapped(reg, self.down_proj, &act, tap, save)?;
        let out = (&h_mid + down)?;
        let saved = save.then(|| DecoderLayerSaved {
            x: x.clone(),
            r1,
            n1,
            q,
            k,
            q_y,
            k_y,
            v_y,
            qr,
            kr,
            q_rot,
            k_rot,
            v_h,
            lse,
            attn,
            o_y,
            h_mid,
            r2,
            n2,
            gate,
            up,
            gate_y,
            up_y,
            act,
            down_y,
        });
        Ok((out, saved))
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
        // MLP
        let (gate, up, down) = (reg.linear(self.gate_proj), reg.linear(self.up_proj), reg.linear(self.down_proj));
        tap.backward(self.down_proj, down, &s.act, &s.down_y, dout)?;
        let dact = down.backward_input(dout)?;
        let (dg, du) = swiglu_backward(&s.gate, &s.up, &dact)?;
        tap.backward(self.up_proj, up, &s.n2, &s.up_y, &du)?;
        tap.backward(self.gate_proj, gate, &s.n2, &s.gate_y, &dg)?;
        let dn2 = (up.backward_input(&du)? + gate.backward_input(&dg)?)?;
        let dh_mid = (dout + self.post_attention_layernorm.backward(&s.h_mid, &s.r2, &dn2)?)?;
        // Attention
        let o_proj = reg.linear(self.o_proj);
        tap.backward(self.o_proj, o_proj, &s.attn, &s.o_y, &dh_mid)?;
        let dattn = o_proj.backward_input(&dh_mid)?;
        let do_ = dattn.reshape((l, h, d))?.transpose(0, 1)?.contiguous()?;
        let o = s.attn.reshape((l, h, d))?.transpose(0, 1)?.contiguous()?;
        let spec = AttnSpec::causal(h / hkv, 1.0 / (d as f64).sqrt(), ts.mask);
        let (dq_rot, dk_rot, dv_h) = attention_backward(&s.q_rot, &s.k_rot, &s.v_h, &o, &s.lse, &do_, &spec)?;
        // Inverse RoPE on (1, H, L, d), back to (L·H, d), through the per-head norms
        let unrotate = |t: &Tensor, heads: usize| -> Result<Tensor> {
            ts.rope
                .unapply_htd(&t.reshape((1, heads, l, d))?)?
                .reshape((heads, l, d))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((l * heads, d))
        };
        let dq = self.q_norm.backward(&s.q.reshape((l * h, d))?, &s.qr, &unrotate(&dq_rot, h)?)?.reshape((l, h * d))?;
        let dk =
            self.k_norm.backward(&s.k.reshape((l * hkv, d))?, &s.kr, &unrotate(&dk_rot, hkv)?)?.reshape((l, hkv * d))?;
        let dv = dv_h.transpose(0, 1)?.contiguous()?.reshape((l, hkv * d))?;
        let (qp, kp, vp) = (reg.linear(self.q_proj), reg.linear(self.k_proj), reg.linear(self.v_proj));
        tap.backward(self.v_proj, vp, &s.n1, &s.v_y, &dv)?;
        tap.backward(self.k_proj, kp, &s.n1, &s.k_y, &dk)?;
        tap.backward(self.q_proj, qp, &s.n1, &s.q_y, &dq)?;
        let dn1 = ((qp.backward_input(&dq)? + kp.backward_input(&dk)?)? + vp.backward_input(&dv)?)?;
        dh_mid + self.input_layernorm.backward(&s.x, &s.r1, &dn1)?
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
