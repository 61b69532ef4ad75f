"""Ray: shard tasks on Ray workers, one worker per GPU (per CPU on a cluster without GPUs), restarted
by Ray when its process dies.

The driver plans (and on a resume checks the finished shards), clears what ``--overwrite`` replaces
(another recipe's folder at once; one begun with another model or precision once a first worker has
loaded the model and found so, before the other workers start), starts one :class:`ShardWorker`
actor per GPU (no more than there are shards to make), and hands each worker its next shard as soon
as it finishes one. A worker loads the model once and runs each shard with :func:`produce_shard`,
which returns once the shard's file and marker are written. With the recipe's ``output.writer:
pipelined`` a worker runs ``1 + shards_in_flight`` shard tasks at once in threads: one generates (on
its GPU) while the others write, the pipelined writer of the other executors in Ray's terms (a
task's result still means "written"). A worker killed mid-shard leaves no marker, at most a temp
file that a retry removes while holding the shard's claim; Ray restarts the worker and retries its
unfinished tasks, which make the same rows. Whoever finishes the last shard writes the manifest and
card.

``address`` connects to a running cluster (``ray start --head`` on one node, ``ray start
--address=...`` on the others; every node needs synthgen installed and the folder or bucket
reachable); without it the driver uses ``RAY_ADDRESS`` or starts a local Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from synthgen.dataset.folder import finalize, forget_finished_if_restarted, plan_build, reset_folder
from synthgen.dataset.job import BuildJob, BuildResult, progress_bar
from synthgen.dataset.shard_task import ShardMaker, produce_shard
from synthgen.dataset.storage import disk_errors, is_url
from synthgen.errors import SynthgenError
from synthgen.recipe import Recipe

MAX_RETRIES = 3  # Ray's restarts of a worker whose process died (and retries of its shard tasks)


@dataclass(frozen=True)
class RayShardJob:
    """What a Ray worker needs to make the shards of a build (sent to the workers)."""

    recipe: Recipe
    out: str  # an absolute path or a URL: workers do not share the driver's working folder
    limit: Optional[int]
    storage_options: Optional[dict[str, Any]]


class ShardWorker:
    """A Ray actor: one GPU's shard maker (the model loaded once, on the first shard)."""

    def __init__(self, job: RayShardJob) -> None:
        self.job = job
        self.maker: Optional[ShardMaker] = None
        self._loading = threading.Lock()

    def _maker(self, overwrite: bool = False) -> ShardMaker:
        from synthgen.dataset.executors.ranks import device_for_rank

        with self._loading:
            if self.maker is None:
                job = self.job
                build = plan_build(job.recipe, job.out, overwrite=overwrite, limit=job.limit,
                                   storage_options=job.storage_options, scan=False)
                # Ray shows a GPU actor its GPU(s) only (CUDA_VISIBLE_DEVICES): cuda:0 is ours
                maker = ShardMaker(build, device=device_for_rank(job.recipe.generator.device, 0),
                                   worker={"executor": "ray"})
                with disk_errors(build.store.display):
                    maker.load()
                self.maker = maker
        return self.maker

    def load(self, overwrite: bool) -> None:
        """Load the model now; with ``overwrite``, start the folder again if it was begun with another
        model or precision (see ``record_settings``)."""
        self._maker(overwrite)

    def make(self, index: int) -> dict[str, Any]:
        """Make target shard ``index`` (or find it done); returns once its file and marker are written."""
        maker = self._maker()
        spec = maker.build.targets[index]
        with disk_errors(maker.build.store.display):
            outcome = produce_shard(maker, spec, wait=True)
        marker = outcome.marker or {}
        return {"status": outcome.status, "marker": {"rows": marker.get("rows"), "retries": marker.get("retries", 0)},
                "pid": os.getpid(), "complete": outcome.manifest is not None}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SynthgenError("--executor ray needs Ray: pip install 'synthgen[ray]'") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds, with one line, where ``ray.init`` would retry for minutes."""
    if address in ("auto", "local"):
        return
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "6379")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise SynthgenError(
            f"cannot reach the Ray cluster at {address}: {reason} (start it with `ray start --head`, "
            "or leave out --ray-address to start a local Ray)"
        ) from None


def _task_error(ray: Any, exc: Exception, task: str, retries: int) -> SynthgenError:
    """One line for a task that failed: ``task`` names it ("shard NAME", "loading the model")."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SynthgenError):
        return cause
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return SynthgenError(f"{task}: its Ray worker died {retries + 1} times; run the same command to resume")
    what = cause if cause is not None else exc
    first = (str(what).strip().splitlines() or [type(what).__name__])[0][:300]
    return SynthgenError(f"{task} failed on a Ray worker: {type(what).__name__}: {first}")


class RayExecutor:
    name = "ray"

    def __init__(self, address: Optional[str] = None, max_retries: int = MAX_RETRIES) -> None:
        self.address, self.max_retries = address, max_retries

    def _connect(self, ray: Any) -> bool:
        """Connect (or start a local Ray); True when this call started or joined it (and shuts it down)."""
        if ray.is_initialized():
            return False
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if self.address:
                _check_reachable(self.address)
                ray.init(address=self.address, **quiet)
            else:
                ray.init(include_dashboard=False, **quiet) if not os.environ.get("RAY_ADDRESS") else ray.init(**quiet)
        except SynthgenError:
            raise
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise SynthgenError(f"cannot connect to the Ray cluster at {self.address or 'a new local Ray'}: {first}") from None
        return True

    def run(self, job: BuildJob) -> BuildResult:
        ray = _import_ray()
        started = time.perf_counter()
        out = str(job.out) if is_url(job.out) else str(Path(job.out).resolve())
        build = plan_build(job.recipe, out, overwrite=job.overwrite, limit=job.limit, storage_options=job.storage_options)
        writer = build.writer()
        result = BuildResult.start(build, started, {"executor": self.name})
        if not build.todo and not build.may_restart:
            with disk_errors(build.store.display):
                return result.finish(finalize(build, writer))
        if build.store.local is not None:
            job.check_can_write(build.store.local)
        if self.address:
            _check_reachable(self.address)  # before anything is written
        if build.state != "new":
            with disk_errors(build.store.display):
                reset_folder(build, writer)  # once, here: the tasks must not clear each other's shards
        joined = self._connect(ray)
        workers: list = []
        try:
            resources = ray.cluster_resources()
            gpu = resources.get("GPU", 0) >= 1 and job.recipe.generator.device != "cpu"
            slots = int(resources.get("GPU" if gpu else "CPU", 1))
            out_cfg = job.recipe.output
            # pipelined: one shard task generates while the others write (see the module doc)
            tasks_each = 1 + out_cfg.shards_in_flight if out_cfg.writer == "pipelined" else 1
            actor = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_concurrency=tasks_each,
                               max_restarts=self.max_retries, max_task_retries=self.max_retries)(ShardWorker)
            payload = RayShardJob(job.recipe, out, job.limit, job.storage_options)
            if build.may_restart:
                # One worker loads first and, if the model or precision changed, starts the folder
                # again; the others load after it (loading beside it, one would find the old settings and refuse).
                workers.append(actor.remote(payload))
                try:
                    ray.get(workers[0].load.remote(True))
                except Exception as exc:  # noqa: BLE001 - Ray wraps the task's error
                    raise _task_error(ray, exc, "loading the model", self.max_retries) from None
                forget_finished_if_restarted(build)  # if it did, every target shard is to make again
            workers += [actor.remote(payload) for _ in range(max(1, min(slots, len(build.todo))) - len(workers))]
            queue = deque(build.todo)
            pending: dict = {}

            def hand(worker) -> None:
                if queue:
                    spec = queue.popleft()
                    pending[worker.make.remote(spec.index)] = (spec, worker)

            for worker in workers:
                for _ in range(tasks_each):
                    hand(worker)
            with progress_bar(job.progress, job.recipe.name, sum(len(s) for s in build.todo)) as bar:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        spec, worker = pending.pop(ref)
                        try:
                            outcome = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001 - Ray wraps the task's error
                            raise _task_error(ray, exc, f"shard {spec.name}", self.max_retries) from None
                        result.count(outcome)
                        bar.advance(len(spec))
                        hand(worker)
        finally:
            for worker in workers:  # their models' memory; a failed build's running tasks stop here too
                ray.kill(worker)
            if joined:
                ray.shutdown()
        with disk_errors(build.store.display):
            return result.finish(finalize(build, writer))
