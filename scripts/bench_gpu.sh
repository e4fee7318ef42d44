#!/usr/bin/env bash
# GPU benchmark, run ON the GPU machine (device tool) from the repo root after scripts/bench/pack.sh
# filled .carry/ here. In one call: checks CUDA scores against the CPU on the demo set, makes the
# random-weight Qwen3-VL-4B checkpoint, N synthetic samples, runs qsens (score-layers + search) and
# ModelOpt auto_quantize on the same checkpoint and tensors, and prints one comparison table.
#   scripts/bench_gpu.sh [N...]        e.g. scripts/bench_gpu.sh 32 128
# Environment: OUT (results folder, default $OUT or /tmp/qsens-bench), METHOD (gradient or kl_div,
# default gradient: both tools score with it; result files carry its name unless it is gradient), MODEL (2b, 4b, 8b or 32b: the
# architecture, .carry/qwen3-vl-$MODEL-instruct.config.json; default 4b), SKIP_MODELOPT=1, SKIP_CHECKS=1, LONG=1
# (also score one ~1,000-image-token sample), QSENS_FLAGS (extra score-layers flags), CKPT_ROOT (where the
# checkpoint is written, default .bench; /dev/shm for 32B and 30B-A3B, which do not fit the disk), SELFTEST=1
# (run gpu_selftest first). MODEL=30b-a3b is the MoE architecture (qwen3_vl_moe).
# The timed qsens runs use CUDA_CACHE_DISABLE=1, so they are first calls as on a fresh machine (the
# binaries carry compiled kernels; docs/cuda.md); scripts/bench_gpu_evaluate.sh compares cold and warm.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qsens-bench}; mkdir -p "$OUT"
SIZES=${*:-32}
W=.bench; mkdir -p $W
export PYTHONUNBUFFERED=1 LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# ModelOpt builds its FP8 extension (~60 s) outside its timed region; keeping the build here lets the
# next ModelOpt process of the call (and of the next call, on a warm machine) load it instead.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$W/torch_extensions}
FAILED=""   # qsens steps that failed; ModelOpt still runs so the baseline is measured
log() { echo "[bench $(date +%H:%M:%S)] $*"; }

tar -C $W -xJf .carry/qsens-bin.tar.xz
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers, modelopt; print("torch", torch.__version__, "transformers", transformers.__version__, "modelopt", modelopt.__version__)' | tee "$OUT/versions.txt"

MODEL=${MODEL:-4b}
METHOD=${METHOD:-gradient}
TAG=$([ "$METHOD" = gradient ] || echo "$METHOD-")   # file-name prefix, so runs of both methods can share OUT
if [ -n "${SELFTEST:-}" ]; then
  log "gpu_selftest (every fused and quantization kernel against the CPU)"
  $W/bin/gpu_selftest --no-timing > "$OUT/gpu_selftest.txt" 2>&1 || FAILED="$FAILED gpu_selftest"
  grep -c PASS "$OUT/gpu_selftest.txt" | sed 's/^/PASS lines: /'; grep FAIL "$OUT/gpu_selftest.txt" | head; tail -2 "$OUT/gpu_selftest.txt"
fi
log "CUDA correctness on the demo set and the MoE fixture (vs the CPU runs made by pack.sh)"
[ -d .carry/demo ] || { log "no .carry/demo: skipped"; SKIP_CHECKS=1; }
for set in demo moe; do
  for dt in $([ -d .carry/$set ] && echo f32 bf16); do
    $W/bin/score-layers -q --model .carry/$set/model --inputs .carry/$set/model_inputs.msgpack --device cuda \
      --dtype $dt -o $W/$set-cuda-$dt.msgpack || { FAILED="$FAILED $set-$dt"; continue; }
    python3 scripts/bench/same_scores.py --label "$set $dt cuda vs cpu" $W/$set-cuda-$dt.msgpack \
      .carry/$set/scores-cpu-$dt.msgpack --min-spearman 0.98 | tee -a "$OUT/correctness.txt" || FAILED="$FAILED $set-$dt-scores"
  done
done

if [ -z "${SKIP_CHECKS:-}" ]; then
  log "HF transformers loads the generated demo set"
  python3 scripts/check_demo_with_hf.py .carry/demo/set --json "$OUT/demo-hf.json" 2>&1 | tail -15 || FAILED="$FAILED demo-hf"
  log "ModelOpt mtq.quantize accepts our exported recipe"
  python3 scripts/check_modelopt_export.py .carry/demo/modelopt_quant_cfg.json .carry/demo/set/model --device cuda \
    2>&1 | tail -15 || FAILED="$FAILED modelopt-export"
fi

log "checkpoint"
CKPT=${CKPT_ROOT:-$W}/qwen3-vl-$MODEL
df -h "$(dirname $CKPT)" | tail -1
python3 scripts/bench/make_checkpoint.py --config .carry/qwen3-vl-$MODEL-instruct.config.json --out $CKPT || exit 1
cat $CKPT/*.safetensors > /dev/null   # page cache: both tools load from memory

for N in $SIZES; do
  log "N=$N: inputs"
  python3 scripts/bench/make_inputs.py --num "$N" --out $W/inputs-$N.msgpack || exit 1
  log "N=$N: qsens score-layers --method $METHOD (driver JIT cache disabled: timed as a first call on a fresh machine)"
  CUDA_CACHE_DISABLE=1 python3 scripts/bench/gpumem.py "$OUT/qsens-$TAG$N.mem.json" -- $W/bin/score-layers --model $CKPT \
    --inputs $W/inputs-$N.msgpack --device cuda --dtype bf16 --method "$METHOD" -v --timings "$OUT/qsens-$TAG$N.timings.json" \
    -o $W/scores-$TAG$N.msgpack ${QSENS_FLAGS:-} || FAILED="$FAILED score-$N"
  S0=$(date +%s.%N)
  for b in 10 12; do
    $W/bin/search -q --scores $W/scores-$TAG$N.msgpack --effective-bits $b --bootstrap 200 -o "$OUT/manifest-$TAG$N-$b.json" \
      || FAILED="$FAILED search-$N-$b"
  done
  SEARCH_S=$(python3 -c "import time; print((time.time() - $S0) / 2)")
  if [ -z "${SKIP_MODELOPT:-}" ]; then
    log "N=$N: ModelOpt auto_quantize, $METHOD"
    python3 scripts/bench/gpumem.py "$OUT/modelopt-$TAG$N.mem.json" -- python3 scripts/bench/modelopt_autoquant.py \
      --model $CKPT --inputs $W/inputs-$N.msgpack --method "$METHOD" --out "$OUT/modelopt-$TAG$N.json" || exit 1
    [ -z "$FAILED" ] && python3 scripts/bench/compare.py --scores $W/scores-$TAG$N.msgpack --timings "$OUT/qsens-$TAG$N.timings.json" \
      --mem "$OUT/qsens-$TAG$N.mem.json" --manifests 10="$OUT/manifest-$TAG$N-10.json" 12="$OUT/manifest-$TAG$N-12.json" \
      --search-s "$SEARCH_S" --modelopt "$OUT/modelopt-$TAG$N.json" --modelopt-mem "$OUT/modelopt-$TAG$N.mem.json" \
      --json "$OUT/compare-$TAG$N.json" | tee "$OUT/table-$TAG$N.md"
  fi
done

if [ -n "${LONG:-}" ]; then
  log "long sample: one 1024x1024 image (1,024 image tokens)"
  python3 scripts/bench/make_inputs.py --num 1 --size 1024 --out $W/inputs-long.msgpack || exit 1
  python3 scripts/bench/gpumem.py "$OUT/qsens-long.mem.json" -- $W/bin/score-layers --model $CKPT \
    --inputs $W/inputs-long.msgpack --device cuda --dtype bf16 -v --timings "$OUT/qsens-long.timings.json" \
    -o $W/scores-long.msgpack || FAILED="$FAILED long"
fi
log "done${FAILED:+; FAILED:$FAILED}"
[ -z "$FAILED" ]
