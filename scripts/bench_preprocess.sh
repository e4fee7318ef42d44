#!/usr/bin/env bash
# Benchmark of the first two stages on COCO-size images (not a test).
#
#   scripts/bench_preprocess.sh [N=128] [WIDTH=640] [HEIGHT=480]
#
# Generates N synthetic JPEGs (examples/synth_coco.rs) in a temporary folder, builds the
# calibration DB, extracts all N samples, then times `preprocess` (release build) on them with the
# released Qwen3-VL processor settings of the fixture checkpoint (default min/max pixels).
# Prints wall times and the artifact size per sample. Target: preprocess of 128 640×480 JPEGs
# ≤ 10 s on 2 cores. Uses QSENS_FIXTURES (default ../shared/fixtures) for the tokenizer/template.
set -euo pipefail

N=${1:-128}
W=${2:-640}
H=${3:-480}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FIXTURES=${QSENS_FIXTURES:-$ROOT/../shared/fixtures}
MODEL=$FIXTURES/qwen3-vl-tiny
[ -f "$MODEL/tokenizer.json" ] || { echo "bench_preprocess: no checkpoint at $MODEL (set QSENS_FIXTURES)" >&2; exit 2; }

cd "$ROOT"
cargo build --release --quiet --bin calib-extract --bin preprocess --example synth_coco
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$BIN/examples/synth_coco" "$TMP" "$N" "$W" "$H"
"$BIN/calib-extract" -q --from-coco "$TMP/captions_synth.json" --db "$TMP/synth.db"

t0=$(date +%s.%N)
"$BIN/calib-extract" -q --db "$TMP/synth.db" --image-root "$TMP/images" -o "$TMP/calib.msgpack"
t1=$(date +%s.%N)
"$BIN/preprocess" -q --calibration "$TMP/calib.msgpack" --model "$MODEL" -o "$TMP/inputs.msgpack"
t2=$(date +%s.%N)

size=$(stat -c %s "$TMP/inputs.msgpack")
awk -v n="$N" -v w="$W" -v h="$H" -v a="$t0" -v b="$t1" -v c="$t2" -v size="$size" -v cores="$(nproc)" 'BEGIN {
    printf "images: %d synthetic %dx%d JPEGs, %d cores\n", n, w, h, cores
    printf "calib-extract: %.2f s\n", b - a
    printf "preprocess:    %.2f s (target <= 10 s for 128 640x480)\n", c - b
    printf "artifact:      %d B = %.0f B/sample (%.2f MB/sample)\n", size, size / n, size / n / 1e6
    rgb = w * h * 3
    printf "               (source RGB bytes: %.2f MB/sample at %dx%d; f32 pixel_values of that: %.1f MB/sample)\n", rgb / 1e6, w, h, rgb * 2 * 4 / 1e6
    if (size / n > 4 * rgb || size / n < rgb / 4) { print "artifact size per sample is off by more than 4x from the RGB bytes" > "/dev/stderr"; exit 1 }
}'
