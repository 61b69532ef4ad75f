#!/usr/bin/env bash
# Run HERE before benchmarks/device/classcond.sh: the wheels the GPU machine's image lacks for the
# class-conditioning benchmark (diffusers, optuna and what they import), added to .whl/ (git-ignored) beside
# those of prepare.sh. Versions are the ones installed here; huggingface-hub is the image's own.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
for pkg in diffusers accelerate safetensors regex importlib-metadata zipp pydantic pydantic-core annotated-types typing-inspection typing-extensions \
           optuna colorlog tqdm; do
  ver=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$ver"
done
du -sh .whl
