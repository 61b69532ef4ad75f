#!/usr/bin/env bash
# Run THERE, through the device tool (prepared on CPU, not yet run on a GPU):
#   here:  PY=/work/main/.venv/bin/python bash benchmarks/device/prepare_classcond.sh
#   there: run(command="bash benchmarks/device/classcond.sh", carry=[".whl"], timeout_s=400)
# Stage-1 speed and memory of class-conditioned SD with SD 1.5's architecture (random weights) at
# 128 px, batch 64 (Lomurno et al.'s), bf16: benchmarks/bench_classcond.py --device cuda.
# Results land in $OUT; copy them into benchmarks/results/ here.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SYNTHGEN_CACHE=/tmp/synthgen-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" || exit 1
timeout 360 python3 benchmarks/bench_classcond.py --device cuda ${BATCH:+--batch $BATCH} \
  --output "$OUT/classcond-cuda.json" 2>&1 | tee "$OUT/classcond-cuda.log"
