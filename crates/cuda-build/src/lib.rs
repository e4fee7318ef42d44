//! Compiles CUDA kernels to one compressed fatbin per source file, holding machine code (SASS) for
//! every GPU generation we target plus PTX for the newest, so the driver never compiles kernels at
//! run time (~22 s on a fresh machine with PTX alone). Used by qsens' build.rs and by the vendored
//! candle-kernels (vendor/README.md); docs/cuda.md lists the architectures and how to add one.
use std::path::{Path, PathBuf};
use std::process::Command;

/// A100 (80), L40S / RTX 4090 (89), H100 / H200 (90), B200 (100), RTX 5090 (120). SASS of 8.0 also
/// runs on 8.6 and 8.9, 10.0 on 10.3, 12.0 on 12.1; newer cards JIT the PTX of the last entry.
pub const DEFAULT_ARCHS: &[u32] = &[80, 89, 90, 100, 120];

/// The architectures to build: `QSENS_CUDA_ARCHS` ("80 90", commas or spaces) or [`DEFAULT_ARCHS`].
pub fn archs() -> Vec<u32> {
    println!("cargo:rerun-if-env-changed=QSENS_CUDA_ARCHS");
    let Ok(list) = std::env::var("QSENS_CUDA_ARCHS") else { return DEFAULT_ARCHS.to_vec() };
    let mut archs: Vec<u32> = list
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            let digits = s.trim_start_matches("sm_");
            digits.parse().unwrap_or_else(|_| panic!("QSENS_CUDA_ARCHS: {s:?} is not a compute capability like 90"))
        })
        .collect();
    assert!(!archs.is_empty(), "QSENS_CUDA_ARCHS is set but names no architecture");
    archs.sort_unstable();
    archs.dedup();
    archs
}

/// `$CUDA_HOME/bin/nvcc` when it exists, else `nvcc` from PATH.
pub fn nvcc() -> PathBuf {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("bin/nvcc"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"))
}

/// `-gencode` flags: SASS for each architecture, and PTX for the newest.
pub fn gencode_args(archs: &[u32]) -> Vec<String> {
    let newest = *archs.iter().max().expect("at least one architecture");
    archs
        .iter()
        .map(|&a| {
            let code = if a == newest { format!("[sm_{a},compute_{a}]") } else { format!("sm_{a}") };
            format!("-gencode=arch=compute_{a},code={code}")
        })
        .collect()
}

/// Compiles each `(source, output)` pair to a size-compressed fatbin, as many at a time as the
/// machine has cores. `extra_args` go to every nvcc call. Panics naming the file on failure.
pub fn compile_fatbins(jobs: &[(PathBuf, PathBuf)], extra_args: &[&str]) {
    let nvcc = nvcc();
    let gencode = gencode_args(&archs());
    println!("cargo:rerun-if-env-changed=NVCC_CCBIN");
    let ccbin = std::env::var("NVCC_CCBIN").ok();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(jobs.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((src, out)) = jobs.get(i) else { break };
                compile_one(&nvcc, &gencode, ccbin.as_deref(), extra_args, src, out);
            });
        }
    });
}

fn compile_one(nvcc: &Path, gencode: &[String], ccbin: Option<&str>, extra: &[&str], src: &Path, out: &Path) {
    println!("cargo:rerun-if-changed={}", src.display());
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin").args(gencode).args(["--compress-mode", "size"]).args(extra).arg(src).arg("-o").arg(out);
    if let Some(ccbin) = ccbin {
        cmd.args(["-allow-unsupported-compiler", "-ccbin", ccbin]);
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("running {} (is the CUDA toolchain set up? see docs/cuda.md): {e}", nvcc.display())
    });
    assert!(status.success(), "nvcc failed on {}: {cmd:?}", src.display());
}
