"""The shard is the task: :func:`produce_shard` makes one shard completely, and running it twice is safe.

It claims the shard (see ``storage.py``), skips it when its file already checks out against its
marker, else generates its rows and writes them (file whole, then marker), releases the claim, and
writes the manifest and card when that shard was the last one missing. A shard's rows are fixed by
the plan (prompt and seed by global index), so a second run, or a run in another process, makes the
same file; a run killed at any point leaves nothing that counts as done.

Executors (``executors/``) only decide which shards run where; each process they start holds one
:class:`ShardMaker`: the plan, the writer and the model, loaded once, on first use.

The two halves of a shard are separate steps so that a pipelined writer can overlap them:
:meth:`ShardMaker.generate` (the GPU: rows) and :meth:`ShardMaker.write` (the CPU and storage:
encode, write, mark). A claim is an object (:class:`~synthgen.dataset.storage.Claim`) that another
thread may release once the write is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyarrow as pa

from synthgen.dataset.folder import BuildPlan, finalize, prepare_folder, remove_shard_temp_files
from synthgen.dataset.plan import ShardSpec
from synthgen.dataset.writer import ShardRow, ShardWriter

WRITTEN, SKIPPED, BUSY = "written", "skipped", "busy"


@dataclass
class GeneratedShard:
    """A shard's rows, generated, not yet encoded or written."""

    spec: ShardSpec
    rows: list[ShardRow]
    kept: Optional[pa.Table]  # rows an earlier --limit build made, kept byte for byte
    seconds: float


@dataclass
class ShardOutcome:
    status: str  # WRITTEN, SKIPPED (already done) or BUSY (another process holds it)
    spec: ShardSpec
    marker: Optional[dict] = None
    manifest: Optional[dict] = None  # set when this shard completed the dataset


class ShardMaker:
    """One process's means to make shards of one build. ``loaded_pipeline`` reuses a loaded
    pipeline (tests, notebooks); ``device`` replaces the recipe's device (a rank's own GPU);
    ``worker`` is recorded in every marker this process writes (executor, rank, world size)."""

    def __init__(
        self,
        build: BuildPlan,
        *,
        loaded_pipeline: Any = None,
        device: Optional[str] = None,
        worker: Optional[dict[str, Any]] = None,
    ) -> None:
        self.build = build
        self.writer: ShardWriter = build.writer()
        self.loaded = loaded_pipeline
        self.device = device
        self.worker = worker or {}
        self.generator: Any = None
        self.model: Optional[dict[str, Any]] = None

    def load(self) -> None:
        """Load the model and record (or check) the folder's generation settings; once."""
        if self.generator is not None:
            return
        from synthgen.generate import ImageGenerator, load_pipeline

        recipe = self.build.recipe
        cfg = recipe.generator
        if self.device is not None and self.device != cfg.device:
            cfg = cfg.model_copy(update={"device": self.device})  # a runtime field: hashes unchanged
        loaded = self.loaded if self.loaded is not None else load_pipeline(cfg)
        model = loaded.provenance()  # model, resolved revision, scheduler, device, dtype, versions
        self.writer.settings_hash = recipe.settings_hash(model)
        prepare_folder(self.build, self.writer, model)
        self.loaded, self.model = loaded, model
        self.generator = ImageGenerator(loaded, cfg, recipe.output, recipe.seed)

    def rows_to_make(self, spec: ShardSpec, marker_names: Optional[set[str]] = None) -> int:
        """Rows ``spec`` still needs (fewer when an earlier ``--limit`` build made its first rows);
        ``marker_names`` (a listing of the markers) spares a request per shard without one."""
        if marker_names is not None and f"{spec.name}.json" not in marker_names:
            return len(spec)
        kept = self.writer.read_marker(spec)
        if kept and kept.get("start") == spec.start and spec.start < kept.get("stop", -1) < spec.stop:
            return spec.stop - kept["stop"]
        return len(spec)

    def generate(self, spec: ShardSpec, advance: Callable[[int], None] = lambda n: None) -> GeneratedShard:
        """The shard's rows (those an earlier ``--limit`` build made are kept, not regenerated)."""
        self.load()
        started = time.perf_counter()
        sampler = self.build.sampler
        kept = self.writer.kept_rows(spec)
        first = spec.start + (kept.num_rows if kept is not None else 0)
        batch = self.generator.cfg.batch_size
        rows: list[ShardRow] = []
        for start in range(first, spec.stop, batch):
            records = [sampler[i] for i in range(start, min(start + batch, spec.stop))]
            for record, image in zip(records, self.generator.generate(records)):
                rows.append(
                    ShardRow(
                        index=record.index,
                        image=image.image,
                        prompt=record.prompt,
                        label=record.label,
                        group=record.group,
                        seed=image.seed,
                        retries=image.retries,
                        meta=record.meta,
                    )
                )
            advance(len(records))
        return GeneratedShard(spec, rows, kept, time.perf_counter() - started)

    def write(self, shard: GeneratedShard) -> dict[str, Any]:
        """Encode, write the file whole, then the marker; returns the marker."""
        started = time.perf_counter()
        table = self.writer.encode(shard.spec, shard.rows, shard.kept)
        extra: dict[str, Any] = {"seconds": round(shard.seconds + time.perf_counter() - started, 3), "model": self.model}
        if self.worker:
            extra["worker"] = self.worker
        return self.writer.commit(shard.spec, table, extra)


def produce_shard(
    maker: ShardMaker,
    spec: ShardSpec,
    *,
    wait: bool = False,
    advance: Callable[[int], None] = lambda n: None,
) -> ShardOutcome:
    """Make shard ``spec`` completely unless it is done; safe to run twice, in any process.

    Without ``wait`` a shard another process holds gives BUSY at once; with it, this waits until
    the holder finishes (then the shard is done: SKIPPED) or dies (then this process makes it).
    """
    build = maker.build
    claim = build.store.claim(spec.name)
    if not claim.acquire(wait):
        return ShardOutcome(BUSY, spec)
    try:
        marker = maker.writer.finished(spec)
        if marker is not None:
            return ShardOutcome(SKIPPED, spec, marker)
        remove_shard_temp_files(build, spec)  # a dead writer's: we hold the claim
        marker = maker.write(maker.generate(spec, advance))
    finally:
        claim.release()
    return ShardOutcome(WRITTEN, spec, marker, finalize(build, maker.writer))
