#!/usr/bin/env bash
# GPU run, ON the GPU machine (device tool) from the repo root after scripts/bench/pack.sh filled
# .carry/ here (WITH_EVALUATE=1). In one call, on the random-weight Qwen3-VL-4B architecture:
#  1. first call vs warm call (issue 16): score-layers, 4 samples, bf16, gradient and kl_div, with the
#     driver's JIT cache disabled (CUDA_CACHE_DISABLE=1: every call is a first call) and with a warm
#     one; then a run with CUDA_DISABLE_PTX_JIT=1, which fails if any kernel needs compiling.
#  2. evaluate (issue 11): score-layers + search on N calibration samples, `evaluate --frontier 8` on
#     N held-out samples, and the same measurement with HF transformers + ModelOpt fake quant.
#   scripts/bench_gpu_evaluate.sh [N]     (default 32)
# Environment: OUT (results, default $OUT or /tmp/qsens-bench), SKIP_FIRST_CALL=1, SKIP_EVALUATE=1,
# SKIP_MODELOPT=1 (qsens only).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qsens-bench}; mkdir -p "$OUT"
N=${1:-32}
W=.bench; mkdir -p $W
export PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
FAILED=""
log() { echo "[bench $(date +%H:%M:%S)] $*"; }
calib_s() { python3 -c "import json,sys; t=json.load(open(sys.argv[1])); print(f\"{t['calibration']:.3f} | {t['scoring']:.3f} | {t['total']:.3f}\")" "$1"; }

tar -C $W -xJf .carry/qsens-bin.tar.xz
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/scripts/bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers, modelopt; print("torch", torch.__version__, "transformers", transformers.__version__, "modelopt", modelopt.__version__)' | tee "$OUT/versions.txt"

log "checkpoint"
python3 scripts/bench/make_checkpoint.py --config .carry/qwen3-vl-4b-instruct.config.json --out $W/qwen3-vl-4b || exit 1
CKPT=$W/qwen3-vl-4b
cat $CKPT/*.safetensors > /dev/null

if [ -z "${SKIP_FIRST_CALL:-}" ]; then
  python3 scripts/bench/make_inputs.py --num 4 --out $W/inputs-4.msgpack || exit 1
  score() {  # score METHOD TAG [env...]: one score-layers call, its calibration time into the table
    local method=$1 tag=$2; shift 2
    env "$@" $W/bin/score-layers -q --model $CKPT --inputs $W/inputs-4.msgpack --device cuda --dtype bf16 \
      --method "$method" --timings "$OUT/first-call-$method-${tag//[^a-z0-9]/_}.json" -o $W/scores-4-$method.msgpack \
      && echo "| $method | $tag | $(calib_s "$OUT/first-call-$method-${tag//[^a-z0-9]/_}.json") |" | tee -a "$OUT/first-call.md" \
      || { FAILED="$FAILED first-call-$method-${tag//[^a-z0-9]/_}"; echo "| $method | $tag | FAILED | | |" | tee -a "$OUT/first-call.md"; }
  }
  log "first call vs warm call"
  echo "| method | driver JIT cache | calibration (s) | scoring (s) | total (s) |" > "$OUT/first-call.md"
  echo "|---|---|---:|---:|---:|" >> "$OUT/first-call.md"
  for method in gradient kl_div; do
    score $method "disabled" CUDA_CACHE_DISABLE=1
    rm -rf $W/jit-cache-$method
    score $method "empty (first use)" CUDA_CACHE_PATH=$W/jit-cache-$method
    score $method "warm" CUDA_CACHE_PATH=$W/jit-cache-$method
  done
  score gradient "disabled (again)" CUDA_CACHE_DISABLE=1
  score gradient "disabled, PTX JIT forbidden" CUDA_CACHE_DISABLE=1 CUDA_DISABLE_PTX_JIT=1
  du -sh $W/jit-cache-* 2>/dev/null | sed 's/^/JIT cache size after the runs: /' | tee -a "$OUT/first-call.md"
fi

if [ -z "${SKIP_EVALUATE:-}" ]; then
  log "evaluate: $N calibration + $N held-out samples"
  python3 scripts/bench/make_inputs.py --num "$N" --seed 0 --out $W/calib-$N.msgpack || exit 1
  python3 scripts/bench/make_inputs.py --num "$N" --seed 1 --out $W/heldout-$N.msgpack || exit 1
  $W/bin/score-layers -q --model $CKPT --inputs $W/calib-$N.msgpack --device cuda --dtype bf16 \
    -o $W/scores-$N.msgpack || exit 1
  $W/bin/search -q --scores $W/scores-$N.msgpack --effective-bits 11 -o $W/manifest-$N.json || exit 1
  python3 scripts/bench/gpumem.py "$OUT/evaluate-$N.mem.json" -- $W/bin/evaluate --model $CKPT \
    --inputs $W/heldout-$N.msgpack --manifest $W/manifest-$N.json --frontier 8 --device cuda --dtype bf16 \
    --timings "$OUT/evaluate-$N.timings.json" -o "$OUT/evaluation-$N.json" || exit 1
  cat "$OUT/evaluate-$N.timings.json"
  [ -n "${SKIP_MODELOPT:-}" ] && { log "done (ModelOpt skipped)"; exit 0; }
  python3 scripts/bench/gpumem.py "$OUT/modelopt-evaluate-$N.mem.json" -- python3 scripts/bench/modelopt_evaluate.py \
    --model $CKPT --calib $W/calib-$N.msgpack --inputs $W/heldout-$N.msgpack --evaluation "$OUT/evaluation-$N.json" \
    --out "$OUT/modelopt-evaluate-$N.json" || exit 1
  python3 scripts/bench/compare_evaluate.py --qsens "$OUT/evaluation-$N.json" --qsens-timings "$OUT/evaluate-$N.timings.json" \
    --modelopt "$OUT/modelopt-evaluate-$N.json" --json "$OUT/compare-evaluate-$N.json" | tee "$OUT/evaluate-$N.md" \
    || FAILED="$FAILED evaluate-agreement"
fi
[ -f "$OUT/first-call.md" ] && cat "$OUT/first-call.md"
log "done${FAILED:+; FAILED:$FAILED}"
[ -z "$FAILED" ]
