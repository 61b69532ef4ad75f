"""Training data larger than memory: batches streamed from the parquet shards.

:class:`StreamBatches` reads one split with ``datasets.load_dataset(..., streaming=True)`` (an
``IterableDataset`` over the parquet shards: a Hub-layout folder as ``synthgen build`` writes it, a
parquet file, or a Hub id at a revision), shuffles shard order and a buffer of rows per epoch
(``set_epoch``), and lets ``torch.utils.data.DataLoader`` workers read and decode the shards in
parallel (each worker takes whole shards). Memory holds a shuffle buffer and a few batches per
worker, whatever the size of the dataset. Under DDP each process reads its own share of the shards
(dealt per epoch, the same plan on every process) and gets ``batch_size / world_size`` rows a batch;
each worker's short last batch is joined with the others', and a training epoch stops every process
after the same number of full batches (:meth:`StreamBatches.batches_per_epoch` plans it).

Where images are decoded (``decode``; ``"auto"``: on a GPU when the shards hold JPEG, else workers):

* ``"workers"``: PIL in the DataLoader workers (resize + centre crop as
  :func:`~synthgen.train.data.load_image_dataset` does), uint8 batches copied to the device;
* ``"device"``: the workers pass the encoded bytes and the main process decodes the batch with
  ``torchvision.io.decode_jpeg(..., device=...)`` - on a GPU that is nvJPEG, which outpaces CPU
  workers at 224 px (the same shorter-side resize and centre crop, antialiased bilinear there
  instead of PIL's bicubic); PNG and other formats fall back to the CPU decoder.

It has the batch interface of :class:`~synthgen.train.batches.TensorBatches` (``epoch``, ``len``),
so :func:`~synthgen.train.classify.train_classifier` and pre-training take either.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch

from synthgen.errors import MissingSplitError, SynthgenError
from synthgen.train.runtime import Runtime

__all__ = ["StreamBatches"]


def _shard_rows(files: list[str]) -> list[int]:
    import fsspec
    import pyarrow.parquet as pq

    rows = []
    for f in files:
        with fsspec.open(f, "rb") as fh:
            rows.append(pq.ParquetFile(fh).metadata.num_rows)
    return rows


def _first_rows(files: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """``(shard, rows kept)`` for the first ``limit`` rows, in file order (all rows when None)."""
    keep, left = [], (sum(r for _, r in files) if limit is None else limit)
    for f, r in files:
        if left <= 0:
            break
        keep.append((f, min(r, left)))
        left -= r
    return keep


def _string_classes(files: list[tuple[str, int]], column: str, desc: str) -> list[str]:
    """The class names of a string label column over the rows kept, numbered as the decoded path numbers them."""
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from synthgen.train.data import string_class_names

    names: set[str] = set()
    for path, keep in files:
        with fsspec.open(path, "rb") as fh:
            col = pq.read_table(fh, columns=[column]).column(0).slice(0, keep)
        if col.null_count:
            raise SynthgenError(f"{desc}: the label column {column!r} has empty (null) cells")
        names.update(pc.unique(col).to_pylist())
    return string_class_names(names)


def _first_is_jpeg(path: str, column: str) -> bool:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as fh:
        batch = next(pq.ParquetFile(fh).iter_batches(batch_size=1, columns=[column]), None)
    cell = None if batch is None else batch.column(0)[0].as_py()
    return bool(cell and cell.get("bytes") and cell["bytes"][:2] == b"\xff\xd8")


def _deal(files: list[tuple[str, int]], seed: int, epoch: int, shuffle: bool, parts: int) -> list[list[tuple[str, int]]]:
    """The epoch's shard order, dealt round-robin into ``parts`` shares."""
    order = list(range(len(files)))
    if shuffle:
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [[files[i] for i in order[p::parts]] for p in range(parts)]


class _ShardReader(torch.utils.data.IterableDataset):
    """Yields decoded batches ``(uint8 [b, 3, H, W] or encoded bytes, labels)`` of one process's shards."""

    def __init__(self, files, columns, batch, decode, seed, epoch, shuffle, buffer):
        super().__init__()
        self.files, self.columns, self.batch, self.decode = files, columns, batch, decode
        self.seed, self.epoch, self.shuffle, self.buffer = seed, epoch, shuffle, buffer

    def __iter__(self):
        import fsspec
        import pyarrow as pa
        import pyarrow.parquet as pq

        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.files[wid::nw]
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 104729 + wid)
        pending: list = []
        held = 0

        def emit(table, final: bool):
            n = table.num_rows
            if self.shuffle:
                table = table.take(pa.array(torch.randperm(n, generator=gen).numpy()))
            stop = n if final else n - n % self.batch
            for start in range(0, stop, self.batch):
                yield self.decode(table.slice(start, min(self.batch, stop - start)))
            return table.slice(stop)

        for path, keep in mine:
            with fsspec.open(path, "rb") as fh:
                taken = 0
                for rb in pq.ParquetFile(fh).iter_batches(batch_size=1024, columns=self.columns):
                    if taken >= keep:
                        break
                    rb = rb.slice(0, keep - taken)
                    taken += rb.num_rows
                    pending.append(rb)
                    held += rb.num_rows
                    if held >= self.buffer:
                        rest = yield from emit(pa.Table.from_batches(pending), final=False)
                        pending, held = rest.to_batches(), rest.num_rows
        if held:
            yield from emit(pa.Table.from_batches(pending), final=True)


class _Decode:
    """A record batch -> (uint8 ``[b, 3, H, W]`` or a list of encoded bytes, labels); in the workers."""

    def __init__(self, image_column, label_column, image_size, base_dir, raw: bool, label_ids: dict | None = None):
        self.image_column, self.label_column, self.label_ids = image_column, label_column, label_ids
        self.image_size, self.base_dir, self.raw = image_size, base_dir, raw

    def __call__(self, table):
        from synthgen.train.data import _decode_one

        cells = table.column(self.image_column).to_pylist()
        if self.label_column is None:
            labels = torch.full((len(cells),), -1, dtype=torch.long)
        else:
            values = table.column(self.label_column).to_pylist()
            if self.label_ids is not None:  # string labels: their class ids
                values = [self.label_ids[v] for v in values]
            labels = torch.tensor(values, dtype=torch.long)
        if self.raw:
            return [c["bytes"] for c in cells], labels
        arrays = [_decode_one(c, self.base_dir, self.image_size) for c in cells]
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))), labels


def _resize_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[3, H, W]`` on any device -> ``[3, size, size]``: the shorter side resized to ``size``,
    then the centre square, as the workers' PIL path (``data._decode_one``) cuts it (the resize here
    is antialiased bilinear, not bicubic)."""
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    out = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[0, :, top : top + size, left : left + size].round_().clamp_(0, 255).to(torch.uint8)


def _full_batches(loader, size: int):
    """``loader``'s batches with the short ones (each worker's last) joined into full ones; the rows
    left over come last, as one short batch."""
    rest = None
    for data, labels in loader:
        if len(labels) == size:
            yield data, labels
            continue
        if rest is not None:  # images are a uint8 tensor, or a list of encoded bytes
            data = torch.cat([rest[0], data]) if isinstance(data, torch.Tensor) else rest[0] + data
            labels = torch.cat([rest[1], labels])
        rest = data, labels
        if len(labels) >= size:
            yield data[:size], labels[:size]
            rest = data[size:], labels[size:]
    if rest is not None and len(rest[1]):
        yield rest


class StreamBatches:
    def __init__(
        self,
        source: str,
        split: str,
        runtime: Runtime,
        *,
        revision: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        image_size: int | None = None,
        num_workers: int = 2,
        seed: int = 0,
        limit: int | None = None,
        shuffle_buffer: int = 2048,
        require_labels: bool = True,
        labels: bool = True,
        label_map=None,
        decode: str = "auto",
    ) -> None:
        import datasets

        from synthgen.train.data import _detect_columns, _is_local, quiet_datasets, resolve_hub_commit

        if decode not in ("auto", "workers", "device"):
            raise SynthgenError(f"decode must be 'auto', 'workers' or 'device', got {decode!r}")
        self.runtime, self.seed, self.num_workers = runtime, seed, num_workers
        self.shuffle_buffer, self.decode, self.limit = shuffle_buffer, decode, limit
        commit = None
        local = _is_local(source)
        path = os.path.abspath(os.path.expanduser(source)) if local else source
        try:
            with quiet_datasets():
                if not local:
                    commit = resolve_hub_commit(source, revision)
                if local and os.path.isfile(path):
                    builder = datasets.load_dataset_builder("parquet", data_files={split: path})
                else:
                    builder = datasets.load_dataset_builder(path, **({"revision": commit} if commit else {}))
                files = [str(f) for f in (builder.config.data_files or {}).get(split, [])]
                if not files:
                    raise MissingSplitError(f"{source} has no split {split!r}; available: {', '.join(builder.config.data_files or {}) or 'none'}")
                if not all(f.endswith(".parquet") for f in files):
                    raise SynthgenError(f"{source}[{split}]: streaming reads parquet shards; these are not: {files[0]} ...")
                features = builder.info.features
                if features is None:
                    import pyarrow.parquet as pq
                    import fsspec

                    with fsspec.open(files[0], "rb") as fh:
                        features = datasets.Features.from_arrow_schema(pq.ParquetFile(fh).schema_arrow)
        except SynthgenError:
            raise
        except Exception as exc:  # datasets raises many kinds
            raise SynthgenError(f"cannot stream {source}[{split}]: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None

        image_column, label_column, _ = _detect_columns(SimpleNamespace(features=features), source, split, image_column, label_column, None)
        if not labels:  # the caller ignores labels (pre-training): none are read
            label_column = None
        elif require_labels and label_column is None:
            raise SynthgenError(f"{source}[{split}] has no label column (no ClassLabel feature and no column named label/labels)")
        keep = _first_rows(list(zip(files, _shard_rows(files))), limit)  # a limit keeps the first rows, in file order
        feat = features.get(label_column) if label_column else None
        self.class_names = list(feat.names) if isinstance(feat, datasets.ClassLabel) else None
        label_ids = None
        if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
            self.class_names = _string_classes(keep, label_column, f"{source}[{split}]")
            label_ids = {n: i for i, n in enumerate(self.class_names)}
        self._files = keep
        self.n = sum(k for _, k in keep)
        self.n_shards = len(keep)
        if runtime.distributed and self.n_shards < runtime.world_size:
            raise SynthgenError(f"{source}[{split}] has {self.n_shards} shard(s) for {runtime.world_size} processes; write more shards")
        self._columns = [c for c in (image_column, label_column) if c]
        if decode == "auto":  # nvJPEG on a GPU when the shards hold JPEG; PIL in the workers otherwise
            decode = "device" if runtime.device.type == "cuda" and _first_is_jpeg(keep[0][0], image_column) else "workers"
        self.decode = decode
        base_dir = path if local and os.path.isdir(path) else (os.path.dirname(path) if local else None)
        self._decode_fn = _Decode(image_column, label_column, image_size, base_dir, raw=decode == "device", label_ids=label_ids)
        self.image_size = image_size
        # on the device once: relabelling a batch then copies nothing from the host
        self.label_map = None if label_map is None else torch.as_tensor(label_map, dtype=torch.long).to(runtime.device)
        self.source = {"id": path, "revision": revision, "sha": commit, "split": split, "streamed": True, "shards": self.n_shards}

    def __len__(self) -> int:
        return self.n

    def describe(self) -> str:
        return f"{self.source['id']}[{self.source['split']}]: {self.n} images (streamed)"

    def _shares(self, epoch: int, shuffle: bool) -> list[list[tuple[str, int]]]:
        """Every process's shards for one epoch (the same plan on every process)."""
        return _deal(self._files, self.seed, epoch, shuffle, self.runtime.world_size)

    def batches_per_epoch(self, batch_size: int, epochs: int = 1, *, drop_last: bool = True, min_batch: int = 2) -> int:
        """Global batches of ``batch_size`` every process has in each shuffled epoch ``0 .. epochs -
        1``: under DDP the fewest full ones (how shards fall to processes changes per epoch), else
        ``len // batch_size`` plus the short rest unless ``drop_last`` or under ``min_batch`` rows.
        ``epoch(batch_size, e, drop_last=..., min_batch=..., batches=this)`` yields exactly this many."""
        rt = self.runtime
        if not rt.distributed:
            full, rest = divmod(self.n, batch_size)
            return full + int(not drop_last and rest >= max(1, min_batch))
        local = batch_size // rt.world_size
        return min(sum(k for _, k in share) // local for e in range(epochs) for share in self._shares(e, True))

    def _loader(self, files: list[tuple[str, int]], batch: int, epoch: int, shuffle: bool):
        """The batches of a DataLoader over ``files``: ``batch`` rows, each worker's last one short."""
        from torch.utils.data import DataLoader

        rt = self.runtime
        workers = min(self.num_workers, len(files))
        reader = _ShardReader(files, self._columns, batch, self._decode_fn, self.seed + rt.rank, epoch, shuffle, max(batch, self.shuffle_buffer))
        loader = DataLoader(reader, batch_size=None, num_workers=workers, pin_memory=rt.device.type == "cuda",
                            prefetch_factor=4 if workers else None)
        try:
            yield from loader
        except SynthgenError as exc:
            # torch re-raises a worker's error with the worker's traceback in its message: keep the last line
            last = str(exc).rstrip().splitlines()[-1]
            if "Original Traceback" not in str(exc):
                raise
            raise type(exc)(f"{self.describe()}: {last.split(': ', 1)[-1]}") from None

    def _to_device(self, data) -> torch.Tensor:
        rt = self.runtime
        if isinstance(data, torch.Tensor):
            return data.to(rt.device, non_blocking=True)
        import warnings

        with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated (for torchcodec); they still work
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if all(bytes(e[:2].tolist()) == b"\xff\xd8" for e in encoded):
                imgs = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=rt.device)
            else:
                imgs = [decode_image(e, mode=ImageReadMode.RGB).to(rt.device) for e in encoded]
        if self.image_size is not None:
            imgs = [_resize_crop(i, self.image_size) for i in imgs]
        return torch.stack(imgs)

    def epoch(self, batch_size: int, generator_or_epoch=None, *, drop_last: bool = False, min_batch: int = 2,
              batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One pass: shuffled (shard order + a row buffer, a function of ``seed`` and the epoch) unless
        ``generator_or_epoch`` is None. ``batch_size`` is global; this process gets its share.

        A process with ``r`` rows yields ``r // share`` full batches (the workers' short last batches
        are joined), then the rest unless ``drop_last`` or fewer than ``min_batch``. A shuffled pass
        stops after ``batches`` batches; under DDP it yields full batches only, and without
        ``batches`` the epoch's fewest, so every process takes the same number of steps. An in-order
        pass (scoring) yields every row of this process's shards once."""
        rt = self.runtime
        if isinstance(generator_or_epoch, torch.Generator):  # the tensor path's generator: draw an epoch number from it
            epoch = int(torch.randint(0, 2**31 - 1, (1,), generator=generator_or_epoch))
        else:
            epoch = generator_or_epoch
        scoring = epoch is None
        local = batch_size // rt.world_size
        shares = self._shares(0 if scoring else epoch, shuffle=not scoring)
        if scoring:
            batches = None
        elif rt.distributed:
            drop_last = True  # a short batch on one process only would put the processes out of step
            fewest = min(sum(k for _, k in share) for share in shares) // local
            batches = fewest if batches is None else min(batches, fewest)
        if batches is not None and batches <= 0:
            return
        yielded = 0
        for data, labels in _full_batches(self._loader(shares[rt.rank], local, 0 if scoring else epoch, shuffle=not scoring), local):
            if len(labels) < local and (drop_last or len(labels) < min_batch):
                break  # the short rest (it comes last)
            yield self._batch(data, labels)
            yielded += 1
            if batches is not None and yielded >= batches:
                return  # every process yields the same number of batches (collectives stay in step)

    def _batch(self, data, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._to_device(data)
        y = labels.to(self.runtime.device, non_blocking=True)
        if self.label_map is not None:
            y = self.label_map[y]
        return x, (None if self._decode_fn.label_column is None else y)

    def channel_stats(self, max_images: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std of the split's first ``max_images`` rows (in file order): the same
        rows, read the same way, so the same statistics on every process."""
        from synthgen.train.data import channel_stats

        first = _first_rows(self._files, max_images)
        parts = [self._to_device(data).cpu() for data, _ in self._loader(first, 256, 0, shuffle=False)]
        if not parts:
            raise SynthgenError(f"{self.describe()}: no images to compute the normalization statistics from")
        return channel_stats(torch.cat(parts))
