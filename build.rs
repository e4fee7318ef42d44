//! With the `cuda` feature, compiles `kernels/*.cu` to compressed fatbins: machine code for each
//! GPU generation in `QSENS_CUDA_ARCHS` (default: crates/cuda-build's list) and PTX for the newest,
//! so no kernel is compiled by the driver at run time (docs/cuda.md). Without it, does nothing.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let jobs: Vec<(PathBuf, PathBuf)> = ["quant", "attention", "norm", "act", "metrics"]
        .iter()
        .map(|name| (PathBuf::from(format!("kernels/{name}.cu")), out.join(format!("{name}.fatbin"))))
        .collect();
    qsens_cuda_build::compile_fatbins(&jobs, &["-O3", "-std=c++17"]);
}
