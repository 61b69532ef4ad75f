"""Shared test fixtures.

* ``_synthgen_cache`` (autouse, session): points ``SYNTHGEN_CACHE`` at a session temporary folder,
  so no test reads or writes ``~/.cache/synthgen``. The folder is shared by the whole session.
* ``tiny_pipeline_path`` (session): the folder of ``builtin:tiny-sd``, built once per session into
  that cache (a few seconds). Recipes with ``model: builtin:tiny-sd`` then load it without
  rebuilding; ``StableDiffusionPipeline.from_pretrained(tiny_pipeline_path)`` works too.
* ``tiny_generator_config``: a fast ``GeneratorConfig`` for the tiny pipeline (64x64, 4 DDIM steps,
  guidance 2, batch 4); a fresh object per test, change it with ``model_copy(update=...)``.
* ``one_torch_thread`` (module): torch on one thread while the module's tests run; use it with
  ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``. Tiny models gain nothing from
  threads, and with 2 threads on shared cores OpenMP spin-waiting slows them down many times.
* ``s3`` (module): a real S3-compatible server (moto in server mode, its own process) with the
  bucket ``moto_s3.BUCKET``; its credentials and endpoint are in the environment while the module
  runs (as a user's would be), so ``s3://`` URLs reach it here and from subprocesses.

* ``cifar_shards``: a function ``(folder, sizes, string_labels=False) -> folder`` writing real
  CIFAR-10 training rows into a Hub-layout folder of parquet shards of ``sizes`` rows (labels as
  class names with ``string_labels``); skips the test when ../shared lacks CIFAR-10.

``HF_DATASETS_CACHE`` points at a private temporary folder for the session (see below).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile

import pytest

# A private `datasets` cache for this test session, set before anything imports `datasets` (it reads
# the variable at import): tests reuse temp paths between sessions, and a shared cache would hand
# one session's dataset to another. Subprocesses inherit it.
os.environ["HF_DATASETS_CACHE"] = _HF_DATASETS_CACHE = tempfile.mkdtemp(prefix="synthgen-test-datasets-")
atexit.register(shutil.rmtree, _HF_DATASETS_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _synthgen_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthgen-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHGEN_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_pipeline_path(_synthgen_cache):
    from synthgen.generate.tiny import builtin_model_path

    path = builtin_model_path("tiny-sd")
    assert path.is_relative_to(_synthgen_cache) and os.path.isfile(path / "model_index.json")
    return path


@pytest.fixture
def tiny_generator_config(tiny_pipeline_path):
    from synthgen.recipe import GeneratorConfig

    return GeneratorConfig(
        model="builtin:tiny-sd",
        scheduler="ddim",
        steps=4,
        guidance_scale=2.0,
        height=64,
        width=64,
        batch_size=4,
        device="cpu",
        max_retries=3,
    )


@pytest.fixture
def cifar_shards():
    from pathlib import Path

    cifar = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10/data/train-00000-of-00002.parquet"
    if not cifar.is_file():
        pytest.skip(f"CIFAR-10 parquet not found at {cifar}")

    def write(folder: Path, sizes: list[int], string_labels: bool = False) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(cifar).slice(0, sum(sizes))
        if string_labels:
            names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
            meta = json.loads(table.schema.metadata[b"huggingface"])  # datasets' features: label becomes a string Value
            meta["info"]["features"]["label"] = {"dtype": "string", "_type": "Value"}
            table = table.set_column(1, "label", pa.array([names[i] for i in table["label"].to_pylist()]))
            table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
        (folder / "data").mkdir(parents=True)
        start = 0
        for i, n in enumerate(sizes):
            pq.write_table(table.slice(start, n), folder / "data" / f"train-{i:05d}-of-{len(sizes):05d}.parquet")
            start += n
        return folder

    return write


@pytest.fixture(scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def s3():
    from moto_s3 import BUCKET, create_bucket, moto_server

    def forget_clients() -> None:
        # fsspec caches one S3FileSystem per set of arguments: one made for an earlier module's
        # server (another port, same arguments) must not be handed to this module
        with contextlib.suppress(ImportError):
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()

    with moto_server() as env, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setenv("SYNTHGEN_LEASE_SECONDS", "3")  # a killed build's lease expires quickly
        create_bucket(env, BUCKET)
        forget_clients()
        yield env
        forget_clients()
