#!/usr/bin/env bash
# Run THERE, through the device tool, after benchmarks/device/prepare.sh here:
#   run(command="bash benchmarks/device/run.sh", carry=[".whl", ".devdata"], timeout_s=590)
# Issue 3's GPU items: training throughput (CPU and GPU) and the full-protocol real CIFAR-10 CAS
# baseline (goal: >= 82.0% top-1; one training run in < 3 min on an H100). Results land in $OUT;
# copy them into benchmarks/results/ here. STAGE=train or STAGE=cas runs one half.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SYNTHGEN_CACHE=/tmp/synthgen-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, datasets, pydantic; print('torch', torch.__version__, 'datasets', datasets.__version__, 'pydantic', pydantic.__version__)" || exit 1
if [ "${STAGE:-all}" != cas ]; then
  python3 benchmarks/bench_train.py --cifar .devdata/cifar10 --no-cas --output "$OUT/train-gpu.json"
fi
if [ "${STAGE:-all}" != train ]; then
  python3 benchmarks/bench_cas_baseline.py --cifar .devdata/cifar10 --device cuda \
    --output "$OUT/cas-baseline-resnet20_w64-cuda.json" 2>&1 | tee "$OUT/cas-baseline.log"
fi
