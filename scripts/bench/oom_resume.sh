#!/usr/bin/env bash
# GPU check of score-layers' out-of-memory handling and --resume (issue 13), on a real-size
# checkpoint: 4 samples, the third ~4× longer than the others (one 1024×1024 image, 1,102 tokens
# against 274). Run on the GPU machine after scripts/bench_gpu.sh has unpacked the binaries:
#   scripts/bench/oom_resume.sh CHECKPOINT_DIR
# 1. reference: the 4 samples, no limit (peak memory P_all); 2. the short samples only (P_short);
# 3. --gpu-memory-limit halfway between the two: must exit 2 with one line naming sample 2, its
#    token count and the memory asked, leaving a state file with samples 0 and 1;
# 4. --resume without the limit: must finish and give the reference's scores.
# Calibration uses the first 2 samples (--calib-samples 2) so that the long one is first met
# while scoring; one sample per forward (--batch-tokens 1), so the failure is the long sample's.
# Writes $OUT/oom_resume.txt; exits 1 on any deviation.
set -uo pipefail
cd "$(dirname "$0")/../.."
CKPT=$1
OUT=${OUT:-/tmp/qsens-bench}; mkdir -p "$OUT"
W=.bench/oom; rm -rf $W; mkdir -p $W
BIN=.bench/bin/score-layers
R="$OUT/oom_resume.txt"; : > "$R"
say() { echo "$*" | tee -a "$R"; }
fail() { say "FAIL: $*"; exit 1; }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}

python3 scripts/bench/make_inputs.py --sizes 448,448,1024,448 --out $W/mixed.msgpack | tee -a "$R"
python3 scripts/bench/make_inputs.py --sizes 448,448,448 --out $W/short.msgpack | tee -a "$R"
run() { # name inputs extra-flags...
  local name=$1 inputs=$2; shift 2
  python3 scripts/bench/gpumem.py $W/$name.mem.json -- $BIN -q --model "$CKPT" --inputs $inputs --device cuda \
    --dtype bf16 --calib-samples 2 --batch-tokens 1 -o $W/$name.msgpack "$@" 2> $W/$name.stderr
}
run all $W/mixed.msgpack || fail "reference run: $(cat $W/all.stderr)"
run short $W/short.msgpack || fail "short run: $(cat $W/short.stderr)"
read -r IDLE P_ALL P_SHORT LIMIT < <(python3 -c "
import json
a, s = (json.load(open('$W/' + n + '.mem.json')) for n in ('all', 'short'))
limit = a['idle_bytes'] + (a['peak_bytes'] + s['peak_bytes']) / 2
print(a['idle_bytes'], a['peak_bytes'], s['peak_bytes'], limit / 2**30)")
say "idle $(python3 -c "print(f'{$IDLE/2**30:.2f}')") GiB; peak above idle: all 4 samples $(python3 -c "print(f'{$P_ALL/2**30:.2f}')") GiB, short samples only $(python3 -c "print(f'{$P_SHORT/2**30:.2f}')") GiB; limit $(printf %.2f $LIMIT) GiB"
python3 -c "import sys; sys.exit(0 if $P_ALL - $P_SHORT > 2**28 else 1)" \
  || fail "the long sample needs less than 256 MiB more than the short ones: no room for a limit between them"

run capped $W/mixed.msgpack --gpu-memory-limit "$LIMIT"; rc=$?
say "capped run: exit $rc, stderr ($(wc -l < $W/capped.stderr) line):"
cat $W/capped.stderr | tee -a "$R"
[ $rc -eq 2 ] || fail "expected exit 2"
[ "$(wc -l < $W/capped.stderr)" -eq 1 ] || fail "expected one line"
grep -q "scoring sample 2 (synthetic-0002, 1102 tokens): CUDA out of memory (asked for" $W/capped.stderr || fail "the line does not name sample 2, its tokens and the memory asked"
[ ! -e $W/capped.msgpack ] || fail "an output was written"
python3 -c "
import msgpack
s = msgpack.unpackb(open('$W/capped.msgpack.partial', 'rb').read(), raw=False)['payload']['samples']
print('state file: samples', [x['index'] for x in s])
assert [x['index'] for x in s] == [0, 1], s" | tee -a "$R" || fail "the state file does not hold samples 0 and 1"

run capped $W/mixed.msgpack --resume; rc=$?
say "resumed run: exit $rc"
[ $rc -eq 0 ] || fail "resume: $(cat $W/capped.stderr)"
python3 - "$W/all.msgpack" "$W/capped.msgpack" <<'EOF' | tee -a "$R" || fail "resumed scores differ from the reference"
import sys, msgpack
a, b = (msgpack.unpackb(open(p, "rb").read(), raw=False)["payload"] for p in sys.argv[1:])
assert [s["index"] for s in b["samples"]] == [0, 1, 2, 3], b["samples"]
ga, gb = ({g["name"]: g["scores"] for g in x["groups"]} for x in (a, b))
assert ga.keys() == gb.keys()
worst = max(abs(p - q) / max(abs(q), 1e-30) for n in ga for p, q in zip(ga[n], gb[n]))
print(f"resumed vs reference: {len(ga)} groups, samples 0-3, largest relative difference {worst:.2e}")
assert worst <= 1e-6, worst
EOF
say "PASS"
