#!/usr/bin/env bash
# Run THERE, through the device tool, after benchmarks/device/prepare.sh here:
#   run(command="bash benchmarks/device/run.sh", carry=[".whl", ".devdata"], timeout_s=590)
# Prove it HERE first, on the CPU with tiny settings (no wheels installed, the venv's python):
#   DRY=1 bash benchmarks/device/run.sh
# Issue 12's GPU items, each under a time guard so the whole stays inside BUDGET_S (default 560 s)
# and what finished still comes back:
#   1. the real CIFAR-10 CAS baseline under the default protocol (train/cas-lomurno.yaml: 40,000 fit,
#      10,000 real held-out validation images, compile auto = CUDA graphs): top-1 (goal >= 82.0) and
#      wall time (goal for the record <= 45 s)
#   2. streamed parquet shards vs the in-memory tensor at N and 4N images (peak RSS, images/s), and
#      training images/s fed by each: ResNet-20 at 32 px, ViT-S/16 at 224 px (JPEG decoded on the GPU)
#   3. with the time left, when THROUGHPUT=1: training throughput (bench_train.py --devices cuda)
# Results land in $OUT; copy them into benchmarks/results/ here.
set -uo pipefail
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
left() { echo $((BUDGET_S - SECONDS)); }
if [ "${DRY:-0}" = 1 ]; then
  # CPU proof of the script itself: the same steps, tiny sizes, nothing installed
  PY=${PY:-$(cd "$(dirname "$0")/../.." && pwd)/../main/.venv/bin/python}
  DEVICE=cpu CIFAR=${CIFAR:-../shared/datasets/cifar10} N=${N:-2000} WORKERS=2
  CAS_SET=(--set model=resnet20 --set epochs=1 --set real_fit=2000 --set real_val=500 --set limit_real_test=500 --threads 2)
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COLUMNS=150
else
  PY=python3 DEVICE=cuda CIFAR=.devdata/cifar10 N=${N:-50000} WORKERS=${WORKERS:-12}
  CAS_SET=(--set "compile=${COMPILE:-auto}")
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SYNTHGEN_CACHE=/tmp/synthgen-cache COLUMNS=150
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
fi
"$PY" - <<'PYEOF' || exit 1
import importlib.metadata as m
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for p in ("datasets", "pyarrow", "fsspec", "huggingface-hub", "timm", "safetensors", "torchvision", "numpy", "pillow", "pydantic"):
    try:
        print(p, m.version(p))
    except Exception:
        print(p, "missing")
import synthgen.train.cas, synthgen.train.stream  # fail here, not halfway, when something is missing
PYEOF
echo "== 1. CAS baseline, default protocol, $(left)s left"
timeout $(( $(left) * 2 / 5 )) "$PY" benchmarks/bench_cas_baseline.py --cifar "$CIFAR" --device "$DEVICE" "${CAS_SET[@]}" \
  --output "$OUT/cas-baseline-cas-lomurno-resnet20_w64-$DEVICE.json" 2>&1 | tee "$OUT/cas-baseline.log"
echo "== 2. streamed vs in-memory, N=$N and 4N, $(left)s left"
timeout $(( $(left) - 20 )) "$PY" benchmarks/bench_stream.py --cifar "$CIFAR" --n "$N" --device "$DEVICE" --workers "$WORKERS" \
  --work /tmp/synthgen-bench-stream --output "$OUT/stream-$DEVICE.json" 2>&1 | tee "$OUT/stream.log"
if [ "${THROUGHPUT:-0}" = 1 ] && [ "$(left)" -gt 90 ]; then
  echo "== 3. training throughput, $(left)s left"
  timeout $(( $(left) - 10 )) "$PY" benchmarks/bench_train.py --no-cas --devices "$DEVICE" --models resnet20,resnet20_w64,vit_tiny \
    --output "$OUT/train-$DEVICE.json" 2>&1 | tee "$OUT/train.log"
fi
echo "== done in ${SECONDS}s"
