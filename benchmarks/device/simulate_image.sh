#!/usr/bin/env bash
# Run HERE, after prepare.sh: the device script on the CPU, in a virtual environment that holds the
# GPU image's package versions instead of this project's (torch 2.11, transformers 5.17,
# huggingface_hub 1.33, as benchmarks/device/NOTES.md lists them) plus exactly the wheels prepare.sh
# carries, installed without their dependencies as run_all.sh installs them there. A device session
# is 15 minutes; an import or API that breaks on the older stack shows up here instead, for free.
# What it cannot show: CUDA itself (bf16, inductor's GPU kernels, memory), and Python 3.12 (the
# image's; this uses the local python3, and takes the binary wheels at the same versions for it).
#   bash benchmarks/device/simulate_image.sh            # all four stages at small sizes, ~5 minutes
#   STAGES=sd bash benchmarks/device/simulate_image.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${SIM_VENV:-$HOME/.cache/synthgen-gpu-image-venv}
[ -d .whl ] || { echo "error: no .whl/ here: run bash benchmarks/device/prepare.sh first" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # The image's versions where the image's pip list gives them; the rest is what the image also has.
  "$VENV/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 \
    huggingface_hub==1.33.0 accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.2 \
    numpy pyarrow pandas xxhash pyyaml filelock packaging psutil typer rich pillow fsspec timm peft \
    scipy matplotlib requests
fi
# The carried wheels, --no-deps as run_all.sh installs them (so no sqlalchemy: the image has none).
pure=() binary=()
for wheel in .whl/*.whl; do
  name=$(basename "$wheel")
  case $name in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-abi3-*) pure+=("$wheel") ;;
    *) IFS=- read -r dist version _ <<<"$name"; binary+=("$dist==$version") ;;
  esac
done
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "${pure[@]}"
[ ${#binary[@]} -eq 0 ] || "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "${binary[@]}"
"$VENV/bin/python" -m pip uninstall -q -y sqlalchemy alembic 2>/dev/null || true

DEVICE=cpu SMALL=1 PY="$VENV/bin/python" STAGES=${STAGES:-cas,sd,sd-tuning,classcond,stream} BUDGET_S=${BUDGET_S:-1800} \
  OUT=${OUT:-/tmp/out-gpu-image} bash benchmarks/device/run_all.sh
