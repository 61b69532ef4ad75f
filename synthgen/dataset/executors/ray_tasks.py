"""Ray: each shard is a Ray task, with one GPU (one CPU on a cluster without GPUs), retried by Ray
when its worker process dies.

The driver plans (and on a resume checks the finished shards), clears what ``--overwrite`` replaces,
submits one task per unfinished shard and waits. A task runs :func:`produce_shard` in a Ray worker
process, which loads the model once and keeps it for the next tasks it gets (``max_calls=0``; Ray
would otherwise start a fresh process, and load the model again, for every GPU task). A task killed
mid-shard leaves no marker, at most a temp file its retry removes while holding the shard's claim;
the retry makes the same rows. The task that finishes the last shard writes the manifest and card.

``address`` connects to a running cluster (``ray start --head`` on one node, ``ray start
--address=...`` on the others; every node needs synthgen installed and the folder or bucket
reachable); without it the driver uses ``RAY_ADDRESS`` or starts a local Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from synthgen.dataset.folder import finalize, plan_build, reset_folder
from synthgen.dataset.job import BuildJob, BuildResult, progress_bar
from synthgen.dataset.shard_task import ShardMaker, produce_shard
from synthgen.dataset.storage import disk_errors, is_url
from synthgen.errors import SynthgenError
from synthgen.recipe import Recipe

MAX_RETRIES = 3  # Ray's retries of a shard whose worker process died


@dataclass(frozen=True)
class RayShardJob:
    """What a Ray task needs to make a shard of a build (sent to the workers)."""

    recipe: Recipe
    out: str  # an absolute path or a URL: workers do not share the driver's working folder
    limit: Optional[int]
    storage_options: Optional[dict[str, Any]]

    @property
    def key(self) -> str:
        data = json.dumps([self.recipe.resolved(), self.out, self.limit], sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()


# In each Ray worker process: the shard maker (loaded model) of each build it has worked on.
_MAKERS: dict[str, ShardMaker] = {}


def make_shard_task(job: RayShardJob, index: int) -> dict[str, Any]:
    """The body of a Ray task: make target shard ``index`` (or find it done)."""
    from synthgen.dataset.executors.ranks import device_for_rank

    maker = _MAKERS.get(job.key)
    if maker is None:
        build = plan_build(job.recipe, job.out, limit=job.limit, storage_options=job.storage_options, scan=False)
        # Ray shows a GPU task its GPU(s) only (CUDA_VISIBLE_DEVICES): cuda:0 is ours
        maker = ShardMaker(build, device=device_for_rank(job.recipe.generator.device, 0), worker={"executor": "ray"})
        with disk_errors(build.store.display):
            maker.load()
        _MAKERS[job.key] = maker
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


def _task_error(ray: Any, exc: Exception, spec_name: str, retries: int) -> SynthgenError:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SynthgenError):
        return cause
    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return SynthgenError(f"shard {spec_name}: its Ray worker died {retries + 1} times; run the same command to resume")
    what = cause if cause is not None else exc
    first = (str(what).strip().splitlines() or [type(what).__name__])[0][:300]
    return SynthgenError(f"shard {spec_name} failed on a Ray worker: {type(what).__name__}: {first}")


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
        if not build.todo:
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
        try:
            gpu = ray.cluster_resources().get("GPU", 0) >= 1 and job.recipe.generator.device != "cpu"
            task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1, max_calls=0, max_retries=self.max_retries,
                              retry_exceptions=False)(make_shard_task)
            payload = RayShardJob(job.recipe, out, job.limit, job.storage_options)
            pending = {task.remote(payload, spec.index): spec for spec in build.todo}
            with progress_bar(job.progress, job.recipe.name, sum(len(s) for s in build.todo)) as bar:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        spec = pending.pop(ref)
                        try:
                            outcome = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001 - Ray wraps the task's error
                            for other in pending:
                                ray.cancel(other, force=True)
                            raise _task_error(ray, exc, spec.name, self.max_retries) from None
                        result.count(outcome)
                        bar.advance(len(spec))
        finally:
            if joined:
                ray.shutdown()
        with disk_errors(build.store.display):
            return result.finish(finalize(build, writer))
