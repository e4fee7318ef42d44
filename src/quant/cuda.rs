//! CUDA launches of `kernels/quant.cu` (feature `cuda`); the arithmetic is that of `fp8.rs` and
//! `sensitivity.rs`. Launches take plain arguments, so this module depends on no op of ours (the
//! ops call in here, never the reverse).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};
use half::{bf16, f16};

const QUANT_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/quant.fatbin"));
const MODULE: &str = "qsens_quant";

/// `x → rne_e4m3(clamp(x · scale, ±448)) · inv_scale` elementwise (`fp8::FakeQuantE4M3`).
pub fn fake_quant_e4m3(
    scale: f32,
    inv_scale: f32,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fake-quant-e4m3: input must be contiguous");
    };
    let dev = storage.device();
    let out = match &storage.slice {
        CudaStorageSlice::F32(s) => {
            launch::<f32>(dev, "fake_quant_e4m3_f32", &s.slice(start..end), end - start, scale, inv_scale)?
        }
        CudaStorageSlice::BF16(s) => {
            launch::<bf16>(dev, "fake_quant_e4m3_bf16", &s.slice(start..end), end - start, scale, inv_scale)?
        }
        CudaStorageSlice::F16(s) => {
            launch::<f16>(dev, "fake_quant_e4m3_f16", &s.slice(start..end), end - start, scale, inv_scale)?
        }
        _ => candle_core::bail!("fake-quant-e4m3: unsupported dtype {:?} on CUDA", storage.dtype()),
    };
    Ok((out, layout.shape().clone()))
}

/// `x → rne_e4m3(clamp(x / scale, ±448)) · scale` elementwise in one kernel
/// (`fp8::ServedFakeQuantE4M3`).
pub fn served_fake_quant_e4m3(scale: f32, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("served-fake-quant-e4m3: input must be contiguous");
    };
    let dev = storage.device();
    let n = end - start;
    let out = match &storage.slice {
        CudaStorageSlice::F32(s) => {
            launch_with::<f32>(dev, "served_fake_quant_e4m3_f32", &s.slice(start..end), n, &[scale])?
        }
        CudaStorageSlice::BF16(s) => {
            launch_with::<bf16>(dev, "served_fake_quant_e4m3_bf16", &s.slice(start..end), n, &[scale])?
        }
        CudaStorageSlice::F16(s) => {
            launch_with::<f16>(dev, "served_fake_quant_e4m3_f16", &s.slice(start..end), n, &[scale])?
        }
        _ => candle_core::bail!("served-fake-quant-e4m3: unsupported dtype {:?} on CUDA", storage.dtype()),
    };
    Ok((out, layout.shape().clone()))
}

fn launch<T>(
    dev: &CudaDevice,
    kernel: &str,
    src: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    n: usize,
    scale: f32,
    inv_scale: f32,
) -> Result<CudaStorage>
where
    T: DeviceRepr + candle_core::cuda_backend::CudaDType,
{
    launch_with(dev, kernel, src, n, &[scale, inv_scale])
}

/// An elementwise kernel `(const T *x, T *y, size_t n, float params...)` over `n` values.
fn launch_with<T>(
    dev: &CudaDevice,
    kernel: &str,
    src: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
    n: usize,
    params: &[f32],
) -> Result<CudaStorage>
where
    T: DeviceRepr + candle_core::cuda_backend::CudaDType,
{
    let func = dev.get_or_load_custom_image(kernel, MODULE, QUANT_IMAGE)?;
    // SAFETY: every element is written by the kernel below.
    let dst = unsafe { dev.alloc::<T>(n)? };
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = func.builder();
    b.arg(src);
    b.arg(&dst);
    b.arg(&n);
    for p in params {
        b.arg(p);
    }
    // SAFETY: argument types match the kernels' signatures (ptr, ptr, size_t, then one float per
    // parameter: `fake_quant_e4m3_*` take scale and inv_scale, `served_fake_quant_e4m3_*` scale).
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
}

/// Fused gradient score (`sensitivity.rs`): partial sums per block, then one block adds them.
pub fn gradient_score(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let range = |l: &Layout| {
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("gradient score: non-contiguous input".into()))
    };
    let ((a0, a1), (b0, b1), (c0, c1)) = (range(l1)?, range(l2)?, range(l3)?);
    let n = a1 - a0;
    let dev = s1.device();
    const THREADS: u32 = 512;
    let blocks = (n.div_ceil(THREADS as usize * 8)).clamp(1, 1024) as u32;
    // SAFETY: every partial is written by stage 1.
    let partials = unsafe { dev.alloc::<f32>(blocks as usize)? };
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    macro_rules! stage1 {
        ($kernel:literal, $g:expr, $y:expr, $q:expr) => {{
            let func = dev.get_or_load_custom_image($kernel, MODULE, QUANT_IMAGE)?;
            let (g, y, q) = ($g.slice(a0..a1), $y.slice(b0..b1), $q.slice(c0..c1));
            let mut b = func.builder();
            b.arg(&g);
            b.arg(&y);
            b.arg(&q);
            b.arg(&n);
            b.arg(&partials);
            // SAFETY: argument types match (3 pointers, size_t, float*).
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match (&s1.slice, &s2.slice, &s3.slice) {
        (CudaStorageSlice::F32(g), CudaStorageSlice::F32(y), CudaStorageSlice::F32(q)) => {
            stage1!("grad_score_f32", g, y, q)
        }
        (CudaStorageSlice::BF16(g), CudaStorageSlice::BF16(y), CudaStorageSlice::BF16(q)) => {
            stage1!("grad_score_bf16", g, y, q)
        }
        (CudaStorageSlice::F16(g), CudaStorageSlice::F16(y), CudaStorageSlice::F16(q)) => {
            stage1!("grad_score_f16", g, y, q)
        }
        _ => candle_core::bail!("gradient score: unsupported dtype {:?} on CUDA", s1.dtype()),
    }
    // SAFETY: written by stage 2.
    let out = unsafe { dev.alloc::<f32>(1)? };
    let func = dev.get_or_load_custom_image("sum_partials", MODULE, QUANT_IMAGE)?;
    let nb = blocks as usize;
    let mut b = func.builder();
    b.arg(&partials);
    b.arg(&nb);
    b.arg(&out);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument types match (float*, size_t, float*).
    unsafe { b.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(1)))
}

/// `slot = max(slot, max |x|)` on the device (`fp8::update_amax`).
pub fn amax_update(slot: usize, acc: &mut CudaStorage, la: &Layout, x: &CudaStorage, lx: &Layout) -> Result<()> {
    let (Some((a0, _)), Some((x0, x1))) = (la.contiguous_offsets(), lx.contiguous_offsets()) else {
        candle_core::bail!("amax-update: inputs must be contiguous");
    };
    let dev = x.device().clone();
    let n = x1 - x0;
    const THREADS: u32 = 256;
    let blocks = (n.div_ceil(THREADS as usize * 8)).clamp(1, 1024) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let CudaStorageSlice::F32(acc) = &mut acc.slice else { candle_core::bail!("amax-update: amax must be f32") };
    let mut target = acc.slice_mut(a0 + slot..a0 + slot + 1);
    macro_rules! launch {
        ($kernel:literal, $s:expr) => {{
            let func = dev.get_or_load_custom_image($kernel, MODULE, QUANT_IMAGE)?;
            let src = $s.slice(x0..x1);
            let mut b = func.builder();
            b.arg(&src);
            b.arg(&n);
            b.arg(&mut target);
            // SAFETY: argument types match (pointer, size_t, float*).
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match &x.slice {
        CudaStorageSlice::F32(s) => launch!("amax_update_f32", s),
        CudaStorageSlice::BF16(s) => launch!("amax_update_bf16", s),
        CudaStorageSlice::F16(s) => launch!("amax_update_f16", s),
        _ => candle_core::bail!("amax-update: unsupported dtype {:?} on CUDA", x.dtype()),
    }
    Ok(())
}

/// NVFP4 fake quantization along the last dim with a known global scale, one thread per
/// 16-block (`nvfp4::FakeQuantNvfp4`).
pub fn fake_quant_nvfp4(global_scale: f32, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fake-quant-nvfp4: input must be contiguous");
    };
    let n = end - start;
    let cols = layout.shape().dims().last().copied().unwrap_or(1).max(1);
    let rows = n / cols;
    let dev = storage.device();
    fn go<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        dev: &CudaDevice,
        kernel: &str,
        src: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
        rows: usize,
        cols: usize,
        global_scale: f32,
    ) -> Result<CudaStorage> {
        let func = dev.get_or_load_custom_image(kernel, MODULE, QUANT_IMAGE)?;
        // SAFETY: every element is written by the kernel below (every block of every row).
        let dst = unsafe { dev.alloc::<T>(rows * cols)? };
        let blocks = (rows * cols.div_ceil(16)).div_ceil(256).clamp(1, 65_535 * 8) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        b.arg(src);
        b.arg(&dst);
        b.arg(&rows);
        b.arg(&cols);
        b.arg(&global_scale);
        // SAFETY: argument types match `fake_quant_nvfp4_*` (ptr, ptr, size_t, size_t, float).
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
    let out = match &storage.slice {
        CudaStorageSlice::F32(s) => {
            go::<f32>(dev, "fake_quant_nvfp4_f32", &s.slice(start..end), rows, cols, global_scale)?
        }
        CudaStorageSlice::BF16(s) => {
            go::<bf16>(dev, "fake_quant_nvfp4_bf16", &s.slice(start..end), rows, cols, global_scale)?
        }
        CudaStorageSlice::F16(s) => {
            go::<f16>(dev, "fake_quant_nvfp4_f16", &s.slice(start..end), rows, cols, global_scale)?
        }
        _ => candle_core::bail!("fake-quant-nvfp4: unsupported dtype {:?} on CUDA", storage.dtype()),
    };
    Ok((out, layout.shape().clone()))
}
