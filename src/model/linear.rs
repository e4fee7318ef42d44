//! The quantizable affine layer: `y = x Wᵀ + b`.

use candle_core::{DType, Result, Tensor, D};

/// The longest inner dimension candle's CPU matmul (the gemm crate) sums in one block. Longer
/// ones it splits into blocks sized from the CPU's L1 cache (gemm-common `kernel_params`: at
/// least 512 terms, 512 on a 32 KiB 8-way L1, 768 on a 48 KiB 12-way one), so the rounding of an
/// f32 product then depends on the machine.
const GEMM_MIN_BLOCK: usize = 512;

/// `a · b` (candle `matmul` shapes) with the same bits on every x86-64 machine with FMA: an f32
/// product on the CPU whose inner dimension is longer than [`GEMM_MIN_BLOCK`] (the patch
/// embedding's 1536, attention over long sequences) is accumulated in f64 and rounded once.
/// Other products, dtypes and devices: candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && a.dim(D::Minus1)? > GEMM_MIN_BLOCK {
        return a.to_dtype(DType::F64)?.matmul(&b.to_dtype(DType::F64)?)?.to_dtype(DType::F32);
    }
    a.matmul(b)
}

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
        let y = matmul(x, &weight.t()?)?;
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
