#!/usr/bin/env bash
# Packed scoring on one GPU: score-layers at several --batch-tokens on the same random-weight
# checkpoint and samples, each run's time and peak memory, and each run's scores against the
# first run's (same_scores.py; list 1 first to compare against one sample per forward).
# Run ON the GPU machine from the repo root, with .carry/ filled as for scripts/bench_gpu.sh.
#   MODEL=4b METHOD=gradient scripts/bench/batch_sweep.sh 128 "1 2048 4096"
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/qsens-bench}; mkdir -p "$OUT"
W=.bench; mkdir -p $W
N=${1:-128}
BATCHES=${2:-1 2048}
MODEL=${MODEL:-4b}
METHOD=${METHOD:-gradient}
[ -x $W/bin/score-layers ] || tar -C $W -xJf .carry/qsens-bin.tar.xz
CKPT=${CKPT_ROOT:-$W}/qwen3-vl-$MODEL
[ -d "$CKPT" ] || python3 scripts/bench/make_checkpoint.py --config .carry/qwen3-vl-$MODEL-instruct.config.json --out "$CKPT" || exit 1
cat "$CKPT"/*.safetensors > /dev/null   # page cache
[ -f $W/inputs-$N.msgpack ] || python3 scripts/bench/make_inputs.py --num "$N" --out $W/inputs-$N.msgpack || exit 1
first=""
for b in $BATCHES; do
  tag=$MODEL-$METHOD-$N-b$b
  CUDA_CACHE_DISABLE=1 python3 scripts/bench/gpumem.py "$OUT/sweep-$tag.mem.json" -- $W/bin/score-layers --model "$CKPT" \
    --inputs $W/inputs-$N.msgpack --device cuda --dtype bf16 --method "$METHOD" --batch-tokens "$b" -v \
    --timings "$OUT/sweep-$tag.timings.json" -o $W/sweep-$tag.msgpack 2>&1 | grep -E "forwards|timings|GPU memory|error" || exit 1
  python3 - "$OUT/sweep-$tag.timings.json" "$OUT/sweep-$tag.mem.json" "$tag" <<'PY'
import json, sys
t, m = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
n = t["samples_scored"]
print(f"{sys.argv[3]}: calibration {t['calibration']:.2f} s, scoring {t['scoring']:.2f} s, "
      f"{1000 * (t['calibration'] + t['scoring']) / n:.1f} ms/sample end to end; peak {m['peak_bytes'] / 2**30:.2f} GiB (NVML)")
PY
  if [ -z "$first" ]; then first=$W/sweep-$tag.msgpack
  else python3 scripts/bench/same_scores.py --label "$tag vs b$(echo $BATCHES | cut -d' ' -f1)" $W/sweep-$tag.msgpack "$first" --min-spearman 0.9999
  fi
done
