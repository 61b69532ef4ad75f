"""Processes started by a launcher: ``torchrun``, ``accelerate launch``, ``srun``, a Slurm array.

Each process reads its rank from the variables its launcher sets, makes its share of the shards
(shard ``i`` belongs to rank ``i % world_size``), then helps with the shards still unfinished
(from the end of the plan, so it meets their owners, who work from the front, last), waits for
shards other processes hold and takes over those whose holder died. Each process writes its shards
with the recipe's writer (pipelined: in the background while it generates the next; see
``shard_task.py``) and, once its writes are done, writes the manifest and card if every shard is.
With ``share_only`` a process makes its share and stops; one that finds other shares unfinished
reports them (the CLI exits 3), for a rerun of their ranks or a "finish what is left" pass
(``--executor local``, or any rank without ``--share-only``).

The local executor is this one with a single rank.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from synthgen.dataset.job import BuildJob, BuildResult, progress_bar
from synthgen.dataset.folder import finalize, plan_build
from synthgen.dataset.plan import ShardSpec
from synthgen.dataset.shard_task import BUSY, QUEUED, SKIPPED, PipelinedWriter, ShardMaker, produce_shard
from synthgen.dataset.storage import disk_errors
from synthgen.errors import SynthgenError


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: Optional[int] = None  # which of this node's GPUs is ours
    source: str = "local"  # what set them, for messages

    def owns(self, spec: ShardSpec) -> bool:
        return spec.index % self.world_size == self.rank


def _int_var(env: Mapping[str, str], name: str) -> Optional[int]:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SynthgenError(f"{name}={value!r} is not an integer") from None


def _pair(env: Mapping[str, str], rank_var: str, size_var: str) -> Optional[tuple[int, int]]:
    rank, size = _int_var(env, rank_var), _int_var(env, size_var)
    if rank is None and size is None:
        return None
    if rank is None or size is None:
        missing, given = (rank_var, size_var) if rank is None else (size_var, rank_var)
        raise SynthgenError(f"{given} is set but {missing} is not; set both, or neither")
    if size < 1:
        raise SynthgenError(f"{size_var}={size} must be at least 1")
    if not 0 <= rank < size:
        raise SynthgenError(f"{rank_var}={rank} is out of range for {size_var}={size} (expected 0..{size - 1})")
    return rank, size


def ranks_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[Ranks]:
    """This process's rank from its launcher's variables, or None when none is set.

    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, ``accelerate launch``), else
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (``srun``); a Slurm array
    (``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``, with ``SLURM_ARRAY_TASK_MIN`` and
    ``_STEP`` when the ids do not run 0, 1, ...) multiplies them: array task ``a`` of ``A`` with
    process rank ``r`` of ``W`` is rank ``a * W + r`` of ``A * W``. Raises one line for a value out
    of range.
    """
    env = os.environ if env is None else env
    procs = _pair(env, "RANK", "WORLD_SIZE")
    local = _int_var(env, "LOCAL_RANK")
    source = "RANK/WORLD_SIZE"
    if procs is None:
        procs = _pair(env, "SLURM_PROCID", "SLURM_NTASKS")
        local = _int_var(env, "SLURM_LOCALID")
        source = "SLURM_PROCID/SLURM_NTASKS"
    if local is not None and local < 0:
        raise SynthgenError(f"LOCAL_RANK={local} must not be negative")
    array = None
    task, count = _int_var(env, "SLURM_ARRAY_TASK_ID"), _int_var(env, "SLURM_ARRAY_TASK_COUNT")
    if task is not None or count is not None:
        if task is None or count is None:
            raise SynthgenError("SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT must be set together")
        low = _int_var(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int_var(env, "SLURM_ARRAY_TASK_STEP") or 1
        position, off_step = divmod(task - low, step)
        if count < 1 or off_step or not 0 <= position < count:
            raise SynthgenError(
                f"SLURM_ARRAY_TASK_ID={task} is out of range for SLURM_ARRAY_TASK_COUNT={count} "
                f"(ids {low}, {low + step}, ... {low + step * (max(count, 1) - 1)})"
            )
        array = (position, count)
    if procs is None and array is None:
        return None
    rank, world = procs or (0, 1)
    if array is not None:
        rank, world = array[0] * world + rank, array[1] * world
        source = "SLURM_ARRAY_TASK_ID/COUNT" if procs is None else f"SLURM_ARRAY_TASK_ID/COUNT x {source}"
    return Ranks(rank, world, local, source)


def device_for_rank(device: str, local_rank: Optional[int]) -> Optional[str]:
    """The device a rank uses: its own GPU (``cuda:LOCAL_RANK``) when the recipe's device is
    ``auto``/``cuda`` and CUDA is there; None keeps the recipe's device. A launcher that shows
    each process a single GPU (``CUDA_VISIBLE_DEVICES`` per task) gives ``cuda:0``."""
    if local_rank is None or device not in ("auto", "cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if count == 1:
        return "cuda:0"
    if local_rank >= count:
        raise SynthgenError(f"LOCAL_RANK={local_rank} but this node shows {count} GPUs (cuda:0..cuda:{count - 1})")
    return f"cuda:{local_rank}"


class RankExecutor:
    """Shards by rank in this process, then help (see the module doc)."""

    name = "ranks"

    def __init__(self, ranks: Ranks, share_only: bool = False) -> None:
        self.ranks, self.share_only = ranks, share_only

    @classmethod
    def local(cls) -> "RankExecutor":
        return cls(Ranks(0, 1, None, "local"))

    def run(self, job: BuildJob) -> BuildResult:
        started = time.perf_counter()
        ranks = self.ranks
        recipe = job.recipe
        # With several ranks each fully checks the finished shards of its own share on a resume
        # (reading them); the others' shards it checks by marker and size.
        build = plan_build(recipe, job.out, overwrite=job.overwrite, limit=job.limit,
                           storage_options=job.storage_options, verify=ranks.owns if ranks.world_size > 1 else None)
        worker = {"executor": "local"} if ranks.world_size == 1 and ranks.source == "local" else {
            "executor": self.name, "rank": ranks.rank, "world_size": ranks.world_size}
        maker = ShardMaker(build, loaded_pipeline=job.loaded_pipeline,
                           device=device_for_rank(recipe.generator.device, ranks.local_rank), worker=worker)
        writer = maker.writer
        result = BuildResult.start(build, started, worker)

        def shares() -> tuple[list[ShardSpec], list[ShardSpec]]:
            # Others' shares from the end (round robin over their owners, who work from the front).
            return ([s for s in build.todo if ranks.owns(s)],
                    [] if self.share_only else [s for s in reversed(build.todo) if not ranks.owns(s)])

        mine, others = shares()
        # nothing for this process: finish the manifest if the others are done (unless --overwrite
        # may start the folder again for another model: only loading it tells)
        if not mine and not others and not build.may_restart:
            with disk_errors(build.store.display):
                return result.finish(finalize(build, writer))
        if build.store.local is not None:
            job.check_can_write(build.store.local)
        show = job.progress and ranks.rank == 0
        with disk_errors(build.store.display):
            maker.load()  # before anything is created on disk: a bad model id leaves no folder behind
            mine, others = shares()  # all of them, if --overwrite started the folder again for another model
            names = writer.marker_names()
            sizes = {s.index: maker.rows_to_make(s, names) for s in mine + others}
            background = PipelinedWriter.for_recipe(maker)  # None: write each shard before the next
            with progress_bar(show, recipe.name, sum(sizes.values())) as bar, background or contextlib.nullcontext():

                def attempt(spec: ShardSpec, wait: bool) -> bool:
                    outcome = produce_shard(maker, spec, wait=wait, advance=bar.advance, writer=background)
                    if outcome.status == BUSY:
                        return False
                    if outcome.status != QUEUED:  # queued ones count when written (below)
                        result.count(outcome)
                    if outcome.status == SKIPPED:
                        bar.skip(sizes[spec.index])
                    return True

                busy = [spec for spec in mine if not attempt(spec, wait=False)]
                made = writer.marked_many(others) if others else {}  # by their owners meanwhile
                for spec in others:
                    if spec.index in made:
                        result.shards_skipped += 1
                        bar.skip(sizes[spec.index])
                    elif not attempt(spec, wait=False):
                        busy.append(spec)
                for spec in busy:  # held by another process: wait for it, and take over if it died
                    attempt(spec, wait=True)
                for outcome in background.close() if background is not None else []:
                    result.count(outcome)
            manifest = finalize(build, writer)  # after every write of this process
        return result.finish(manifest)
