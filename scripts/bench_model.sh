#!/usr/bin/env bash
# Forward + backward speed of the Qwen3-VL model on the tiny fixture checkpoint (CPU, f32).
# Usage: scripts/bench_model.sh [reps]   (env: QSENS_FIXTURES, RAYON_NUM_THREADS, CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
export QSENS_FIXTURES="${QSENS_FIXTURES:-$PWD/../shared/fixtures}"
export QSENS_BENCH_REPS="${1:-5}"
exec cargo test --release --test model_bench -- --ignored --nocapture --test-threads=1
