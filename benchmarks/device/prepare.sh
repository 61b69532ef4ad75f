#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before a session with a GPU machine: fetch the wheels its
# image lacks (datasets, pydantic, diffusers and their missing needs -- diffusers checks for requests
# at import) into .whl/ and copy the CIFAR-10 parquet into .devdata/ (../shared does not travel).
# Both folders are git-ignored; together ~62 MB (59 MiB), under the device tool's 64 MiB. Then run
# benchmarks/device/run.sh (carry .whl and .devdata) or run_sd.sh (carry .whl) there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl .devdata
rm -f .whl/*.whl
for pkg in datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection typing-extensions \
           safetensors diffusers requests charset-normalizer idna urllib3 certifi; do
  ver=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$ver"
done
rm -rf .devdata/cifar10 && cp -r ../shared/datasets/cifar10 .devdata/cifar10 && chmod -R u+w .devdata
du -sh .whl .devdata
