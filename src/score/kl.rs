//! ModelOpt's `kl_div` score: `Σ_positions KL(P_unquantized ‖ P_group-quantized)`, with only
//! one group quantized at a time. ModelOpt runs a full forward per group and format; we restart
//! each one from the cached activation at the group's first layer (`Qwen3VL::forward_from`).

use candle_core::{DType, Result, Tensor, D};

use crate::model::{LayerId, Linear, Tap};

use super::gradient::LayerQuant;

/// Replaces the outputs of the active group's layers with their fake-quantized outputs.
pub struct GroupQuantTap<'a> {
    pub quant: &'a LayerQuant<'a>,
    /// Layer ids of the active group.
    pub members: &'a [LayerId],
    /// Active format index.
    pub format: usize,
}

impl Tap for GroupQuantTap<'_> {
    fn forward(&mut self, id: LayerId, linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.members.contains(&id) {
            return Ok(None);
        }
        self.quant.quantized_output(id, self.format, linear, x).map(Some)
    }
}

/// log-softmax over the last dim, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// `Σ exp(lp) (lp − lq)` over all positions and classes (torch's `kl_div(lq, lp, log_target=True,
/// reduction="sum")`), as an f32 scalar tensor.
pub fn kl_sum(log_p: &Tensor, log_q: &Tensor) -> Result<Tensor> {
    (log_p.exp()? * (log_p - log_q)?)?.sum_all()
}
