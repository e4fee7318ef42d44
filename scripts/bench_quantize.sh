#!/usr/bin/env bash
# `quantize` on the random-weight Qwen3-VL-4B architecture (bf16, 8.9 GB), run ON the GPU machine
# from the repo root (it only needs its CPUs and memory): makes the checkpoint, a manifest for it
# (score-layers on the CPU, one synthetic sample: the manifest only needs real amax and digests),
# then times `quantize` in both layouts from the page cache and records peak RSS and output size.
# Carry .carry/qsens-cpu.tar.xz (quantize, score-layers, search: `cargo build --release` here,
# stripped) and .carry/qwen3-vl-4b-instruct.config.json.   OUT=<dir> scripts/bench_quantize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qsens-bench}; mkdir -p "$OUT"
W=.bench; mkdir -p $W
tar -C $W -xJf .carry/qsens-cpu.tar.xz
log() { echo "[bench $(date +%H:%M:%S)] $*"; }
lscpu | grep -E "^Model name|^CPU\(s\)" | tee "$OUT/cpu.txt"; free -g | head -2 | tee -a "$OUT/cpu.txt"
log "checkpoint"
python3 scripts/bench/make_checkpoint.py --config .carry/qwen3-vl-4b-instruct.config.json --out $W/qwen3-vl-4b
CKPT=$W/qwen3-vl-4b
python3 scripts/bench/make_inputs.py --num 1 --out $W/inputs-1.msgpack
log "score-layers (CPU, f32, 1 sample) and search"
$W/bin/score-layers -q --model $CKPT --inputs $W/inputs-1.msgpack --dtype f32 -o $W/scores.msgpack
$W/bin/search -q --scores $W/scores.msgpack --effective-bits 12 --bootstrap 10 -o $W/manifest.json
cat $CKPT/*.safetensors > /dev/null   # from the page cache, as the goal says
du -sb $CKPT | tee "$OUT/sizes.txt"
for layout in modelopt compressed-tensors; do
  for run in 1 2; do
    log "quantize --layout $layout (run $run)"
    python3 scripts/bench/peak_rss.py "$OUT/quantize-$layout-$run.json" -- $W/bin/quantize --model $CKPT \
      --manifest $W/manifest.json --scores $W/scores.msgpack --layout $layout --skip-vllm-checks --force \
      -o $W/out-$layout
  done
  du -sb $W/out-$layout | tee -a "$OUT/sizes.txt"
  ls -la $W/out-$layout | tee "$OUT/listing-$layout.txt"
done
grep -h -o '"quantization_config".\{0,200\}' $W/out-*/config.json | head -4
log done
