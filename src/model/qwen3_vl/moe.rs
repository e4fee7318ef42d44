//! Sparse mixture-of-experts MLP of Qwen3-VL-MoE (HF `modeling_qwen3_vl_moe.py`:
//! `Qwen3VLMoeTextSparseMoeBlock` = `Qwen3VLMoeTextTopKRouter` + `Qwen3VLMoeTextExperts`), on the
//! released fused-expert tensors, with a hand-written backward.
//!
//! `p = softmax(x·Gᵀ)`, the top-k experts by `p` with weights `p_k / Σ p_k` (`norm_topk_prob`),
//! `out = Σ_k w_k · (silu(x·GU[e]_gate) ⊙ x·GU[e]_up) · D[e]`. The (token, slot) pairs are
//! grouped by expert (a counting sort), each expert runs its two matmuls on its contiguous group,
//! and the weighted rows are added back per token: one pass over the experts, no per-token loop.

use candle_core::{bail, Result, Tensor};

use super::config::MoeShape;
use super::fused;
use super::ops::acc_dtype;
use crate::model::linear::matmul;
use crate::quant::{Format, WeightStats};

/// HF `Qwen3VLMoeTextSparseMoeBlock`: router and experts of one decoder layer.
#[derive(Debug)]
pub struct SparseMoeBlock {
    /// Router `mlp.gate.weight` `[E, H]`.
    gate: Tensor,
    /// `mlp.experts.gate_up_proj` `[E, H, 2I]`: `x · gate_up_proj[e]` = gate ‖ up.
    gate_up_proj: Tensor,
    /// `mlp.experts.down_proj` `[E, I, H]`.
    down_proj: Tensor,
    shape: MoeShape,
    /// Index of the decoder layer this block belongs to.
    layer: usize,
}

/// The router's choice for every token.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `x · gateᵀ` `[L, E]`, model dtype (HF `router_logits`).
    pub logits: Tensor,
    /// Softmax over the experts `[L, E]`, accumulation dtype.
    pub probs: Tensor,
    /// Chosen experts `[L, k]` u32, by descending probability (ties: lower expert first).
    pub ids: Tensor,
    /// Mixing weights `[L, k]`, model dtype: the top-k probabilities, renormalised to sum 1 when
    /// `norm_topk_prob`.
    pub weights: Tensor,
}

/// The (token, slot) pairs grouped by expert.
#[derive(Debug)]
struct Dispatch {
    /// Token of each grouped row, u32 `[L·k]`.
    tokens: Tensor,
    /// Pair `t·k + slot` of each grouped row, u32 `[L·k]`.
    pair_of_row: Tensor,
    /// Its inverse: grouped row of each pair, u32 `[L·k]`.
    row_of_pair: Tensor,
    /// `(expert, first row, rows)` of every expert that received a token, in expert order.
    groups: Vec<(usize, usize, usize)>,
}

impl Dispatch {
    /// Counting sort of the pairs by expert; within an expert, pairs stay in token order.
    fn new(ids: &Tensor, experts: usize) -> Result<Self> {
        let k = ids.dim(1)?;
        let dev = ids.device();
        let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let mut counts = vec![0usize; experts];
        for &e in &ids {
            match counts.get_mut(e as usize) {
                Some(c) => *c += 1,
                None => bail!("router chose expert {e} of {experts}"),
            }
        }
        let mut next = vec![0usize; experts];
        let mut groups = Vec::new();
        let mut start = 0;
        for (e, &n) in counts.iter().enumerate() {
            next[e] = start;
            if n > 0 {
                groups.push((e, start, n));
            }
            start += n;
        }
        let pairs = ids.len();
        let mut tokens = vec![0u32; pairs];
        let mut pair_of_row = vec![0u32; pairs];
        let mut row_of_pair = vec![0u32; pairs];
        for (pair, &e) in ids.iter().enumerate() {
            let row = next[e as usize];
            next[e as usize] += 1;
            tokens[row] = (pair / k) as u32;
            pair_of_row[row] = pair as u32;
            row_of_pair[pair] = row as u32;
        }
        Ok(Dispatch {
            tokens: Tensor::from_vec(tokens, pairs, dev)?,
            pair_of_row: Tensor::from_vec(pair_of_row, pairs, dev)?,
            row_of_pair: Tensor::from_vec(row_of_pair, pairs, dev)?,
            groups,
        })
    }
}

/// FP8 calibration of one layer's experts as ModelOpt 0.47 does it (`_QuantFusedExperts`): one
/// input amax per projection shared by all experts, one weight amax per expert and projection
/// (gate and up share one: the max over the whole `[H, 2I]` slice).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertsAmax {
    pub gate_up_input: f32,
    pub down_input: f32,
    /// Per expert.
    pub gate_up_weight: Vec<f32>,
    pub down_weight: Vec<f32>,
    /// (token, slot) pairs routed to each expert while observing.
    pub tokens_routed: Vec<u64>,
}

/// The two projections of an expert, each with its own input quantizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    GateUp,
    Down,
}

/// What [`SparseMoeBlock::backward`] needs from the forward.
#[derive(Debug)]
pub struct MoeSaved {
    /// The block's plain output `[L, H]` (its input is recomputed with the layer's attention).
    out: Tensor,
    routing: Routing,
    dispatch: Dispatch,
    /// Mixing weight of each grouped row `[L·k]`, model dtype.
    row_weights: Tensor,
    /// The gate and up halves of `x · gate_up_proj[e]`, grouped rows `[L·k, I]` each (the expert
    /// outputs are not kept: the router's gradient is taken through down_proj's input instead).
    gate: Tensor,
    up: Tensor,
}

impl MoeSaved {
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    pub fn output(&self) -> &Tensor {
        &self.out
    }
}

impl SparseMoeBlock {
    /// Decoder layer `layer`'s block: `gate` `[E, H]`, `gate_up_proj` `[E, H, 2I]`, `down_proj`
    /// `[E, I, H]`.
    pub fn new(layer: usize, gate: Tensor, gate_up_proj: Tensor, down_proj: Tensor, shape: MoeShape) -> Result<Self> {
        let (e, h) = gate.dims2()?;
        let (e2, h2, i2) = gate_up_proj.dims3()?;
        let (e3, i3, h3) = down_proj.dims3()?;
        if shape.top_k == 0 || shape.top_k > shape.experts {
            bail!("top-k {} must be between 1 and the {} experts", shape.top_k, shape.experts)
        }
        if [e, e2, e3] != [shape.experts; 3]
            || h2 != h
            || h3 != h
            || i2 != 2 * shape.intermediate
            || i3 != shape.intermediate
        {
            bail!(
                "expert shapes gate {:?}, gate_up_proj {:?}, down_proj {:?} do not fit {} experts of width {}",
                gate.dims(),
                gate_up_proj.dims(),
                down_proj.dims(),
                shape.experts,
                shape.intermediate
            )
        }
        Ok(SparseMoeBlock { gate, gate_up_proj, down_proj, shape, layer })
    }

    pub fn shape(&self) -> MoeShape {
        self.shape
    }

    /// Weights of all its experts, `E·(H·2I + I·H)`: ModelOpt's cost unit for the experts group
    /// (`_get_module_weight_numel`; the router is never quantized and not counted).
    pub fn expert_params(&self) -> u64 {
        (self.gate_up_proj.elem_count() + self.down_proj.elem_count()) as u64
    }

    /// ModelOpt's `active_moe` cost weight of the experts group: only `top_k` of the `E` experts
    /// run per token (`_auto_quantize_cost.py`).
    pub fn active_moe_cost_weight(&self) -> f64 {
        self.shape.top_k as f64 / self.shape.experts as f64
    }

    /// The decoder layer this block belongs to.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// HF `Qwen3VLMoeTextTopKRouter`: softmax in the accumulation dtype, top-k, renormalise.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let (dt, acc) = (x.dtype(), acc_dtype(x.dtype()));
        let logits = matmul(x, &self.gate.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(acc)?)?;
        // Stable descending sort: equal probabilities keep the lower expert first.
        let ids = probs.arg_sort_last_dim(false)?.narrow(1, 0, self.shape.top_k)?.contiguous()?;
        let top = probs.gather(&ids, 1)?;
        let weights = if self.shape.norm_topk_prob { top.broadcast_div(&top.sum_keepdim(1)?)? } else { top };
        Ok(Routing { logits, probs, ids, weights: weights.to_dtype(dt)? })
    }

    /// `x` `[L, H]` → `(out [L, H], routing, saved for backward when save)`.
    pub fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Routing, Option<MoeSaved>)> {
        self.forward_observed(x, save, &mut |_, _| Ok(()))
    }

    /// [`SparseMoeBlock::forward`], where `observe(e, act)` sees the down_proj input `[n, I]` of
    /// every expert `e` that received tokens (calibration).
    pub fn forward_observed(
        &self,
        x: &Tensor,
        save: bool,
        observe: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<(Tensor, Routing, Option<MoeSaved>)> {
        let routing = self.route(x)?;
        let dispatch = Dispatch::new(&routing.ids, self.shape.experts)?;
        // 1. Gather: the token of every (token, slot) pair, grouped by expert, [L·k, H]
        let xs = x.index_select(&dispatch.tokens, 0)?;
        // 2. Each expert's SwiGLU on its group, then its down_proj
        let mut outs = Vec::with_capacity(dispatch.groups.len());
        let (mut gates, mut ups) = (Vec::new(), Vec::new());
        for (&(e, _, _), (g, u, act)) in dispatch.groups.iter().zip(self.swiglu_groups(&xs, &dispatch)?) {
            observe(e, &act)?;
            outs.push(matmul(&act, &self.down_proj.get(e)?)?); // [n, H]
            if save {
                gates.push(g);
                ups.push(u);
            }
        }
        // 3. Mix: weight every row and add it to its token (HF `index_add_`)
        let row_weights = routing.weights.flatten_all()?.index_select(&dispatch.pair_of_row, 0)?;
        let mixed = Tensor::cat(&outs, 0)?.broadcast_mul(&row_weights.unsqueeze(1)?)?;
        drop(outs);
        let out = x.zeros_like()?.index_add(&dispatch.tokens, &mixed, 0)?;
        let saved = match save {
            true => Some(MoeSaved {
                out: out.clone(),
                routing: routing.clone(),
                dispatch,
                row_weights,
                gate: Tensor::cat(&gates, 0)?,
                up: Tensor::cat(&ups, 0)?,
            }),
            false => None,
        };
        Ok((out, routing, saved))
    }

    /// `(gate, up, silu(gate)·up)`, each `[n, I]`, of every group of grouped rows `xs` `[L·k, H]`.
    fn swiglu_groups(&self, xs: &Tensor, dispatch: &Dispatch) -> Result<Vec<(Tensor, Tensor, Tensor)>> {
        let i = self.shape.intermediate;
        let mut out = Vec::with_capacity(dispatch.groups.len());
        for &(e, start, n) in &dispatch.groups {
            let gu = matmul(&xs.narrow(0, start, n)?, &self.gate_up_proj.get(e)?)?; // [n, 2I]
            let (g, u) = (gu.narrow(1, 0, i)?.contiguous()?, gu.narrow(1, i, i)?.contiguous()?);
            let act = fused::swiglu(&g, &u)?;
            out.push((g, u, act));
        }
        Ok(out)
    }

    /// The fused expert weights: `gate_up_proj` `[E, H, 2I]` and `down_proj` `[E, I, H]`.
    pub fn expert_weights(&self) -> (&Tensor, &Tensor) {
        (&self.gate_up_proj, &self.down_proj)
    }

    /// Weight amax of every expert, as ModelOpt's `weight_only_quantize` gives them before any
    /// token is seen (so an expert no token reaches still has one); input amax 0.
    pub fn weight_amax(&self) -> Result<ExpertsAmax> {
        let per_expert = |w: &Tensor| -> Result<Vec<f32>> {
            w.abs()?.flatten_from(1)?.max(1)?.to_dtype(candle_core::DType::F32)?.to_vec1()
        };
        Ok(ExpertsAmax {
            gate_up_input: 0.0,
            down_input: 0.0,
            gate_up_weight: per_expert(&self.gate_up_proj)?,
            down_weight: per_expert(&self.down_proj)?,
            tokens_routed: vec![0; self.shape.experts],
        })
    }

    /// Folds one sample's block input `x` `[L, H]` into the input amax: gate_up sees every token,
    /// down_proj every routed (token, expert) pair before its mixing weight. A second pass over
    /// the experts with a host round trip per expert: `score-layers` calibrates inside the
    /// forward instead ([`SparseMoeBlock::forward_observed`]); the tests hold it to this.
    pub fn observe(&self, x: &Tensor, amax: &mut ExpertsAmax) -> Result<()> {
        let f32_max =
            |t: &Tensor| -> Result<f32> { t.abs()?.max_all()?.to_dtype(candle_core::DType::F32)?.to_scalar() };
        amax.gate_up_input = amax.gate_up_input.max(f32_max(x)?);
        let routing = self.route(x)?;
        let dispatch = Dispatch::new(&routing.ids, self.shape.experts)?;
        let xs = x.index_select(&dispatch.tokens, 0)?;
        for (&(e, _, n), (_, _, act)) in dispatch.groups.iter().zip(self.swiglu_groups(&xs, &dispatch)?) {
            amax.down_input = amax.down_input.max(f32_max(&act)?);
            amax.tokens_routed[e] += n as u64;
        }
        Ok(())
    }

    /// The block's output with its experts quantized as ModelOpt's `_QuantFusedExperts` does:
    /// each projection's input with the layer's shared input amax, each expert's weights with
    /// their own amax (gate and up together). The router is never quantized: it routes on `x`.
    pub fn forward_quantized(&self, x: &Tensor, format: &dyn Format, amax: &ExpertsAmax) -> Result<Tensor> {
        let weight = |w: &Tensor, amax: f32| format.quantize_weight(w, &WeightStats { amax });
        self.forward_with(
            x,
            &|e| weight(&self.gate_up_proj.get(e)?, amax.gate_up_weight[e]),
            &|e| weight(&self.down_proj.get(e)?, amax.down_weight[e]),
            &|x, projection| match projection {
                Projection::GateUp => format.quantize_input(x, amax.gate_up_input),
                Projection::Down => format.quantize_input(x, amax.down_input),
            },
        )
    }

    /// The block's output with expert `e`'s weights `gate_up(e)` `[H, 2I]` and `down(e)` `[I, H]`
    /// and each projection's input passed through `input` (the routing and the mixing as in
    /// [`SparseMoeBlock::forward`], the router on the plain `x`).
    pub fn forward_with(
        &self,
        x: &Tensor,
        gate_up: &dyn Fn(usize) -> Result<Tensor>,
        down: &dyn Fn(usize) -> Result<Tensor>,
        input: &dyn Fn(&Tensor, Projection) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let i = self.shape.intermediate;
        let routing = self.route(x)?;
        let dispatch = Dispatch::new(&routing.ids, self.shape.experts)?;
        let xs = input(&x.index_select(&dispatch.tokens, 0)?, Projection::GateUp)?;
        let mut outs = Vec::with_capacity(dispatch.groups.len());
        for &(e, start, n) in &dispatch.groups {
            let gu = matmul(&xs.narrow(0, start, n)?, &gate_up(e)?)?; // [n, 2I]
            let act = fused::swiglu(&gu.narrow(1, 0, i)?.contiguous()?, &gu.narrow(1, i, i)?.contiguous()?)?;
            outs.push(matmul(&input(&act, Projection::Down)?, &down(e)?)?); // [n, H]
        }
        let row_weights = routing.weights.flatten_all()?.index_select(&dispatch.pair_of_row, 0)?;
        let mixed = Tensor::cat(&outs, 0)?.broadcast_mul(&row_weights.unsqueeze(1)?)?;
        x.zeros_like()?.index_add(&dispatch.tokens, &mixed, 0)
    }

    /// ∂loss/∂x from ∂loss/∂out, through the experts and through the router's mixing weights
    /// (the choice of experts is piecewise constant and has no gradient).
    pub fn backward(&self, s: &MoeSaved, dout: &Tensor) -> Result<Tensor> {
        let (dt, acc) = (dout.dtype(), acc_dtype(dout.dtype()));
        let (l, k) = s.routing.ids.dims2()?;
        let d = &s.dispatch;
        // Experts: g = dout[token] · down_proj[e]ᵀ per grouped row [L·k, I], the gradient at
        // down_proj's input before the mixing weight w
        let dout_rows = dout.index_select(&d.tokens, 0)?;
        let mut g = Vec::with_capacity(d.groups.len());
        for &(e, start, n) in &d.groups {
            // [n, H] · [H, I]
            g.push(dout_rows.narrow(0, start, n)?.matmul(&self.down_proj.get(e)?.t()?)?);
        }
        let g = Tensor::cat(&g, 0)?;
        drop(dout_rows);
        // Router: ∂/∂w of a pair = ⟨dout[token], act · down_proj[e]⟩ = ⟨g, act⟩, back to [L, k]
        let act = fused::swiglu(&s.gate, &s.up)?;
        let dw_rows = (g.to_dtype(acc)? * act.to_dtype(acc)?)?.sum(1)?;
        drop(act);
        let dw = dw_rows.index_select(&d.row_of_pair, 0)?.reshape((l, k))?;
        // ... and back through the SwiGLU and gate_up_proj with the weight applied
        let dact = g.broadcast_mul(&s.row_weights.unsqueeze(1)?)?;
        let (dg, du) = fused::swiglu_backward(&s.gate, &s.up, &dact)?;
        let dgu = Tensor::cat(&[dg, du], 1)?; // [L·k, 2I]
        let mut dxs = Vec::with_capacity(d.groups.len());
        for &(e, start, n) in &d.groups {
            // [n, 2I] · [2I, H]
            dxs.push(dgu.narrow(0, start, n)?.matmul(&self.gate_up_proj.get(e)?.t()?)?);
        }
        let dx_experts = dout.zeros_like()?.index_add(&d.tokens, &Tensor::cat(&dxs, 0)?, 0)?;
        let probs = &s.routing.probs;
        let top = probs.gather(&s.routing.ids, 1)?;
        // w = p/Σp ⇒ ∂/∂p_j = (dw_j − Σ_k w_k·dw_k) / Σp
        let dtop = if self.shape.norm_topk_prob {
            let sum = top.sum_keepdim(1)?;
            let w = top.broadcast_div(&sum)?;
            dw.broadcast_sub(&(&w * &dw)?.sum_keepdim(1)?)?.broadcast_div(&sum)?
        } else {
            dw
        };
        let dprobs = probs.zeros_like()?.scatter_add(&s.routing.ids, &dtop, 1)?; // [L, E]
                                                                                 // Softmax: ∂/∂z = p ⊙ (dp − ⟨p, dp⟩)
        let dlogits = (probs * dprobs.broadcast_sub(&(probs * &dprobs)?.sum_keepdim(1)?)?)?;
        let dx_router = dlogits.to_dtype(dt)?.matmul(&self.gate)?;
        dx_experts + dx_router
    }
}
