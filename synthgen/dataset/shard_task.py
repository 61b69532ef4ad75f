"""The shard is the task: :func:`produce_shard` makes one shard completely, and running it twice is safe.

It claims the shard (see ``storage.py``), skips it when its file already checks out against its
marker, else generates its rows and writes them (file whole, then marker), releases the claim, and
writes the manifest and card when that shard was the last one missing. A shard's rows are fixed by
the plan (prompt and seed by global index), so a second run, or a run in another process, makes the
same file; a run killed at any point leaves nothing that counts as done.

Executors (``executors/``) only decide which shards run where; each process they start holds one
:class:`ShardMaker`: the plan, the writer and the model, loaded once, on first use.

The two halves of a shard are separate steps: :meth:`ShardMaker.generate` (the GPU: rows) and
:meth:`ShardMaker.write` (the CPU and storage: resize, encode, write, mark). With the recipe's
``output.writer: pipelined`` (the default) a :class:`PipelinedWriter` runs the second half in a
background thread while the generator makes the next shard: ``produce_shard`` hands it the
generated shard *and its claim*, which the writer releases once the file and its marker are written,
so the shard stays claimed until it is complete and a crash mid-write leaves what a serial crash
leaves. At most ``output.shards_in_flight`` shards wait for or are in the writer; the generator
blocks when it is that far behind (memory: at most ``shards_in_flight + 1`` shards of images). A
write that fails stops the build with its own error, at the next batch the generator makes. The
executor writes the manifest once every write has finished.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyarrow as pa

from synthgen.dataset.folder import BuildPlan, finalize, prepare_folder, remove_shard_temp_files
from synthgen.dataset.plan import ShardSpec
from synthgen.dataset.storage import Claim
from synthgen.dataset.writer import ShardRow, ShardWriter
from synthgen.errors import ModelNotFoundError

# QUEUED: generated and handed to a PipelinedWriter, which gives the WRITTEN outcome when done
WRITTEN, SKIPPED, BUSY, QUEUED = "written", "skipped", "busy", "queued"


@dataclass
class GeneratedShard:
    """A shard's rows, generated, not yet encoded or written."""

    spec: ShardSpec
    rows: list[ShardRow]
    kept: Optional[pa.Table]  # rows an earlier --limit build made, kept byte for byte
    seconds: float


@dataclass
class ShardOutcome:
    status: str  # WRITTEN, SKIPPED (already done), BUSY (another process holds it) or QUEUED
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
        out = build.recipe.output
        # recorded in every marker (and so in the manifest): how this process wrote its shards
        self.writer_info = ({"mode": "pipelined", "shards_in_flight": out.shards_in_flight}
                            if out.writer == "pipelined" else {"mode": "serial"})
        if out.writer == "pipelined":  # encoding runs beside generation: leave the generator's thread a core
            self.writer.encode_workers = max(1, min(self.writer.encode_workers, (os.cpu_count() or 1) - 1))
        # one shard generates at a time (a Ray worker runs several shard tasks in threads)
        self._generating = threading.RLock()

    def load(self) -> None:
        """Load the model and record (or check) the folder's generation settings; once."""
        with self._generating:
            if self.generator is None:
                self._load()

    def _load(self) -> None:
        from synthgen.generate import ImageGenerator, load_pipeline

        recipe = self.build.recipe
        cfg = recipe.generator
        if self.device is not None and self.device != cfg.device:
            cfg = cfg.model_copy(update={"device": self.device})  # a runtime field: hashes unchanged
        try:
            loaded = self.loaded if self.loaded is not None else load_pipeline(cfg)
        except ModelNotFoundError as exc:
            if recipe.prompts.kind != "classes":
                raise
            raise ModelNotFoundError(f"{exc}: a class-conditioned recipe needs the pipeline that "
                                     "`synthgen classcond run` saves (or a Hub id)") from None
        model = loaded.provenance()  # model, resolved revision, scheduler, device, dtype, versions
        self.writer.settings_hash = recipe.settings_hash(model)
        prepare_folder(self.build, self.writer, model)
        self.loaded, self.model = loaded, model
        # images come back at the generated size: the writer resizes them, in its threads
        self.generator = ImageGenerator(loaded, cfg, recipe.output.model_copy(update={"image_size": None}), recipe.seed)

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
        with self._generating:
            return self._generate(spec, advance)

    def _generate(self, spec: ShardSpec, advance: Callable[[int], None]) -> GeneratedShard:
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
        extra: dict[str, Any] = {"seconds": round(shard.seconds + time.perf_counter() - started, 3), "model": self.model,
                                 "writer": self.writer_info}
        if self.worker:
            extra["worker"] = self.worker
        return self.writer.commit(shard.spec, table, extra)


def produce_shard(
    maker: ShardMaker,
    spec: ShardSpec,
    *,
    wait: bool = False,
    advance: Callable[[int], None] = lambda n: None,
    writer: Optional["PipelinedWriter"] = None,
) -> ShardOutcome:
    """Make shard ``spec`` completely unless it is done; safe to run twice, in any process.

    Without ``wait`` a shard another process holds gives BUSY at once; with it, this waits until
    the holder finishes (then the shard is done: SKIPPED) or dies (then this process makes it).
    With a ``writer`` the generated shard and its claim go to that background writer (QUEUED; the
    writer gives the WRITTEN outcome, and the executor writes the manifest after the last write).
    """
    build = maker.build
    claim = build.store.claim(spec.name)
    if not claim.acquire(wait):
        return ShardOutcome(BUSY, spec)
    handed = False
    try:
        marker = maker.writer.finished(spec)
        if marker is not None:
            return ShardOutcome(SKIPPED, spec, marker)
        remove_shard_temp_files(build, spec)  # a dead writer's: we hold the claim
        if writer is None:
            marker = maker.write(maker.generate(spec, advance))
        else:
            def step(n: int) -> None:
                writer.check()  # a failed write stops the build here, not a shard later
                advance(n)

            writer.submit(maker.generate(spec, step), claim)
            handed = True
            return ShardOutcome(QUEUED, spec)
    finally:
        if not handed:
            claim.release()
    return ShardOutcome(WRITTEN, spec, marker, finalize(build, maker.writer))


class PipelinedWriter:
    """Writes generated shards in background threads while the generator makes the next ones.

    ``submit`` blocks while ``in_flight`` shards are waiting for or in the writer. Each write is
    :meth:`ShardMaker.write` (resize, encode, file whole, marker), then the shard's claim is
    released. The first failure is raised by the next ``check``/``submit`` and by ``close``; after
    it no new write starts. ``close`` (or leaving the ``with`` block) waits for every write and
    returns the WRITTEN outcomes. PIL, zlib and pyarrow release the GIL while they work, so the
    generator's thread keeps running meanwhile.
    """

    def __init__(self, maker: ShardMaker, in_flight: int = 1) -> None:
        self.maker = maker
        self.pool = ThreadPoolExecutor(in_flight, thread_name_prefix="synthgen-writer")
        self.slots = threading.BoundedSemaphore(in_flight)
        self.pending: list[Future] = []
        self.failure: Optional[BaseException] = None

    @classmethod
    def for_recipe(cls, maker: ShardMaker) -> Optional["PipelinedWriter"]:
        """The writer ``output.writer`` asks for: None for ``serial``."""
        out = maker.build.recipe.output
        return cls(maker, out.shards_in_flight) if out.writer == "pipelined" else None

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def submit(self, shard: GeneratedShard, claim: Claim) -> Future:
        """Write ``shard`` in the background; the writer owns ``claim`` from here (also on failure)."""
        try:
            self.slots.acquire()  # the generator waits here while the writer is behind
            try:
                self.check()
                future = self.pool.submit(self._write, shard, claim)
            except BaseException:
                self.slots.release()
                raise
        except BaseException:
            claim.release()
            raise
        self.pending.append(future)
        return future

    def _write(self, shard: GeneratedShard, claim: Claim) -> ShardOutcome:
        try:
            self.check()  # an earlier write failed: the build is stopping
            return ShardOutcome(WRITTEN, shard.spec, self.maker.write(shard))
        except BaseException as exc:
            if self.failure is None:
                self.failure = exc
            raise
        finally:
            claim.release()
            self.slots.release()

    def close(self) -> list[ShardOutcome]:
        """Wait for every write; the WRITTEN outcomes, or the first failure raised."""
        self.pool.shutdown(wait=True)
        self.check()
        return [f.result() for f in self.pending]

    def __enter__(self) -> "PipelinedWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: still let the running writes finish (complete or not marked)
            self.pool.shutdown(wait=True)
