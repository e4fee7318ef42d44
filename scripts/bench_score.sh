#!/usr/bin/env bash
# Benchmark of `score-layers` on the 4 fixture samples (CPU, f32, release build; not a test).
#
#   scripts/bench_score.sh [REPS=3]      (env: QSENS_FIXTURES, CARGO_TARGET_DIR, RAYON_NUM_THREADS,
#                                         METHODS="gradient kl_div")
#
# Makes the fixture inputs as the ModelOpt reference runs were fed (calib-extract of images 1-4,
# preprocess with min/max pixels 65536/262144), then times each method REPS times and prints the
# best and median wall times with user/sys CPU of the best run. Target (issue 4): the gradient
# method <= 10 s on 2 cores. ModelOpt 0.47 on the same samples (1 torch thread, from the fixture
# dumps): gradient 15.8 s, kl_div 156.7 s.
set -euo pipefail

REPS=${1:-3}
METHODS=${METHODS:-gradient kl_div}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FIXTURES=${QSENS_FIXTURES:-$ROOT/../shared/fixtures}
MODEL=$FIXTURES/qwen3-vl-tiny
[ -f "$MODEL/model.safetensors" ] || { echo "bench_score: no checkpoint at $MODEL (set QSENS_FIXTURES)" >&2; exit 2; }

cd "$ROOT"
cargo build --release --quiet --bin calib-extract --bin preprocess --bin score-layers
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$BIN/calib-extract" -q --from-coco "$FIXTURES/coco/captions.json" --db "$TMP/coco.db"
"$BIN/calib-extract" -q --db "$TMP/coco.db" --image-root "$FIXTURES/images" \
    --query "SELECT sample_id, image_id, file_name, caption, split FROM samples WHERE image_id <= 4" \
    -o "$TMP/calib.json"
"$BIN/preprocess" -q --calibration "$TMP/calib.json" --model "$MODEL" --min-pixels 65536 --max-pixels 262144 \
    -o "$TMP/inputs.msgpack"

TIMEFORMAT='%R %U %S'
printf '%-9s %5s %9s %9s %9s %9s  %s\n' method reps "best s" "median s" "user s" "sys s" "target"
for method in $METHODS; do
    : > "$TMP/times"
    for _ in $(seq "$REPS"); do
        { time "$BIN/score-layers" -q --model "$MODEL" --inputs "$TMP/inputs.msgpack" --method "$method" \
            -o "$TMP/$method.msgpack" ; } 2>> "$TMP/times"
    done
    target=$([ "$method" = gradient ] && echo "<= 10 s on 2 cores" || echo "-")
    sort -n "$TMP/times" | awk -v m="$method" -v n="$REPS" -v t="$target" '
        { wall[NR] = $1; user[NR] = $2; sys[NR] = $3 }
        END { printf "%-9s %5d %9.2f %9.2f %9.2f %9.2f  %s\n", m, n, wall[1], wall[int((NR + 1) / 2)], user[1], sys[1], t }'
done
echo "($(nproc) cores; CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
