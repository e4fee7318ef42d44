#!/usr/bin/env bash
# Fills what make_modelopt_formats.sh needs on the GPU machine into .carry/ (git-ignored):
#   .carry/wheels    ModelOpt 0.47 and the packages the GPU image lacks (as scripts/bench/pack.sh step 2)
#   .carry/fixtures  qwen3-vl-tiny (config.json, model.safetensors) and the 4 reference samples, each
#                    reduced to the model inputs (the tensors are byte-identical to ../shared's)
# Needs PyPI the first time. About 60 MB in all (the device's carry limit is 64 MiB with the worktree).
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared}
PY=${PYTHON:-python3}
mkdir -p .carry/wheels .carry/fixtures/qwen3-vl-tiny .carry/fixtures/reference   # /.carry/ is in .gitignore

if ! ls .carry/wheels/nvidia_modelopt-0.47.0-*.whl >/dev/null 2>&1; then
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .carry/wheels nvidia-modelopt==0.47.0 omegaconf 'pulp<4' pydantic pydantic-core \
    annotated-types typing-inspection
  pulp=$(ls .carry/wheels/pulp-*.whl)
  zip -q -d "$pulp" 'pulp/solverdir/cbc/osx/*' 'pulp/solverdir/cbc/win/*' 'pulp/solverdir/cbc/linux/arm64/*' \
    'pulp/solverdir/cbc/linux/i32/*' 'pulp/tests/*' || true
fi

cp -f "$SHARED/fixtures/qwen3-vl-tiny/config.json" "$SHARED/fixtures/qwen3-vl-tiny/model.safetensors" \
  .carry/fixtures/qwen3-vl-tiny/
[ -f "$SHARED/fixtures/qwen3-vl-tiny/generation_config.json" ] && \
  cp -f "$SHARED/fixtures/qwen3-vl-tiny/generation_config.json" .carry/fixtures/qwen3-vl-tiny/
$PY - "$SHARED/fixtures/reference" .carry/fixtures/reference <<'EOF'
import sys, json
from safetensors.numpy import load_file, save_file
src, dst = sys.argv[1:]
keep = ["input_ids", "attention_mask", "labels", "mm_token_type_ids", "pixel_values_u8", "image_grid_thw"]
for k in range(4):
    t = load_file(f"{src}/sample_{k:02d}.safetensors")
    save_file({n: t[n] for n in keep}, f"{dst}/sample_{k:02d}.safetensors", metadata={"source": f"fixtures/reference/sample_{k:02d}.safetensors, model inputs only"})
EOF
du -sh .carry/wheels .carry/fixtures
