//! CUDA launches of `kernels/fp8.cu` (feature `cuda`). The arithmetic is that of `fp8.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};
use half::{bf16, f16};

use super::fp8::FakeQuantE4M3;

const FP8_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fp8.ptx"));
const MODULE: &str = "qsens_fp8";

pub fn fake_quant_e4m3(op: &FakeQuantE4M3, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fake-quant-e4m3: input must be contiguous");
    };
    let dev = storage.device();
    let out = match &storage.slice {
        CudaStorageSlice::F32(s) => launch::<f32>(dev, "fake_quant_e4m3_f32", &s.slice(start..end), end - start, op)?,
        CudaStorageSlice::BF16(s) => launch::<bf16>(dev, "fake_quant_e4m3_bf16", &s.slice(start..end), end - start, op)?,
        CudaStorageSlice::F16(s) => launch::<f16>(dev, "fake_quant_e4m3_f16", &s.slice(start..end), end - start, op)?,
        _ => candle_core::bail!("fake-quant-e4m3: unsupported dtype {:?} on CUDA", storage.dtype()),
    };
    Ok((out, layout.shape().clone()))
}

fn launch<T>(
    dev: &CudaDevice,
    kernel: &str,
    src: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    n: usize,
    op: &FakeQuantE4M3,
) -> Result<CudaStorage>
where
    T: DeviceRepr + candle_core::cuda_backend::CudaDType,
{
    let func = dev.get_or_load_custom_func(kernel, MODULE, FP8_PTX)?;
    // SAFETY: every element is written by the kernel below.
    let dst = unsafe { dev.alloc::<T>(n)? };
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = func.builder();
    b.arg(src);
    b.arg(&dst);
    b.arg(&n);
    b.arg(&op.scale);
    b.arg(&op.inv_scale);
    // SAFETY: argument types match the kernel signature (ptr, ptr, size_t, float, float).
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
}
