#!/usr/bin/env bash
# Makes tests/data/modelopt_export_nvfp4/ (issue 12, acceptance 4): ModelOpt 0.47's own export of
# the mixed NVFP4 / W4A16_NVFP4 / FP8 recipe of scripts/reference/modelopt_export_nvfp4.py. Run ON
# the GPU machine (device tool) from the repo root, after scripts/reference/pack_modelopt_formats.sh
# filled .carry/wheels and .carry/fixtures here; carry both:
#   OUT=<dir> bash scripts/reference/make_modelopt_export_nvfp4.sh
# The folder it writes to $OUT/modelopt_export_nvfp4/ is committed as it comes back.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/modelopt_export_nvfp4_out}
D=$OUT/modelopt_export_nvfp4
rm -rf "$D"; mkdir -p "$D"
export PYTHONUNBUFFERED=1
if ! PYTHONPATH=/tmp/site python3 -c 'import modelopt, sys; sys.exit(modelopt.__version__ != "0.47.0")' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
FIXTURES=${FIXTURES:-$([ -d .carry/fixtures ] && echo .carry/fixtures || echo ../shared/fixtures)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$D/machine.txt"
python3 scripts/reference/modelopt_export_nvfp4.py --fixtures "$FIXTURES" --out "$D" --device cuda 2>&1 \
  | grep -v -e Warning -e '_warnings.warn' | tee "$D/log.txt"
cp "$0" "$D/make_modelopt_export_nvfp4.sh.used"
ls -la "$D"
