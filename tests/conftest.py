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

``HF_DATASETS_CACHE`` points at a private temporary folder for the session (see below).
"""

from __future__ import annotations

import atexit
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


@pytest.fixture(scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
