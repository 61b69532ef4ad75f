#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before a session with a GPU machine: fetch the wheels the
# GPU image lacks into .whl/ and copy the CIFAR-10 parquet into .devdata/ (../shared does not travel).
# The image has torch, transformers, huggingface-hub, numpy, pyarrow and pillow; it lacks datasets,
# diffusers, accelerate, optuna and pydantic, and some of what they import (diffusers checks for
# requests at import). Versions are the ones installed here. Both folders are git-ignored and must
# stay under the device tool's 64 MiB together (checked below). Then, there:
#   run(command="bash benchmarks/device/run_all.sh", carry=[".whl", ".devdata"], timeout_s=590)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl .devdata
rm -f .whl/*.whl
for pkg in datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection typing-extensions \
           safetensors diffusers requests charset-normalizer idna urllib3 certifi \
           accelerate regex importlib-metadata zipp optuna colorlog tqdm; do
  ver=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$ver"
done
rm -rf .devdata/cifar10 && cp -r ../shared/datasets/cifar10 .devdata/cifar10 && chmod -R u+w .devdata
du -sh .whl .devdata
total=$(du -sbc .whl .devdata | tail -1 | cut -f1)
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
  echo "error: .whl + .devdata = $total bytes, over the device tool's 64 MiB carry limit" >&2
  exit 1
fi
