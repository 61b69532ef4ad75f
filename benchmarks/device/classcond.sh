#!/usr/bin/env bash
# Run THERE, through the device tool (prepared and proven on CPU here; not yet run on a GPU):
#   here:  PY=/work/main/.venv/bin/python bash benchmarks/device/prepare_classcond.sh
#   there: run(command="bash benchmarks/device/classcond.sh", carry=[".whl"], timeout_s=420)
# Class-conditioned SD with SD 1.5's architecture (random weights) at 128 px, bf16, in ~4 minutes:
#   flops         FLOPs per image of the UNet, VAE and CAS classifier (on the CPU)
#   vae_encode    latent caching, 1024 images
#   stage1        class-encoder training, batch 64 (the paper's), 12 steps: step time, images/s, peak memory
#   tuning_trial  one Optuna trial: 1024 images x 25 DDIM steps (guidance 2) + the CAS classifier
#                 (resnet20_w64, CUDA graphs) 10 epochs validated on 10,000 images
# and the projected four-stage pipeline on one H100, now with the UNet rate measured here.
# Results land in $OUT (classcond-cuda.json + .log); copy them into benchmarks/results/ here.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SYNTHGEN_CACHE=/tmp/synthgen-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, accelerate, optuna, pydantic, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, 'optuna', optuna.__version__)" || exit 1
timeout 330 python3 benchmarks/bench_classcond.py --device cuda ${BATCH:+--batch $BATCH} ${TRIAL_IMAGES:+--trial-images $TRIAL_IMAGES} \
  --output "$OUT/classcond-cuda.json" 2>&1 | tee "$OUT/classcond-cuda.log"
