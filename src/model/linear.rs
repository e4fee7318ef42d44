//! The quantizable affine layer: `y = x Wᵀ + b`.

use candle_core::{Result, Tensor};

/// A Linear layer (weight `[out, in]`, optional bias `[out]`), in the model's compute dtype.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight's shape in the checkpoint when it is not `[out, in]` (the Conv3d patch
    /// embedding's `[out, C, T, P, P]`): block formats quantize along its last axis.
    checkpoint_shape: Option<Vec<usize>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias, checkpoint_shape: None }
    }

    /// A layer whose weight the checkpoint stores as `shape` (same elements, row-major).
    pub fn with_checkpoint_shape(self, shape: &[usize]) -> Self {
        Linear { checkpoint_shape: Some(shape.to_vec()), ..self }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The weight's shape in the checkpoint (`[out, in]` unless built otherwise).
    pub fn checkpoint_shape(&self) -> &[usize] {
        self.checkpoint_shape.as_deref().unwrap_or(self.weight.dims())
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x Wᵀ + b` for a 2-D `x` of shape `[rows, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &self.weight)
    }

    /// `x Ŵᵀ + b` with a substitute weight of the same shape (e.g. fake-quantized).
    pub fn forward_with(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// ∂loss/∂x = dy W for `dy` of shape `[rows, out]`.
    pub fn backward_input(&self, dy: &Tensor) -> Result<Tensor> {
        dy.matmul(&self.weight)
    }
}
