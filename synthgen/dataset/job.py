"""What a build is asked to do (:class:`BuildJob`), what it did (:class:`BuildResult`), and the
progress bar; shared by the executors."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from synthgen.dataset.folder import BuildPlan
from synthgen.errors import OutputFolderError
from synthgen.recipe import Recipe


@dataclass
class BuildJob:
    recipe: Recipe
    out: str | Path  # a folder path or an fsspec URL
    limit: Optional[int] = None
    overwrite: bool = False
    progress: bool = True
    storage_options: Optional[dict[str, Any]] = None  # never written or printed: may hold credentials
    loaded_pipeline: Any = None

    @staticmethod
    def check_can_write(folder: Path) -> None:
        """A read-only destination fails at once, before the model loads (not after minutes)."""
        existing = next(p for p in [folder, *folder.parents] if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputFolderError(
                f"cannot write {folder}: {existing} is read-only (choose another folder with --out)"
            )


@dataclass
class BuildResult:
    folder: Path | str
    rows_planned: int  # the recipe's rows
    rows_target: int  # the rows this build was asked for (rows_planned, or the --limit prefix)
    shards_written: int
    shards_skipped: int
    complete: bool  # every target shard is finished (the manifest describes them)
    retries: int
    seconds: float
    manifest: Optional[dict] = None
    left: list[str] = field(default_factory=list)  # target shards still to build (other workers')
    rebuilt: dict[str, str] = field(default_factory=dict)  # shards whose file failed its check
    worker: dict[str, Any] = field(default_factory=dict)  # executor, rank, world size
    _build: Optional[BuildPlan] = field(default=None, repr=False)
    _started: float = field(default=0.0, repr=False)

    @property
    def dataset_complete(self) -> bool:
        return self.complete and self.rows_target == self.rows_planned

    @classmethod
    def start(cls, build: BuildPlan, started: float, worker: Optional[dict[str, Any]] = None) -> "BuildResult":
        return cls(build.folder, build.recipe.count, build.target_rows, 0, len(build.done), False, 0, 0.0,
                   rebuilt=dict(build.damaged), worker=dict(worker or {}), _build=build, _started=started)

    def count(self, outcome: Any) -> None:
        """Add a :class:`~synthgen.dataset.shard_task.ShardOutcome` (or its dict from a Ray task)."""
        status = outcome["status"] if isinstance(outcome, dict) else outcome.status
        marker = outcome.get("marker") if isinstance(outcome, dict) else outcome.marker
        if status == "written":
            self.shards_written += 1
            self.retries += int((marker or {}).get("retries", 0))
        elif status == "skipped":
            self.shards_skipped += 1

    def finish(self, manifest: Optional[dict]) -> "BuildResult":
        build = self._build
        self.manifest, self.complete = manifest, manifest is not None
        self.seconds = time.perf_counter() - self._started
        if manifest is None and build is not None:
            marked = build.writer().marked_many(build.targets)
            self.left = [s.name for s in build.targets if s.index not in marked]
        return self


class _Bar:
    def __init__(self, advance: Callable[[int], None], skip: Callable[[int], None]) -> None:
        self.advance, self.skip = advance, skip


@contextlib.contextmanager
def progress_bar(enabled: bool, name: str, total: int) -> Iterator[_Bar]:
    """A progress bar over the images this process generates; shards another process made are
    taken off its total, so the rate counts generated images only."""
    if not enabled:
        yield _Bar(lambda n: None, lambda n: None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            if task.finished and task.finished_time:
                # the whole run's rate: rich's finished_speed is its last window's, which leaves out
                # the first update's images (a build of a few batches read a third of its real rate)
                speed = task.completed / task.finished_time
            else:
                speed = task.speed
            if not speed and task.completed and task.elapsed:
                speed = task.completed / task.elapsed  # too few updates for rich's moving average
            return Text(f"{speed:.2f} img/s" if speed else "")

    class EtaColumn(TimeRemainingColumn):
        max_refresh = None  # rich caches this column for 0.5 s, which would keep a stale "ETA" at the end

        def render(self, task) -> Text:
            return Text("") if task.finished else Text("ETA ") + super().render(task)

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        EtaColumn(),
    ]
    with Progress(*columns, transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task(name, total=total)

        def skip(n: int) -> None:
            bar.update(task, total=max(0, bar.tasks[0].total - n))

        yield _Bar(lambda n: bar.advance(task, n), skip)
