"""Executors decide which shards run where; :func:`~synthgen.dataset.shard_task.produce_shard` makes each.

* ``local``: every shard in this process.
* ``ranks``: processes a launcher started (torchrun, ``accelerate launch``, srun, a Slurm array):
  each takes its share by rank, then helps with the rest (``ranks.py``).
* ``ray``: each shard a Ray task on a Ray cluster (``ray_tasks.py``).

``auto`` (the default) is ``ranks`` when the environment holds rank variables, else ``local``.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Protocol

from synthgen.dataset.executors.ranks import RankExecutor, Ranks, device_for_rank, ranks_from_env
from synthgen.dataset.job import BuildJob, BuildResult
from synthgen.errors import SynthgenError

EXECUTORS = ("auto", "local", "ranks", "ray")


class Executor(Protocol):
    name: str

    def run(self, job: BuildJob) -> BuildResult: ...


def resolve_executor(
    executor: str = "auto",
    *,
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
    worker_index: Optional[int] = None,
    share_only: bool = False,
    env: Optional[Mapping[str, str]] = None,
) -> Executor:
    """The executor a build runs on. ``num_workers``/``worker_index`` are an explicit static split
    (instead of rank variables): this process makes its share only, like ``share_only``."""
    env = os.environ if env is None else env
    if executor not in EXECUTORS:
        raise SynthgenError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if ray_address and executor not in ("auto", "ray"):
        raise SynthgenError(f"--ray-address needs --executor ray, not {executor}")
    if executor == "ray" or ray_address:
        if num_workers is not None or worker_index is not None or share_only:
            raise SynthgenError("--executor ray schedules every shard itself: drop --num-workers/--worker-index/--share-only")
        from synthgen.dataset.executors.ray_tasks import RayExecutor

        return RayExecutor(ray_address)
    if num_workers is not None or worker_index is not None:
        if executor in ("local", "ranks"):
            raise SynthgenError(f"--num-workers/--worker-index choose this process's share themselves: "
                                f"drop --executor {executor} (or drop them)")
        if num_workers is None or worker_index is None:
            # one alone would make every process that got it the same share (0 of N, or K of 1)
            raise SynthgenError("--num-workers and --worker-index go together: give each process "
                                "--num-workers N and its own --worker-index 0..N-1")
        world, rank = num_workers, worker_index
        if world < 1:
            raise SynthgenError(f"--num-workers must be at least 1, got {world}")
        if not 0 <= rank < world:
            raise SynthgenError(f"--worker-index must be in [0, {world}), got {rank}")
        return RankExecutor(Ranks(rank, world, None, "--worker-index"), share_only=True)
    if executor == "local":
        return RankExecutor.local()
    ranks = ranks_from_env(env)
    if ranks is None:
        if executor == "ranks":
            raise SynthgenError(
                "--executor ranks found no rank variables (RANK/WORLD_SIZE from torchrun or accelerate, "
                "SLURM_PROCID/SLURM_NTASKS, SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT)"
            )
        return RankExecutor.local()
    return RankExecutor(ranks, share_only=share_only)


__all__ = ["EXECUTORS", "Executor", "RankExecutor", "Ranks", "device_for_rank", "ranks_from_env", "resolve_executor"]
