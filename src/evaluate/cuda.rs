//! CUDA launch of `kernels/metrics.cu` (feature `cuda`): all of one recipe's per-row metrics
//! against the unquantized logits in one kernel, where the candle-op path of
//! [`super::metrics`] runs ~20 kernels and three host copies per block of rows.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{DType, Device, Result, Storage, Tensor};

const METRICS_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/metrics.fatbin"));
const MODULE: &str = "qsens_metrics";

/// Per row of `base` and `logits` (both f32 `[rows, vocab]` on one CUDA device) and its target
/// token (`-1`: none): `[KL, −log q[target] (0 without a target), top-1 of base, top-1 of
/// logits]` in f64, on the host.
pub fn row_metrics(base: &Tensor, logits: &Tensor, targets: &[i32]) -> Result<Vec<[f64; 4]>> {
    let (rows, vocab) = base.dims2()?;
    if logits.dims() != [rows, vocab] || targets.len() != rows {
        candle_core::bail!(
            "row metrics: shapes {:?}, {:?} and {} targets differ",
            base.dims(),
            logits.dims(),
            targets.len()
        );
    }
    if base.dtype() != DType::F32 || logits.dtype() != DType::F32 {
        candle_core::bail!("row metrics: the CUDA kernel takes f32 logits, not {:?}", logits.dtype());
    }
    let Device::Cuda(dev) = base.device() else { candle_core::bail!("row metrics: logits are not on a CUDA device") };
    let vocab_u32 = u32::try_from(vocab).map_err(|_| candle_core::Error::Msg(format!("vocabulary of {vocab}")))?;
    let (base, logits) = (base.contiguous()?, logits.contiguous()?);
    let (bs, bl) = base.storage_and_layout();
    let (ls, ll) = logits.storage_and_layout();
    let (Storage::Cuda(bs), Storage::Cuda(ls)) = (&*bs, &*ls) else {
        candle_core::bail!("row metrics: logits are not CUDA tensors")
    };
    let (CudaStorageSlice::F32(ps), CudaStorageSlice::F32(qs)) = (&bs.slice, &ls.slice) else {
        candle_core::bail!("row metrics: logits are not f32")
    };
    let range = |l: &candle_core::Layout| l.contiguous_offsets().expect("made contiguous above");
    let ((p0, p1), (q0, q1)) = (range(bl), range(ll));
    let (p, q) = (ps.slice(p0..p1), qs.slice(q0..q1));
    let targets = dev.clone_htod(targets)?;
    // SAFETY: the kernel writes all 4 values of every row.
    let out = unsafe { dev.alloc::<f64>(4 * rows)? };
    let func = dev.get_or_load_custom_image("row_metrics_f32", MODULE, METRICS_IMAGE)?;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
    let mut b = func.builder();
    b.arg(&p);
    b.arg(&q);
    b.arg(&targets);
    b.arg(&vocab_u32);
    b.arg(&out);
    // SAFETY: argument types match (float*, float*, int32*, uint32, double*); 512 threads per block.
    unsafe { b.launch(cfg) }.w()?;
    let flat = dev.clone_dtoh(&out)?;
    Ok(flat.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect())
}
