#!/usr/bin/env bash
# Every GPU measurement of the issues, as one prepared script. Run THERE, through the device tool,
# after `bash benchmarks/device/prepare.sh` HERE:
#   run(command="bash benchmarks/device/run_all.sh", carry=[".whl", ".devdata"], timeout_s=590)
# A session has 15 minutes of device time, start-up included. Two H100 sessions (2026-11-27, twice)
# measured what issues 10 and 12 ask (benchmarks/results/*-h100*.json, benchmarks/device/NOTES.md);
# the default STAGES are what no session finished: diffusers' inductor tuning recipe against the
# engine (its compile outlived the budget left to it) and the streamed loader's GPU figures.
# Stages, in the order given by STAGES (comma-separated):
#   sd         issue 10: SD 1.5 architecture (random weights) at 512 px, plain diffusers fp16 vs the
#              engine, bench_sd.py with SD_ARGS [default: the whole table with the build rate and the
#              pixel effects, 32,16,8,1; two compiles of ~2 min each, more than one call: pass
#              e.g. SD_ARGS="--stages table,attention,variants --batches 8,1 --variant-batch 16"
#              (the second session's call: rows 8 and 1, the compiled breakdown, SDPA's backends,
#              then cuDNN autotuning, cuDNN attention, CUDA graphs and inductor tuning at 16)]
#   sd-tuning  issue 10: the slowest candidate alone (diffusers' inductor tuning recipe: the engine's
#              compile, then a full recompile with coordinate-descent tuning)
#   cas        issue 12 (measured 2026-11-27: 83.24%, 109 s): real CIFAR-10 CAS baseline under
#              train/cas-lomurno.yaml, bench_cas_baseline.py
#   classcond  issue 8: stage-1 images/s and peak memory, one tuning trial, H100 projection,
#              bench_classcond.py
#   stream     issue 12: streamed parquet vs in-memory at N and 4N, bench_stream.py
#   train      training throughput, bench_train.py
# Each stage runs under `timeout` within what is left of BUDGET_S (default 570 s), with its own cap
# (SD_S, SD_TUNING_S, CAS_S, CLASSCOND_S, STREAM_S, TRAIN_S); every bench rewrites or writes its JSON
# so what finished comes back. Results land in $OUT (<stage>-<device>.json and .log): copy them into
# benchmarks/results/ here.
# Prove it HERE first, on the CPU at small sizes (several minutes; nothing is installed):
#   DEVICE=cpu SMALL=1 OUT=/tmp/out-dev bash benchmarks/device/run_all.sh
# and with the GPU image's package versions and only the carried wheels (simulate_image.sh):
#   bash benchmarks/device/simulate_image.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGES=${STAGES:-sd-tuning,stream}
BUDGET_S=${BUDGET_S:-570}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
left() { echo $((BUDGET_S - SECONDS)); }
cap() { local l; l=$(( $(left) - 5 )); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }

if [ "$DEVICE" = cpu ]; then
  PY=${PY:-$PWD/.venv/bin/python}
  [ -x "$PY" ] || PY=/work/main/.venv/bin/python
  CIFAR=${CIFAR:-../shared/datasets/cifar10}
  export PYTHONPATH=$PWD
else
  PY=python3
  CIFAR=${CIFAR:-.devdata/cifar10}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
fi
export PYTHONUNBUFFERED=1 SYNTHGEN_CACHE=/tmp/synthgen-cache COLUMNS=150 HF_DATASETS_CACHE=/tmp/hf-datasets

# Pre-flight, in seconds: versions, and every module a stage imports (fail here, not halfway).
"$PY" - <<'PYEOF' || exit 1
import importlib.metadata as m
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for p in ("diffusers", "transformers", "accelerate", "optuna", "datasets", "pyarrow", "huggingface-hub",
          "safetensors", "pydantic", "torchvision", "numpy", "pillow"):
    try:
        print(p, m.version(p))
    except Exception:
        print(p, "missing")
import tempfile
from pathlib import Path
from transformers import CLIPTokenizer
import synthgen.train.cas, synthgen.train.stream, synthgen.generate.sd15, synthgen.classcond  # noqa: F401
from synthgen.generate.tiny import write_tokenizer
with tempfile.TemporaryDirectory() as tmp:  # the offline tokenizer bench_sd builds
    write_tokenizer(Path(tmp))
    assert len(CLIPTokenizer.from_pretrained(tmp)("a cat", padding="max_length", max_length=77).input_ids) == 77
PYEOF

run_stage() {  # name, seconds cap, command...
  local name=$1 seconds; seconds=$(cap "$2"); shift 2
  if [ "$seconds" -lt 30 ]; then echo "== $name: skipped, $(left)s left"; return; fi
  echo "== $name on $DEVICE, up to ${seconds}s of $(left)s left"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name-$DEVICE.log"
}

for stage in ${STAGES//,/ }; do
  case $stage in
    cas)
      if [ -n "${SMALL:-}" ]; then
        set_args=(--set model=resnet20 --set epochs=1 --set real_fit=2000 --set real_val=500 --set limit_real_test=500 --threads 2)
      else
        set_args=(--set "compile=${COMPILE:-auto}")
      fi
      run_stage cas "${CAS_S:-200}" "$PY" benchmarks/bench_cas_baseline.py --cifar "$CIFAR" --device "$DEVICE" \
        "${set_args[@]}" --output "$OUT/cas-baseline-cas-lomurno-$DEVICE.json" ;;
    sd|sd-tuning)
      small=(); [ -n "${SMALL:-}" ] && small=(--size 64 --steps 2 --repeats 1 --pixel-batch 1)
      if [ "$stage" = sd ]; then
        args=(${SD_ARGS:---stages table,pixels,build})
        [ -n "${SMALL:-}" ] && args=(--stages table,pixels,build,attention,variants --batches 2,1 --variants cudnn-benchmark,cudnn-attention)
        seconds=$(cap "${SD_S:-560}")
      else
        args=(--stages variants --batches 16 --variants inductor-tuning)
        [ -n "${SMALL:-}" ] && args=(--stages variants --batches 2 --variants inductor-tuning)
        seconds=$(cap "${SD_TUNING_S:-400}")
      fi
      # the bench stops starting measurements 45 s before its budget, and rewrites its JSON after each
      run_stage "$stage" "$seconds" "$PY" benchmarks/bench_sd.py --device "$DEVICE" "${small[@]}" "${args[@]}" \
        --budget-s $(( seconds - 45 )) --out "$OUT/generate-sd15-$stage-$DEVICE.json" ;;
    classcond)
      cc_args=(); [ -n "${SMALL:-}" ] && cc_args=(--steps 2 --warmup 1 --encode-images 4 --trial-images 2 --trial-steps 2 --trial-epochs 1 --trial-val 50)
      run_stage classcond "${CLASSCOND_S:-330}" "$PY" benchmarks/bench_classcond.py --device "$DEVICE" "${cc_args[@]}" \
        --output "$OUT/classcond-$DEVICE.json" ;;
    stream)
      n=${N:-50000}; workers=${WORKERS:-12}
      [ -n "${SMALL:-}" ] && n=2000 && workers=2
      run_stage stream "${STREAM_S:-240}" "$PY" benchmarks/bench_stream.py --cifar "$CIFAR" --n "$n" --device "$DEVICE" \
        --workers "$workers" --work /tmp/synthgen-bench-stream --output "$OUT/stream-$DEVICE.json" ;;
    train)
      run_stage train "${TRAIN_S:-120}" "$PY" benchmarks/bench_train.py --no-cas --devices "$DEVICE" \
        --models resnet20,resnet20_w64,vit_tiny --output "$OUT/train-$DEVICE.json" ;;
    *) echo "error: unknown stage '$stage' (sd, sd-tuning, cas, classcond, stream, train)" >&2; exit 2 ;;
  esac
done
echo "== done in ${SECONDS}s"
