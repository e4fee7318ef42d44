//! CUDA launch of `kernels/metrics.cu`'s `row_kl_sums` (feature `cuda`), the kernel of
//! [`super::kl_fused::RowKlSums`].

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

const METRICS_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/metrics.fatbin"));
const MODULE: &str = "qsens_metrics";

/// f64 `[rows, 4]` per row of logits `z` (f32 or bf16) and probabilities `p` (f32).
pub fn row_kl_sums(z: &CudaStorage, lz: &Layout, p: &CudaStorage, lp: &Layout) -> Result<(CudaStorage, Shape)> {
    let (rows, vocab) = lz.shape().dims2()?;
    if lp.shape().dims() != [rows, vocab] {
        candle_core::bail!("row-kl-sums: logits {:?}, probabilities {:?}", lz.shape(), lp.shape());
    }
    let (Some((z0, z1)), Some((p0, p1))) = (lz.contiguous_offsets(), lp.contiguous_offsets()) else {
        candle_core::bail!("row-kl-sums: inputs must be contiguous");
    };
    let vocab = u32::try_from(vocab).map_err(|_| candle_core::Error::Msg(format!("vocabulary of {vocab}")))?;
    let dev = z.device();
    let CudaStorageSlice::F32(ps) = &p.slice else { candle_core::bail!("row-kl-sums: probabilities must be f32") };
    let p = ps.slice(p0..p1);
    // SAFETY: the kernel writes all 4 values of every row.
    let out = unsafe { dev.alloc::<f64>(4 * rows)? };
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
    macro_rules! launch {
        ($kernel:literal, $z:expr) => {{
            let func = dev.get_or_load_custom_image($kernel, MODULE, METRICS_IMAGE)?;
            let z = $z.slice(z0..z1);
            let mut b = func.builder();
            b.arg(&z);
            b.arg(&p);
            b.arg(&vocab);
            b.arg(&out);
            // SAFETY: argument types match (T*, float*, uint32, double*); 512 threads per block.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match &z.slice {
        CudaStorageSlice::F32(s) => launch!("row_kl_sums_f32", s),
        CudaStorageSlice::BF16(s) => launch!("row_kl_sums_bf16", s),
        _ => candle_core::bail!("row-kl-sums: unsupported dtype {:?} on CUDA", z.dtype()),
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, 4))))
}
