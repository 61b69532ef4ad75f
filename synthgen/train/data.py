"""Image datasets as one uint8 tensor, decoded once and memoised on disk.

The trainers never decode images per epoch: :func:`load_image_dataset` turns a split of a Hugging
Face dataset (a local Hub-layout folder such as one written by ``synthgen build``, a parquet file, or
a Hub id at a revision) into an :class:`ImageTensorDataset` whose ``images`` is a ``uint8
[N, 3, H, W]`` RGB tensor. Batches are then indexed straight from that tensor (on the GPU when it
fits) and normalised on the device with :func:`to_float`.

Decoded tensors are cached under ``synthgen.paths.cache_dir()/tensors/<key>.pt``, keyed by the
``datasets`` fingerprint of the split plus the split name, the columns, ``image_size`` and
``limit``; the second load of the same split is a ``torch.load`` (memory-mapped).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from synthgen.errors import MissingSplitError, SynthgenError

__all__ = [
    "ImageTensorDataset",
    "load_image_dataset",
    "split_train_val",
    "stratified_subset",
    "to_float",
    "channel_stats",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

# Bumped whenever the decoded-tensor layout or the decoding (resize) changes.
_CACHE_FORMAT = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_LABEL_NAMES = ("label", "labels")


@dataclass
class ImageTensorDataset:
    """A split decoded once: ``images`` uint8 ``[N, 3, H, W]`` (RGB) plus optional labels/groups."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    class_names: list[str] | None = None
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        n = self.images.shape[0]
        for name in ("labels", "groups"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != n:
                raise ValueError(f"{name} has {t.shape[0]} rows, images {n}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def num_classes(self) -> int | None:
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None

    def subset(self, indices) -> "ImageTensorDataset":
        """Rows ``indices`` (a sequence, tensor or slice); the source records how it was cut."""
        if isinstance(indices, slice):
            idx: Any = indices
            desc = f"{indices.start or 0}:{indices.stop if indices.stop is not None else len(self)}"
        else:
            idx = torch.as_tensor(indices, dtype=torch.long)
            desc = f"{len(idx)} rows"
        source = dict(self.source)
        source["subset"] = (source.get("subset", "") + f"[{desc}]")
        return ImageTensorDataset(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            groups=None if self.groups is None else self.groups[idx],
            class_names=None if self.class_names is None else list(self.class_names),
            source=source,
        )

    def describe(self) -> str:
        h, w = self.image_size
        return f"{self.source.get('id', '?')}[{self.source.get('split', '?')}]: {len(self)} images {h}x{w}"


# --------------------------------------------------------------------------------------------------
# loading


def _is_local(source: str) -> bool:
    return os.path.exists(os.path.expanduser(source))


def resolve_hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit sha that ``revision`` (a tag, branch, sha or None = main) of the Hub dataset
    ``repo_id`` resolves to now (``HfApi().dataset_info``; honours ``HF_ENDPOINT`` and the token)."""
    from huggingface_hub import HfApi

    return HfApi().dataset_info(repo_id, revision=revision).sha


@contextlib.contextmanager
def quiet_datasets():
    """``datasets``' progress bars off (they would precede an error line, or garble piped output)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if are_progress_bars_disabled() or os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is not None:
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


@contextlib.contextmanager
def naming_split_setting(hint: str):
    """A missing split's one-line error ends with ``hint``: the recipe setting that picks another."""
    try:
        yield
    except MissingSplitError as exc:
        raise MissingSplitError(f"{exc}; {hint}") from None


def _check_local_folder(p: Path, source: str) -> None:
    """A folder ``synthgen build`` is still writing is not a dataset yet (its finished shards are a
    part of it), and a folder that holds several builds is not one dataset: ``load_dataset`` would
    read every parquet file below it as one split."""
    from synthgen.dataset.folder import MANIFEST, shown_keys
    from synthgen.dataset.read import refuse_unfinished

    if (p / MANIFEST).is_file():
        return
    refuse_unfinished(p)
    nested = sorted({m.parent.relative_to(p).as_posix() for pattern in (f"*/{MANIFEST}", f"*/*/{MANIFEST}")
                     for m in p.glob(pattern)})
    if nested:
        raise SynthgenError(f"{source} is not one dataset: it holds the synthgen builds {shown_keys(nested)}; name one of them")


def _load_hf_split(source: str, split: str, revision: str | None, storage_options: dict | None = None):
    """Return ``(datasets.Dataset, resolved_id, commit)`` for one split, with one-line errors;
    ``commit`` is the Hub commit sha a Hub id resolved to (None for local data)."""
    with quiet_datasets():
        return _load_hf_split_quiet(source, split, revision, storage_options)


def _load_hf_split_quiet(source: str, split: str, revision: str | None, storage_options: dict | None = None):
    import datasets

    path = os.path.expanduser(source)
    commit = None
    try:
        if _is_local(source):
            if revision is not None:
                raise SynthgenError(
                    f"--revision {revision!r} applies to Hub datasets only; {source} is a local path "
                    "(check out that revision there, or pass the Hub id)"
                )
            p = Path(path)
            if p.is_file():
                suffix = p.suffix.lower().lstrip(".")
                builder = {"parquet": "parquet", "arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json"}.get(suffix)
                if builder is None:
                    raise SynthgenError(f"{source}: not a dataset folder or a parquet/arrow file")
                dsd = datasets.load_dataset(builder, data_files={"train": str(p)})
            elif (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
                dsd = datasets.load_from_disk(str(p))
                if isinstance(dsd, datasets.Dataset):
                    dsd = datasets.DatasetDict({"train": dsd})
            else:
                _check_local_folder(p, source)
                dsd = datasets.load_dataset(str(p))
            resolved = str(p.resolve())
        elif "://" in source and not source.startswith("hf://"):
            # an fsspec URL (s3://, gs://, ...): a folder of Hub-layout shards (data/<split>-*.parquet,
            # as `synthgen build --out URL` writes) or one parquet file; credentials from the environment
            if revision is not None:
                raise SynthgenError(f"--revision {revision!r} applies to Hub datasets only, not to {source}")
            if not source.endswith(".parquet"):
                from synthgen.dataset.read import refuse_unfinished

                refuse_unfinished(source, storage_options)
            files = source if source.endswith(".parquet") else f"{source.rstrip('/')}/data/{split}-*.parquet"
            dsd = datasets.load_dataset("parquet", data_files={split: files}, storage_options=storage_options)
            resolved = source
        else:
            if not _HUB_ID.match(source):
                raise SynthgenError(f"dataset {source!r} not found: no such local path, and not a Hub id (org/name)")
            # resolve the commit first: the data then comes from exactly that commit
            commit = resolve_hub_commit(source, revision)
            dsd = datasets.load_dataset(source, revision=commit)
            resolved = source
    except SynthgenError:
        raise
    except Exception as exc:  # datasets raises many kinds (FileNotFound, DatasetNotFound, ConnectionError ...)
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if "corresponds to no data" in msg:  # datasets' wording for a split with no rows
            raise SynthgenError(f"{source}: a split is empty (0 rows): {msg}") from None
        if isinstance(exc, datasets.exceptions.SplitsVerificationError) and _is_local(source):
            raise SynthgenError(
                f"{source}: its shards do not hold the rows its dataset card (README.md) records: a shard was "
                f"removed, added or changed since the build; `synthgen verify {source}` names what differs"
            ) from None
        if len(msg) > 300:
            msg = msg[:300] + "..."
        where = f"{source}" + (f" at revision {revision!r}" if revision else "")
        if not _is_local(source) and "://" not in source:
            where += " (no such local path, so it was read as a Hub dataset id)"
        raise SynthgenError(f"cannot load dataset {where}: {type(exc).__name__}: {msg}") from None
    if not isinstance(dsd, datasets.DatasetDict):  # pragma: no cover - load_dataset without split gives a dict
        dsd = datasets.DatasetDict({"train": dsd})
    if split not in dsd:
        raise MissingSplitError(f"{source} has no split {split!r}; available: {', '.join(dsd.keys()) or 'none'}")
    return dsd[split], resolved, commit


def _detect_columns(ds, source: str, split: str, image_column, label_column, group_column):
    import datasets

    feats = ds.features
    if image_column is None:
        image_column = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
        if image_column is None:
            raise SynthgenError(
                f"{source}[{split}] has no image column (no Image feature among: {', '.join(feats) or 'none'}); "
                "pass image_column"
            )
    elif image_column not in feats:
        raise SynthgenError(f"{source}[{split}] has no column {image_column!r}; columns: {', '.join(feats)}")
    elif not isinstance(feats[image_column], datasets.Image):
        raise SynthgenError(f"{source}[{split}] column {image_column!r} is {feats[image_column]}, not an Image")
    if label_column is None:
        label_column = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
        if label_column is None:
            label_column = next((k for k in _LABEL_NAMES if k in feats), None)
    elif label_column not in feats:
        raise SynthgenError(f"{source}[{split}] has no label column {label_column!r}; columns: {', '.join(feats)}")
    if group_column is not None and group_column not in feats:
        raise SynthgenError(f"{source}[{split}] has no group column {group_column!r}; columns: {', '.join(feats)}")
    return image_column, label_column, group_column


def string_class_names(labels) -> list[str]:
    """The classes of a string label column in id order: the distinct names sorted alphabetically
    (class id = position). The decoded and the streamed paths number string labels with this."""
    return sorted(set(labels))


def _decode_one(example: dict | None, base_dir: str | None, image_size: int | None) -> np.ndarray:
    from PIL import Image

    if example is None:
        raise SynthgenError("an image cell is empty (null)")
    data = example.get("bytes")
    path = example.get("path")
    if data is None and not path:
        raise SynthgenError("an image cell has neither bytes nor path")
    if data is None and base_dir and not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(base_dir, path)
    try:
        img = Image.open(io.BytesIO(data) if data is not None else path).convert("RGB")
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for unreadable, truncated or corrupt data
        # PIL's UnidentifiedImageError is an OSError: left alone, it would read as a file-system error
        raise SynthgenError(
            f"an image cannot be decoded ({exc}): the data is corrupt; `synthgen verify FOLDER` checks the "
            "shards of a build folder against its manifest"
        ) from None
    if image_size is not None and img.size != (image_size, image_size):
        # resize the shorter side to image_size, then centre-crop a square
        w, h = img.size
        s = image_size / min(w, h)
        nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if max(w, h) < 4 * image_size else 3.0)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    return np.array(img, dtype=np.uint8)


# a split this large takes seconds to minutes to decode the first time (later loads are cached)
_DECODE_BAR_ROWS = 10_000


@contextlib.contextmanager
def _decode_progress(desc: str, total: int):
    """``advance(n)``: a bar that disappears when done, on an interactive stderr only (logs and pipes
    stay as they were), on the first process of a launch, for a split of ``_DECODE_BAR_ROWS`` or more."""
    import sys

    if total < _DECODE_BAR_ROWS or not sys.stderr.isatty() or os.environ.get("RANK", "0") != "0":
        yield lambda n: None
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"decoding {escape(desc)}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("decode", total=total)
        yield lambda n: bar.advance(task, n)


def _decode_images(ds, column: str, image_size: int | None, base_dir: str | None, desc: str) -> torch.Tensor:
    import datasets

    n = len(ds)
    raw = ds.cast_column(column, datasets.Image(decode=False)).select_columns([column])
    out: torch.Tensor | None = None
    workers = max(1, min(8, os.cpu_count() or 1))
    batch = 2048
    with ThreadPoolExecutor(max_workers=workers) as pool, _decode_progress(desc, n) as advance:
        start = 0
        for rows in raw.iter(batch_size=batch):
            cells = rows[column]
            try:
                arrays = list(pool.map(lambda c: _decode_one(c, base_dir, image_size), cells))
            except SynthgenError as exc:
                raise SynthgenError(f"{desc} rows {start}-{start + len(cells) - 1}: {exc}") from None
            for j, a in enumerate(arrays):
                if out is None:
                    h, w = a.shape[:2]
                    out = torch.empty((n, 3, h, w), dtype=torch.uint8)
                if a.shape[0] != out.shape[2] or a.shape[1] != out.shape[3]:
                    raise SynthgenError(
                        f"{desc}: images differ in size ({out.shape[2]}x{out.shape[3]} and "
                        f"{a.shape[0]}x{a.shape[1]} at row {start + j}); pass image_size to resize them"
                    )
                out[start + j] = torch.from_numpy(a).permute(2, 0, 1)
            start += len(arrays)
            advance(len(arrays))
    assert out is not None
    return out


def _cache_path(key: dict) -> Path:
    from synthgen.paths import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    folder = cache_dir() / "tensors"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{digest}.pt"


def load_image_dataset(
    source: str,
    split: str,
    *,
    revision: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    image_size: int | None = None,
    limit: int | None = None,
    cache: bool = True,
    require_labels: bool = False,
    storage_options: dict | None = None,
) -> ImageTensorDataset:
    """Decode one split of ``source`` into an :class:`ImageTensorDataset`.

    ``source``: a local dataset folder (Hub layout with README.md configs, plain data files, or a
    ``save_to_disk`` folder), a local parquet/arrow file (its rows are split ``train``), a Hub
    id ``org/name`` loaded with ``datasets.load_dataset(id, revision=revision)``, or an fsspec URL
    (``s3://bucket/folder`` holding ``data/<split>-*.parquet``, or a ``.parquet`` object) opened
    with ``storage_options`` (default: the environment's credentials and fsspec settings).

    The image column is the first ``Image`` feature and the label column the first ``ClassLabel``
    (else a column named ``label``/``labels``) unless named. ``image_size`` resizes (shorter side,
    then a centre square crop) every image; without it all images must share a size. ``limit``
    keeps the first ``limit`` rows. ``require_labels`` makes a missing label column an error.
    """
    import datasets

    ds, resolved, commit = _load_hf_split(source, split, revision, storage_options)
    desc = f"{source}[{split}]"
    if len(ds) == 0:
        raise SynthgenError(f"{desc} is empty (0 rows)")
    image_column, label_column, group_column = _detect_columns(ds, source, split, image_column, label_column, group_column)
    if require_labels and label_column is None:
        raise SynthgenError(
            f"{desc} has no label column (no ClassLabel feature and no column named label/labels); pass label_column"
        )
    if limit is not None:
        if limit <= 0:
            raise SynthgenError(f"limit must be positive, got {limit}")
        if limit < len(ds):
            ds = ds.select(range(limit))
    fingerprint = getattr(ds, "_fingerprint", None)
    source_info = {"id": resolved, "revision": revision, "sha": commit, "split": split, "fingerprint": fingerprint}
    key = {
        "format": _CACHE_FORMAT,
        "fingerprint": fingerprint,
        "id": resolved,
        "revision": revision,
        "sha": commit,
        "split": split,
        "columns": [image_column, label_column, group_column],
        "image_size": image_size,
        "limit": limit,
        "rows": len(ds),
    }
    path = _cache_path(key) if cache and fingerprint else None
    if path is not None and path.exists():
        try:
            blob = torch.load(path, mmap=True, weights_only=True)
            return ImageTensorDataset(
                images=blob["images"],
                labels=blob.get("labels"),
                groups=blob.get("groups"),
                class_names=json.loads(blob["meta"])["class_names"],
                source=source_info,
            )
        except Exception:  # a truncated or stale cache file: decode again
            path.unlink(missing_ok=True)

    labels = groups = None
    class_names: list[str] | None = None
    if label_column is not None:
        feat = ds.features[label_column]
        if isinstance(feat, datasets.ClassLabel):
            class_names = [str(n) for n in feat.names]
        values = list(ds.with_format(None)[label_column])
        if any(v is None for v in values):
            raise SynthgenError(f"{desc}: the label column {label_column!r} has empty (null) cells")
        if values and isinstance(values[0], str):
            class_names = string_class_names(values)
            index = {n: i for i, n in enumerate(class_names)}
            values = [index[v] for v in values]
        try:
            labels = torch.tensor(values, dtype=torch.long)
        except (TypeError, ValueError):
            raise SynthgenError(f"{desc}: the label column {label_column!r} is not integer class ids") from None
        if len(labels) and int(labels.min()) < 0:
            raise SynthgenError(f"{desc}: the label column {label_column!r} has negative ids (unlabelled rows?)")
    if group_column is not None:
        values = list(ds.with_format(None)[group_column])
        if values and not isinstance(values[0], (int, np.integer)):
            index: dict = {}
            values = [index.setdefault(v, len(index)) for v in values]
        groups = torch.tensor(values, dtype=torch.long)

    base_dir = resolved if os.path.isdir(resolved) else (os.path.dirname(resolved) if _is_local(resolved) else None)
    images = _decode_images(ds, image_column, image_size, base_dir, desc)
    out = ImageTensorDataset(images=images, labels=labels, groups=groups, class_names=class_names, source=source_info)
    if path is not None:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        blob = {"images": images, "meta": json.dumps({"class_names": class_names, "key": key})}
        if labels is not None:
            blob["labels"] = labels
        if groups is not None:
            blob["groups"] = groups
        torch.save(blob, tmp)
        os.replace(tmp, path)
    return out


# --------------------------------------------------------------------------------------------------
# class names


def _norm_name(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def match_labels(names: Sequence[str], target_names: Sequence[str], *, what: str = "synthetic",
                 target: str = "real set") -> torch.Tensor:
    """``map[i]`` = the index in ``target_names`` of class ``names[i]``, matched by name (exactly, then
    case/underscore/hyphen-insensitively); a name the target lacks is an error naming ``what`` and ``target``."""
    exact = {n: i for i, n in enumerate(target_names)}
    loose = {_norm_name(n): i for i, n in enumerate(target_names)}
    out, unmatched = [], []
    for n in names:
        j = exact.get(n, loose.get(_norm_name(n)))
        if j is None:
            unmatched.append(n)
        out.append(-1 if j is None else j)
    if unmatched:
        shown = ", ".join(repr(n) for n in unmatched[:20]) + (f" (+{len(unmatched) - 20} more)" if len(unmatched) > 20 else "")
        raise SynthgenError(
            f"{len(unmatched)} {what} label name(s) not in the {target}: {shown}; "
            f"the {target} has: {', '.join(target_names[:20])}{' ...' if len(target_names) > 20 else ''}"
        )
    return torch.tensor(out, dtype=torch.long)


def relabel_by_name(ds: ImageTensorDataset, class_names: Sequence[str], *, what: str, target: str) -> ImageTensorDataset:
    """``ds`` with its labels mapped onto ``class_names`` by name (see :func:`match_labels`); its class
    names become ``class_names``. Needed wherever two splits are read separately: string labels are
    numbered per split (sorted names), so a class missing from one split shifts every id after it."""
    label_map = match_labels(ds.class_names, class_names, what=what, target=target)
    return ImageTensorDataset(images=ds.images, labels=label_map[ds.labels], groups=ds.groups,
                              class_names=list(class_names), source=ds.source)


# --------------------------------------------------------------------------------------------------
# splitting and normalisation


def split_train_val(ds: ImageTensorDataset, val_fraction: float, seed: int) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Carve a validation split, stratified by label when labelled (each class keeps
    ``round(n_c * val_fraction)`` rows, at least one when the class has two or more).

    Both parts keep the original row order; the same ``seed`` gives the same split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise SynthgenError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(ds)
    g = torch.Generator().manual_seed(int(seed))
    if ds.labels is not None:
        val_parts = []
        for c in torch.unique(ds.labels).tolist():
            idx = torch.nonzero(ds.labels == c, as_tuple=False).flatten()
            k = int(round(len(idx) * val_fraction))
            if k == 0 and len(idx) >= 2:
                k = 1
            if k >= len(idx):
                k = len(idx) - 1
            perm = idx[torch.randperm(len(idx), generator=g)]
            val_parts.append(perm[:k])
        val_idx = torch.cat(val_parts) if val_parts else torch.empty(0, dtype=torch.long)
    else:
        k = max(1, int(round(n * val_fraction)))
        val_idx = torch.randperm(n, generator=g)[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[val_idx] = True
    if mask.all() or not mask.any():
        raise SynthgenError(f"cannot carve a validation split of {val_fraction:.0%} from {n} images")
    train_idx = torch.nonzero(~mask).flatten()
    val_idx = torch.nonzero(mask).flatten()
    return ds.subset(train_idx), ds.subset(val_idx)


def stratified_subset(ds: ImageTensorDataset, n: int, seed: int) -> ImageTensorDataset:
    """``n`` rows drawn per class in proportion (random, seeded); rows keep their order."""
    if n >= len(ds):
        return ds
    if ds.labels is None:
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        return ds.subset(torch.sort(idx).values)
    _, val = split_train_val(ds, n / len(ds), seed)
    return val


def to_float(images_uint8: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` -> normalised ``float32`` on the same device: ``(x / 255 - mean) / std``."""
    from synthgen.train.runtime import device_constant

    dev = images_uint8.device
    m = device_constant(mean, torch.float32, dev).view(1, -1, 1, 1)  # built once, not copied to the GPU every batch
    s = device_constant(std, torch.float32, dev).view(1, -1, 1, 1)
    x = images_uint8.to(torch.float32).div_(255.0)
    return x.sub_(m).div_(s)


def channel_stats(images_uint8: torch.Tensor, max_images: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of up to ``max_images`` evenly spaced images."""
    n = images_uint8.shape[0]
    step = max(1, n // max_images)
    x = images_uint8[::step].to(torch.float64).div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
