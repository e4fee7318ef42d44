#!/usr/bin/env bash
# Builds what the GPU benchmark carries to the device machine into .carry/ (git-ignored):
# compressed CUDA binaries (the 64 MiB carry limit), ModelOpt's wheels (pulp trimmed to its
# linux-x86_64 CBC), the 4B architecture config, and a CPU reference run on the demo set.
# Needs the CUDA build environment (docs/cuda.md) and network access to PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA_ENV=${CUDA_ENV:-$HOME/.qsens-cuda/env.sh}
CUDA_TARGET=${CUDA_TARGET:-target/cuda}
SHARED=${SHARED:-../shared}
mkdir -p .carry/wheels .carry/bin
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude

# 1. binaries: score-layers and evaluate with CUDA; search and manifest-to-md need none.
#    WITH_SELFTEST=1 adds examples/gpu_selftest (the fused kernels' GPU check, ~43 MB stripped).
SELFTEST=${WITH_SELFTEST:+--example gpu_selftest}
( source "$CUDA_ENV" && CARGO_TARGET_DIR=$CUDA_TARGET cargo build -q --release --features cuda --bin score-layers \
    --bin evaluate --example profile_scoring $SELFTEST )
cargo build -q --release --bin search --bin manifest-to-md --bin preprocess --bin calib-extract
for b in score-layers evaluate; do strip -o .carry/bin/$b "$CUDA_TARGET/release/$b"; done
strip -o .carry/bin/profile_scoring "$CUDA_TARGET/release/examples/profile_scoring"
if [ -n "$SELFTEST" ]; then strip -o .carry/bin/gpu_selftest "$CUDA_TARGET/release/examples/gpu_selftest"; fi
for b in search manifest-to-md; do strip -o .carry/bin/$b target/release/$b; done
tar -C .carry -cJf .carry/qsens-bin.tar.xz bin && rm -rf .carry/bin

# 2. ModelOpt 0.47 and what it needs beyond the machine's packages.
if ! ls .carry/wheels/nvidia_modelopt-0.47.0-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .carry/wheels nvidia-modelopt==0.47.0 omegaconf 'pulp<4' pydantic pydantic-core \
    annotated-types typing-inspection
  pulp=$(ls .carry/wheels/pulp-*.whl)
  zip -q -d "$pulp" 'pulp/solverdir/cbc/osx/*' 'pulp/solverdir/cbc/win/*' 'pulp/solverdir/cbc/linux/arm64/*' \
    'pulp/solverdir/cbc/linux/i32/*' 'pulp/tests/*'
fi

# 3. the architecture and a CPU reference run on the demo set (for the CUDA correctness check).
cp "$SHARED/bench/qwen3-vl-4b-instruct.config.json" .carry/
make -s demo >/dev/null
rm -rf .carry/demo && mkdir -p .carry/demo
cp -r target/demo/model .carry/demo/model
cp -r target/demo .carry/demo/set
cp tmp/demo/model_inputs.msgpack tmp/demo/recipes/modelopt_quant_cfg.json .carry/demo/
for dt in f32 bf16; do
  target/release/score-layers -q --model target/demo/model --inputs tmp/demo/model_inputs.msgpack \
    --dtype $dt -o .carry/demo/scores-cpu-$dt.msgpack
done

# 4. the MoE fixture (rounded to bf16 so it fits the carry limit), its 4 reference samples and CPU
#    reference runs: bench_gpu.sh checks CUDA against them (MODEL=30b-a3b needs the 30B-A3B config too).
cp "$SHARED/bench/qwen3-vl-30b-a3b-instruct.config.json" .carry/
rm -rf .carry/moe && mkdir -p .carry/moe/model
python3 scripts/bench/to_bf16.py "$SHARED/fixtures/qwen3-vl-moe-tiny/model.safetensors" .carry/moe/model/model.safetensors
cp "$SHARED/fixtures/qwen3-vl-moe-tiny/config.json" .carry/moe/model/
MOE_TMP=$(mktemp -d)
target/release/calib-extract -q --from-coco "$SHARED/fixtures/coco/captions.json" --db "$MOE_TMP/c.db"
target/release/calib-extract -q --db "$MOE_TMP/c.db" --image-root "$SHARED/fixtures/images" -o "$MOE_TMP/calib.json" \
  --query 'SELECT sample_id, image_id, file_name, caption, split FROM samples WHERE image_id <= 4'
target/release/preprocess -q --calibration "$MOE_TMP/calib.json" --model "$SHARED/fixtures/qwen3-vl-moe-tiny" \
  --min-pixels 65536 --max-pixels 262144 -o .carry/moe/model_inputs.msgpack
rm -rf "$MOE_TMP"
for dt in f32 bf16; do
  target/release/score-layers -q --model .carry/moe/model --inputs .carry/moe/model_inputs.msgpack \
    --dtype $dt -o .carry/moe/scores-cpu-$dt.msgpack
done
du -sh .carry; du -sh .carry/*
