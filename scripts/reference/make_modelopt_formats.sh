#!/usr/bin/env bash
# Makes the ModelOpt 0.47 reference data of tests/data/modelopt_formats/ (issue 12). Run ON the GPU
# machine (device tool), from the repo root, after scripts/reference/pack_modelopt_formats.sh filled
# .carry/wheels and .carry/fixtures here; carry both:
#   bash scripts/reference/make_modelopt_formats.sh
# Writes everything into one folder and tars it to $OUT/modelopt_formats.tar.xz. Safe to run twice.
# Environment: OUT (default /tmp/modelopt_formats_out), DEVICE (cuda, or cpu for a local test),
#   PYTHON (default python3), SKIP_PIP=1 (use the Python's own ModelOpt), FIXTURES (default
#   .carry/fixtures, else ../shared/fixtures), CPU_TOO=0 (skip the CPU comparison runs),
#   EXTRA (more flags for modelopt_formats.py), PARTS (default "A B"; "B" remakes only the
#   auto_quantize runs, into a tar of its own).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/modelopt_formats_out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
W=/tmp/modelopt_formats_work
D=$W/modelopt_formats
rm -rf "$W"; mkdir -p "$D"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
[ -d /usr/local/cuda/bin ] && export PATH=/usr/local/cuda/bin:$PATH CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
log() { echo "[make_modelopt_formats $(date +%H:%M:%S)] $*"; }
T0=$(date +%s)

if [ -z "${SKIP_PIP:-}" ]; then
  if ! PYTHONPATH=/tmp/site $PY -c 'import modelopt, sys; sys.exit(modelopt.__version__ != "0.47.0")' 2>/dev/null; then
    log "pip install .carry/wheels -> /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .carry/wheels/*.whl || { log "pip install failed"; exit 1; }
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
FIXTURES=${FIXTURES:-$([ -d .carry/fixtures ] && echo .carry/fixtures || echo ../shared/fixtures)}
[ -f "$FIXTURES/qwen3-vl-tiny/model.safetensors" ] || { log "no fixture at $FIXTURES"; exit 1; }

{ [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; uname -a
  $PY -c 'import torch, transformers, modelopt; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "modelopt", modelopt.__version__)'
  command -v nvcc >/dev/null && nvcc --version | tail -2; } 2>&1 | tee "$D/machine.txt"

if [ "$DEVICE" = cuda ]; then
  # ModelOpt JIT-compiles three CUDA extensions on first use (torch.utils.cpp_extension, cached in
  # ~/.cache/torch_extensions). Build them side by side first; the script then records whether each loaded.
  log "building ModelOpt's CUDA extensions (parallel)"
  for e in get_cuda_ext get_cuda_ext_fp8 get_cuda_ext_mx; do
    $PY -c "import time; t=time.time(); from modelopt.torch.quantization import extensions as x; m=x.$e(); print('$e', 'loaded' if m is not None else 'NOT LOADED', round(time.time()-t,1), 's')" \
      > "$D/build_$e.log" 2>&1 &
  done
  wait
  for e in get_cuda_ext get_cuda_ext_fp8 get_cuda_ext_mx; do tail -1 "$D/build_$e.log"; done
fi

# One process per group: a CUDA fault (the MX extension's kernels have faulted on this data with
# "illegal memory access") poisons the process's CUDA context and would fail everything after it.
# The MX formats run alone, with CUDA_LAUNCH_BLOCKING=1 so that a fault names its own kernel;
# fake_quant_<fmt>.json of those runs is merged into fake_quant.json at the end.
CPU=$([ "${CPU_TOO:-1}" = 0 ] || echo --cpu-too)
RC=0
mo() { $PY scripts/reference/modelopt_formats.py --out "$D" --device "$DEVICE" $CPU --fixtures "$FIXTURES" \
  --jobs "$(nproc)" ${EXTRA:-} "$@" 2>&1 | tee -a "$D/log.txt"; r=${PIPESTATUS[0]}; [ "$r" = 0 ] || RC=$r; }
PARTS=${PARTS:-A B}
if [[ " $PARTS " == *" A "* ]]; then
log "modelopt_formats.py part A (all but MX)"
mo --part A --formats NVFP4_DEFAULT_CFG,W4A16_NVFP4_CFG,FP8_DEFAULT_CFG,FP8_PER_CHANNEL_PER_TOKEN_CFG,INT8_DEFAULT_CFG,INT4_AWQ_CFG,W4A8_AWQ_BETA_CFG,FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG --json fake_quant.json
for m in MXFP8_DEFAULT_CFG MXFP4_DEFAULT_CFG; do
  log "modelopt_formats.py part A $m (alone)"
  CUDA_LAUNCH_BLOCKING=1 mo --part A --formats $m --json fake_quant_$m.json --no-inputs
done
fi
if [[ " $PARTS " == *" B "* ]]; then
log "modelopt_formats.py part B"
mo --part B
fi
for f in "$D"/autoquant_*.safetensors; do [ -f "$f" ] && xz -T0 -9 "$f"; done
[ -f "$D/fake_quant.json" ] || { cp "$0" "$D/make_modelopt_formats.sh.used"; tar -C "$W" -cf - modelopt_formats | xz -T0 -1 > "$OUT/modelopt_formats.tar.xz"; log "done (part B only), rc $RC"; exit "$RC"; }
$PY - "$D" <<'PYEOF'
import json, os, sys
d = sys.argv[1]
main = json.load(open(os.path.join(d, "fake_quant.json")))
for m in ("MXFP8_DEFAULT_CFG", "MXFP4_DEFAULT_CFG"):
    p = os.path.join(d, f"fake_quant_{m}.json")
    if os.path.exists(p):
        part = json.load(open(p))
        main["formats"].update(part["formats"])
        main.setdefault("files", {}).update(part.get("files", {}))
        main.setdefault("cpu_gpu_difference_summary", {}).update(part.get("cpu_gpu_difference_summary", {}))
        main.setdefault("processes", []).append({"formats": m, "command": part["command"]})
json.dump(main, open(os.path.join(d, "fake_quant.json"), "w"), indent=1)
PYEOF
for f in "$D"/autoquant_*.safetensors; do [ -f "$f" ] && xz -T0 -9 "$f"; done
cp "$0" "$D/make_modelopt_formats.sh.used"
tar -C "$W" -cf - modelopt_formats | xz -T0 -1 > "$OUT/modelopt_formats.tar.xz"
ls -la "$D" "$OUT"
log "done in $(( $(date +%s) - T0 )) s, rc $RC"
exit "$RC"
