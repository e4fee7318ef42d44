#!/usr/bin/env bash
# Sets up a CUDA 13.0 build toolchain from PyPI, on a machine with or without a GPU, so that
# `cargo build --features cuda` works here and the binary runs on machines with driver 580
# (CUDA 13.0 API). Usage: scripts/setup-cuda-build-env.sh [DIR]  (default ~/.qsens-cuda), then
# `source DIR/env.sh`.
#
# Why the pins: driver 580 loads PTX of ISA <= 9.0, which nvcc 13.0 emits (13.1+ emits newer PTX
# the driver refuses); nvidia-nvvm must match nvcc. The link-time libraries are the versions the
# GPU machines' torch 2.11 uses. libcuda itself is not on PyPI: a stub exporting the driver API
# symbols (each returning CUDA_ERROR_NO_DEVICE) is generated for linking only — never ship it.
set -euo pipefail
DIR=${1:-$HOME/.qsens-cuda}
mkdir -p "$DIR"
python3 -m venv "$DIR/venv"
"$DIR/venv/bin/pip" install -q \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 \
  nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35
CUDA=$(echo "$DIR"/venv/lib/python3*/site-packages/nvidia/cu13)
( cd "$CUDA/lib"
  for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    ln -sf "$lib" "${lib%.so.*}.so"
  done
  # The driver API symbols cudarc links against, taken from its sources.
  mkdir -p stubs
  # Not `ls | head` in a command substitution: under pipefail a missing directory ends the script
  # right there, with no message, before the fetch below could run.
  cudarc_src() { compgen -G "${CARGO_HOME:-$HOME/.cargo}/registry/src/*/cudarc-0.19.10" | head -1 || true; }
  CUDARC=$(cudarc_src)
  if [ -z "$CUDARC" ]; then
    echo "fetching cudarc 0.19.10's sources (for the libcuda link stub)"
    tmp=$(mktemp -d)
    (cd "$tmp" && cargo init -q --name fetch && cargo add -q cudarc@=0.19.10 --no-default-features && cargo fetch -q)
    rm -rf "$tmp"
    CUDARC=$(cudarc_src)
    [ -n "$CUDARC" ] || { echo "error: cargo fetch did not bring cudarc-0.19.10 into ${CARGO_HOME:-$HOME/.cargo}/registry" >&2; exit 2; }
  fi
  grep -oP '^\s+fn \Kcu\w+(?=\()' "$CUDARC/src/driver/sys/mod.rs" | sort -u \
    | sed 's/.*/int &(void) { return 100; }/' > stubs/libcuda_stub.c
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so.1 stubs/libcuda_stub.c
  ln -sf libcuda.so.1 stubs/libcuda.so )
cat > "$DIR/env.sh" <<ENV
export CUDA_HOME=$CUDA
export PATH=\$CUDA_HOME/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
ENV
"$CUDA/bin/nvcc" --version | tail -1
echo "CUDA build toolchain ready: source $DIR/env.sh"
