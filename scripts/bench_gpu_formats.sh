#!/usr/bin/env bash
# GPU run, ON the GPU machine (device tool) from the repo root, after .carry/ holds
# qsens-bin.tar.xz (score-layers with CUDA, gpu_selftest), ModelOpt's wheels and the 4B config
# (scripts/bench/pack.sh). Issue 12: on the random-weight Qwen3-VL-4B architecture, N samples,
#  1. the quantization kernels against the CPU, bit for bit (gpu_selftest --only quant);
#  2. score-layers --format NVFP4_AWQ_LITE --format FP8 (ModelOpt's default candidates), bf16;
#  3. ModelOpt auto_quantize with [NVFP4_AWQ_LITE_CFG, FP8_DEFAULT_CFG] on the same tensors;
#  4. one table: times, peak GPU memory, Spearman per format.
#   scripts/bench_gpu_formats.sh [N]     (default 32; OUT = results folder; SKIP_MODELOPT=1: qsens only)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qsens-bench}; mkdir -p "$OUT"
N=${1:-32}
W=.bench; mkdir -p $W
export PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# ModelOpt builds its FP8 extension (~60 s) outside its timed region; keeping the build here lets the
# next ModelOpt process of the call (and of the next call, on a warm machine) load it instead.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$W/torch_extensions}
log() { echo "[bench $(date +%H:%M:%S)] $*"; }
tar -C $W -xJf .carry/qsens-bin.tar.xz
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/scripts/bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers, modelopt; print("torch", torch.__version__, "transformers", transformers.__version__, "modelopt", modelopt.__version__)' | tee "$OUT/versions.txt"
if [ -x $W/bin/gpu_selftest ]; then
  log "quantization kernels vs CPU"
  $W/bin/gpu_selftest --only quant --no-timing --f16 > "$OUT/selftest-quant.log" 2>&1; echo "selftest rc=$?"
  tail -3 "$OUT/selftest-quant.log"; grep FAIL "$OUT/selftest-quant.log" | head
fi
log "checkpoint and $N samples"
python3 scripts/bench/make_checkpoint.py --config .carry/qwen3-vl-4b-instruct.config.json --out $W/qwen3-vl-4b || exit 1
CKPT=$W/qwen3-vl-4b
cat $CKPT/*.safetensors > /dev/null
python3 scripts/bench/make_inputs.py --num "$N" --seed 0 --out $W/calib-$N.msgpack || exit 1
log "qsens score-layers [NVFP4_AWQ_LITE, FP8]"
python3 scripts/bench/gpumem.py "$OUT/qsens-formats-$N.mem.json" -- $W/bin/score-layers -q --model $CKPT \
  --inputs $W/calib-$N.msgpack --device cuda --dtype bf16 --format NVFP4_AWQ_LITE --format FP8 \
  --timings "$OUT/qsens-formats-$N.timings.json" -o $W/scores-formats-$N.msgpack || exit 1
cat "$OUT/qsens-formats-$N.timings.json"
[ -n "${SKIP_MODELOPT:-}" ] && { log "done (ModelOpt skipped)"; exit 0; }
log "ModelOpt auto_quantize [NVFP4_AWQ_LITE_CFG, FP8_DEFAULT_CFG]"
python3 scripts/bench/gpumem.py "$OUT/modelopt-formats-$N.mem.json" -- python3 scripts/bench/modelopt_autoquant.py \
  --model $CKPT --inputs $W/calib-$N.msgpack --out "$OUT/modelopt-formats-$N.json" \
  --formats NVFP4_AWQ_LITE_CFG FP8_DEFAULT_CFG --effective-bits 6 --bits 4.8 6 8 || exit 1
python3 scripts/bench/compare_formats.py --scores $W/scores-formats-$N.msgpack \
  --timings "$OUT/qsens-formats-$N.timings.json" --mem "$OUT/qsens-formats-$N.mem.json" \
  --modelopt "$OUT/modelopt-formats-$N.json" --modelopt-mem "$OUT/modelopt-formats-$N.mem.json" \
  --json "$OUT/compare-formats-$N.json" | tee "$OUT/formats-$N.md"
log done
