//! The compute device: parsing `--device`, capping how much GPU memory a run may take, and telling
//! a GPU out-of-memory fault from other errors so the stages can report it in one line.
use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("invalid device '{s}' (expected cuda:N)"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("device '{s}' requested, but this qsens was built without CUDA (rebuild with --features cuda, see docs/cuda.md)");
            }
            Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
        }
        other => bail!("unknown device '{other}' (expected cpu, cuda or cuda:N)"),
    }
}

/// Free and total memory of a CUDA device, in bytes (`None` on the CPU).
pub fn memory_info(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
        return Some((free as u64, total as u64));
    }
    let _ = device;
    None
}

/// Device memory held back from the run, so that it can use at most the limit it was given
/// (`--gpu-memory-limit`): the rest of the card is allocated once, up front, and kept until the
/// run ends. Allocations beyond the limit then fail as they would on a smaller card.
pub struct MemoryLimit {
    #[cfg(feature = "cuda")]
    _ballast: candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
}

impl MemoryLimit {
    /// Leaves `limit_bytes` of the card's total memory (as `nvidia-smi` counts it, every process
    /// together) to the run.
    pub fn new(device: &Device, limit_bytes: u64) -> Result<MemoryLimit> {
        let Some((free, total)) = memory_info(device) else {
            bail!("--gpu-memory-limit needs a CUDA device (--device cuda)");
        };
        ensure!(limit_bytes < total, "--gpu-memory-limit {} is not below the card's {}", gib(limit_bytes), gib(total));
        let ballast = total - limit_bytes;
        ensure!(
            ballast <= free,
            "--gpu-memory-limit {}: the card has {} in use already (of {}), more than that limit",
            gib(limit_bytes),
            gib(total - free),
            gib(total)
        );
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            // Uninitialised: the bytes are never read, only held.
            let ballast = unsafe { dev.alloc::<u8>(ballast as usize) }
                .with_context(|| format!("holding back {} of GPU memory for --gpu-memory-limit", gib(ballast)))?;
            return Ok(MemoryLimit { _ballast: ballast });
        }
        unreachable!("memory_info is Some only for a CUDA device ({ballast} bytes to hold back)")
    }
}

/// The most device memory the run's tensors held, phase by phase. candle allocates from the
/// device's default stream-ordered pool (`cuMemAllocAsync`); its high-water mark counts every
/// tensor, even one that lived for a single kernel, and nothing else (not the CUDA context, not
/// cuBLAS' workspace), so the phase that sets a run's peak can be told from the others.
pub struct PoolWatermark {
    #[cfg(feature = "cuda")]
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    #[cfg(feature = "cuda")]
    pool: candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool,
}

impl PoolWatermark {
    /// `None` on the CPU.
    pub fn new(device: &Device) -> Result<Option<PoolWatermark>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            use candle_core::cuda_backend::cudarc::driver::sys;
            let stream = dev.cuda_stream();
            let ctx = stream.context();
            ctx.bind_to_thread().context("binding the CUDA context")?;
            let mut pool = std::ptr::null_mut();
            // SAFETY: a valid device of a live context; the pool handle is owned by the driver.
            let rc = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
            ensure!(rc == sys::CUresult::CUDA_SUCCESS, "reading the device's memory pool: {rc:?}");
            let watermark = PoolWatermark { stream, pool };
            watermark.restart()?;
            return Ok(Some(watermark));
        }
        let _ = device;
        Ok(None)
    }

    /// Bytes in use now.
    pub fn in_use(&self) -> Result<u64> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
            self.stream.synchronize().context("synchronizing the CUDA stream")?;
            return self.attribute(CU_MEMPOOL_ATTR_USED_MEM_CURRENT);
        }
        #[allow(unreachable_code)]
        Ok(0)
    }

    /// `(in use, reserved)`: the most bytes the tensors held, and the most the pool held from
    /// the driver for them (what `nvidia-smi` sees), since the last call (or since
    /// [`PoolWatermark::new`]); both counts then restart from now.
    pub fn take(&self) -> Result<(u64, u64)> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::{
                CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            };
            self.stream.synchronize().context("synchronizing the CUDA stream")?;
            let high =
                (self.attribute(CU_MEMPOOL_ATTR_USED_MEM_HIGH)?, self.attribute(CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?);
            self.restart()?;
            return Ok(high);
        }
        #[allow(unreachable_code)]
        Ok((0, 0))
    }

    #[cfg(feature = "cuda")]
    fn attribute(&self, attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute) -> Result<u64> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let mut value = 0u64;
        // SAFETY: the memory attributes of a pool are cuuint64_t.
        let rc = unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, (&mut value as *mut u64).cast()) };
        ensure!(rc == sys::CUresult::CUDA_SUCCESS, "reading the memory pool's {attr:?}: {rc:?}");
        Ok(value)
    }

    /// Sets the high-water marks to what is held now (the driver's only allowed reset value is 0,
    /// which it takes to mean "now").
    #[cfg(feature = "cuda")]
    fn restart(&self) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use sys::CUmemPool_attribute::{CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, CU_MEMPOOL_ATTR_USED_MEM_HIGH};
        for attr in [CU_MEMPOOL_ATTR_USED_MEM_HIGH, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH] {
            let mut zero = 0u64;
            // SAFETY: as in `attribute`; 0 is the documented reset value.
            let rc = unsafe { sys::cuMemPoolSetAttribute(self.pool, attr, (&mut zero as *mut u64).cast()) };
            ensure!(rc == sys::CUresult::CUDA_SUCCESS, "resetting the memory pool's {attr:?}: {rc:?}");
        }
        Ok(())
    }
}

/// What a GPU out-of-memory fault asked for, when the error is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfMemory {
    /// The allocation that failed, when candle reported it (`CUDA allocation of N bytes`).
    pub asked_bytes: Option<u64>,
}

impl OutOfMemory {
    /// `Some` when `err` (anywhere in its chain) is CUDA's out-of-memory error or cuBLAS' failure
    /// to allocate its workspace.
    pub fn of(err: &anyhow::Error) -> Option<OutOfMemory> {
        let text = format!("{err:#}");
        if !(text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.contains("CUBLAS_STATUS_ALLOC_FAILED")) {
            return None;
        }
        let asked_bytes = text.split("CUDA allocation of ").nth(1).and_then(|rest| {
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        });
        Some(OutOfMemory { asked_bytes })
    }

    /// "CUDA out of memory (asked for 1.50 GiB, 0.20 GiB free of 139.81 GiB)".
    pub fn describe(&self, device: &Device) -> String {
        let asked = self.asked_bytes.map(|b| format!("asked for {}", gib(b)));
        let free = memory_info(device).map(|(free, total)| format!("{} free of {}", gib(free), gib(total)));
        let details: Vec<String> = asked.into_iter().chain(free).collect();
        if details.is_empty() {
            "CUDA out of memory".into()
        } else {
            format!("CUDA out of memory ({})", details.join(", "))
        }
    }
}

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Parses a `--gpu-memory-limit` value in GiB (`40`, `40.5`) into bytes.
pub fn parse_gib(s: &str) -> Result<u64> {
    let v: f64 = s
        .trim()
        .trim_end_matches("GiB")
        .trim()
        .parse()
        .with_context(|| format!("invalid size '{s}' (expected GiB, e.g. 40 or 40.5)"))?;
    ensure!(v.is_finite() && v > 0.0, "invalid size '{s}' (expected a positive number of GiB)");
    Ok((v * (1u64 << 30) as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_recognised_with_the_size_candle_reports() {
        // The text candle's CUDA backend gives (vendor/candle-core: the context, then cudarc's error).
        let err = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
            .context("CUDA allocation of 1610612736 bytes")
            .context("scoring sample 2");
        assert_eq!(OutOfMemory::of(&err), Some(OutOfMemory { asked_bytes: Some(1_610_612_736) }));
        let cublas = anyhow::anyhow!("cublas error: CUBLAS_STATUS_ALLOC_FAILED");
        assert_eq!(OutOfMemory::of(&cublas), Some(OutOfMemory { asked_bytes: None }));
        let other = anyhow::anyhow!("DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")");
        assert_eq!(OutOfMemory::of(&other), None);
        assert_eq!(OutOfMemory { asked_bytes: None }.describe(&Device::Cpu), "CUDA out of memory");
        assert_eq!(
            OutOfMemory { asked_bytes: Some(3 << 29) }.describe(&Device::Cpu),
            "CUDA out of memory (asked for 1.50 GiB)"
        );
    }

    #[test]
    fn gib_sizes_parse() {
        assert_eq!(parse_gib("40").unwrap(), 40 << 30);
        assert_eq!(parse_gib("0.5GiB").unwrap(), 1 << 29);
        assert!(parse_gib("-1").is_err());
        assert!(parse_gib("lots").is_err());
    }

    #[test]
    fn a_memory_limit_needs_a_gpu() {
        let err = MemoryLimit::new(&Device::Cpu, 1 << 30).err().unwrap();
        assert_eq!(err.to_string(), "--gpu-memory-limit needs a CUDA device (--device cuda)");
    }
}
