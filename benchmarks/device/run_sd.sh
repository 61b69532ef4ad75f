#!/usr/bin/env bash
# Run THERE, through the device tool, after benchmarks/device/prepare.sh here:
#   run(command="bash benchmarks/device/run_sd.sh", carry=[".whl"], timeout_s=590)
# Issue 10's GPU table: benchmarks/bench_sd.py on Stable Diffusion 1.5's architecture (random
# weights, built on the GPU from the configs in synthgen/generate/sd15.py): plain diffusers fp16 vs
# the engine at 512 px, 25 and 50 steps, batch 32/16/8/1, then the phase breakdown, the end-to-end
# build rate and the pixel effect of each optimisation. The bench stops starting measurements
# BENCH_MARGIN_S (60 s) before BUDGET_S (default 480 s), `timeout` kills it 10 s before, and it
# rewrites its JSON after every measurement, so what finished comes back in $OUT either way.
# Extra bench arguments go in BENCH_ARGS, e.g. BENCH_ARGS="--engine-set compile=false".
# Prove it here first, on a CPU at a small size (a few minutes: SD 1.5 is 1.07B parameters):
#   DEVICE=cpu SMALL=1 OUT=/tmp/out-sd PY=.venv/bin/python bash benchmarks/device/run_sd.sh
set -uo pipefail
BUDGET_S=${BUDGET_S:-480}
BENCH_MARGIN_S=${BENCH_MARGIN_S:-60}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
left() { echo $((BUDGET_S - SECONDS)); }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 SYNTHGEN_CACHE=/tmp/synthgen-cache COLUMNS=150
if ! "$PY" -c "import diffusers, datasets, pydantic" 2>/dev/null; then  # the GPU image lacks these
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ "${DEVICE%%:*}" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
fi
# Pre-flight, in seconds: versions, and the offline tokenizer and pipeline classes the bench needs.
"$PY" - <<'EOF' || exit 1
import tempfile
from pathlib import Path
import torch, diffusers, transformers
from transformers import CLIPTokenizer
from synthgen.generate.tiny import write_tokenizer
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
print("diffusers", diffusers.__version__, "transformers", transformers.__version__)
with tempfile.TemporaryDirectory() as tmp:
    write_tokenizer(Path(tmp))
    assert len(CLIPTokenizer.from_pretrained(tmp)("a cat", padding="max_length", max_length=77).input_ids) == 77
EOF
if [ -n "${SMALL:-}" ]; then
  ARGS="--size 64 --steps 2 --batches 2,1 --repeats 1 --pixel-batch 1"
else
  ARGS=""
fi
echo "== bench_sd on $DEVICE, $(left)s left"
# shellcheck disable=SC2086
timeout $(( $(left) - 10 )) "$PY" benchmarks/bench_sd.py --device "$DEVICE" $ARGS ${BENCH_ARGS:-} \
  --budget-s $(( $(left) - BENCH_MARGIN_S )) --out "$OUT/generate-sd15-${DEVICE%%:*}.json" 2>&1 | tee "$OUT/generate-sd15.log"
echo "== done in ${SECONDS}s"
