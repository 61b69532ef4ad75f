#!/usr/bin/env bash
# Run THERE, through the device tool, after benchmarks/device/prepare.sh here:
#   run(command="bash benchmarks/device/run.sh", carry=[".whl", ".devdata"], timeout_s=590)
# Issue 3's GPU items, each under a time guard so the whole stays inside BUDGET_S (default 560 s)
# and what finished still comes back:
#   1. GPU training throughput (bench_train.py --devices cuda), eager plus the torch.compile modes
#      in THROUGHPUT_COMPILE (default: none)
#   2. the full-protocol real CIFAR-10 CAS baseline (goal >= 82.0% top-1; one training < 3 min),
#      with the classifier compiled in mode COMPILE (default off)
#   3. with the time left, when EXTRA_COMPILE is set: throughput of those compile modes
# Results land in $OUT; copy them into benchmarks/results/ here.
set -uo pipefail
BUDGET_S=${BUDGET_S:-560}
MODELS=${MODELS:-resnet20,resnet20_w64,vit_tiny}
COMPILE=${COMPILE:-off}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
left() { echo $((BUDGET_S - SECONDS)); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SYNTHGEN_CACHE=/tmp/synthgen-cache COLUMNS=150
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 - <<'EOF' || exit 1
import importlib.metadata as m
import torch, pydantic
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for p in ("pyarrow", "fsspec", "huggingface-hub", "timm", "numpy", "pillow"):
    try:
        print(p, m.version(p))
    except Exception:
        print(p, "missing")
try:
    import datasets
    print("datasets", datasets.__version__)
except Exception as exc:  # say why before the benchmarks fail on it
    print("datasets NOT importable:", type(exc).__name__, exc)
EOF
echo "== 1. throughput, $(left)s left"
timeout $(( $(left) / 3 )) python3 benchmarks/bench_train.py --no-cas --devices cuda --models "$MODELS" \
  --compile-modes "${THROUGHPUT_COMPILE:-}" --output "$OUT/train-gpu.json" 2>&1 | tee "$OUT/train-gpu.log"
echo "== 2. full-protocol baseline (compile: $COMPILE), $(left)s left"
timeout $(( $(left) - 15 )) python3 benchmarks/bench_cas_baseline.py --cifar .devdata/cifar10 --device cuda \
  --set compile="$COMPILE" --output "$OUT/cas-baseline-resnet20_w64-cuda.json" 2>&1 | tee "$OUT/cas-baseline.log"
if [ -n "${EXTRA_COMPILE:-}" ]; then
  echo "== 3. throughput (torch.compile: $EXTRA_COMPILE), $(left)s left"
  if [ "$(left)" -gt 100 ]; then
    timeout $(( $(left) - 10 )) python3 benchmarks/bench_train.py --no-cas --devices cuda --models "$MODELS" \
      --compile-modes "$EXTRA_COMPILE" --output "$OUT/train-gpu-compile.json" 2>&1 | tee "$OUT/train-gpu-compile.log"
  else
    echo "skipped: too little time left"
  fi
fi
echo "== done in ${SECONDS}s"
