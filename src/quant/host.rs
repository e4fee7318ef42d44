//! Host-side plumbing for formats whose numerics are plain `f32` slice functions: the tensor is
//! read as contiguous `f32` (any float dtype, any device), transformed on the host, and written
//! back in its own dtype and device.
//!
//! Casting back rounds to nearest even, as torch's `.to(dtype)` and CUDA's `__float2bfloat16`
//! do in ModelOpt. On a CUDA tensor this costs a device round trip per call: correct, not fast;
//! formats that run in the inner loop on GPUs get a kernel of their own (FP8 has one).

use candle_core::{DType, Device, Result, Tensor};

/// The tensor's values as f32 on the host, flattened in row-major order.
pub fn to_f32_vec(x: &Tensor) -> Result<Vec<f32>> {
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Applies `f` to the tensor's values, flattened in row-major order; `dims` is the shape.
pub fn map_f32(x: &Tensor, f: impl FnOnce(&mut [f32], &[usize])) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let mut values = to_f32_vec(x)?;
    f(&mut values, &dims);
    Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?.to_dtype(x.dtype())?.to_device(x.device())
}

/// Runs a CPU-only tensor op on a tensor of any device: a CUDA tensor is copied to the host and
/// the result back.
pub fn on_host(x: &Tensor, op: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.device().is_cpu() {
        return op(x);
    }
    op(&x.to_device(&Device::Cpu)?)?.to_device(x.device())
}

/// The number of rows when a tensor of shape `dims` is viewed as `[rows, last dim]`.
pub fn rows_of_last_dim(dims: &[usize]) -> (usize, usize) {
    let cols = dims.last().copied().unwrap_or(1).max(1);
    (dims.iter().product::<usize>() / cols, cols)
}

/// The number of rows when a tensor of shape `dims` is viewed as `[dim 0, rest]` (per output
/// channel, ModelOpt's `axis: 0`).
pub fn rows_of_first_dim(dims: &[usize]) -> (usize, usize) {
    let rows = dims.first().copied().unwrap_or(1).max(1);
    (rows, dims.iter().product::<usize>() / rows)
}

/// Splits `values` into consecutive chunks of `len` and calls `f` with each chunk and its
/// max |v|: the shape of every per-channel, per-token and per-block max calibration.
pub fn for_each_chunk_amax(values: &mut [f32], len: usize, mut f: impl FnMut(&mut [f32], f32)) {
    for chunk in values.chunks_mut(len.max(1)) {
        let amax = max_abs(chunk);
        f(chunk, amax);
    }
}

/// max |v| over a slice, NaN ignored (as `torch.amax` of `abs` would not; callers check NaN
/// separately where it matters).
pub fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, v| m.max(v.abs()))
}
