"""``build_dataset``: recipe -> prompt sampler -> shard plan -> generator -> shard writer -> folder.

A build is split along one seam, "the shard is the task":

* ``folder.py``: planning and folder state (plan, resume checks, settings, manifest and card);
* ``shard_task.py``: :func:`~synthgen.dataset.shard_task.produce_shard`, which makes one shard
  completely (claim, generate, write, mark) and is safe to run twice, in any process;
* ``executors/``: which shards run where: this process (``local``), the processes a launcher
  started (``ranks``: torchrun, accelerate, Slurm), or Ray tasks (``ray``).

The folder is a local path or an fsspec URL (``storage.py``). A build is resumable and safe to run
in several processes at once on one folder: finished shards carry a completion marker and are
skipped once their file checks out against it, and whichever process finishes the last shard
writes the manifest and the dataset card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from synthgen.dataset.executors import resolve_executor
from synthgen.dataset.folder import MANIFEST, PLAN_FILE, BuildPlan, plan_build  # noqa: F401 - imported from here
from synthgen.dataset.job import BuildJob, BuildResult
from synthgen.dataset.storage import disk_error_message, disk_errors  # noqa: F401 - imported from here
from synthgen.recipe import Recipe


def build_dataset(
    recipe: Recipe,
    out: str | Path,
    *,
    limit: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: str = "auto",
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
    worker_index: Optional[int] = None,
    share_only: bool = False,
    storage_options: Optional[dict[str, Any]] = None,
    loaded_pipeline: Any = None,
    env: Optional[Mapping[str, str]] = None,
) -> BuildResult:
    """Build (or resume, or extend) the dataset ``recipe`` describes into ``out``: a folder path or
    an fsspec URL (``s3://bucket/name``; ``storage_options`` open it, credentials best come from
    the environment).

    ``limit`` builds only the plan's first ``limit`` rows; a later call without it completes the
    plan, keeping those rows byte for byte. ``executor``: ``auto`` (rank variables in ``env``, by
    default the process environment, else ``local``), ``local``, ``ranks`` or ``ray`` (on the
    cluster at ``ray_address``, or a local Ray). A rank makes its share of the shards, then helps
    with the rest; with ``share_only`` it stops after its share and, when other shares are still
    unbuilt, returns ``complete=False`` with the shards ``left``. ``num_workers``/``worker_index``
    are an explicit static split (share only) instead of rank variables. ``loaded_pipeline``
    reuses a loaded pipeline in this process (tests, notebooks).
    """
    chosen = resolve_executor(executor, ray_address=ray_address, num_workers=num_workers,
                              worker_index=worker_index, share_only=share_only, env=env)
    job = BuildJob(recipe, out, limit=limit, overwrite=overwrite, progress=progress,
                   storage_options=storage_options, loaded_pipeline=loaded_pipeline)
    return chosen.run(job)
