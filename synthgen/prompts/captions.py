"""StableRep prompts (Tian et al.): real captions, ``m = images_per_caption`` images each.

Captions come from a local file or a Hub dataset (``CaptionPrompts.source``):

- ``.tsv``: the first column (``caption<TAB>url`` as in CC3M), no header; with ``column`` set, the
  first line is a header and that column is used;
- ``.csv``: a header line, the ``column`` column (default ``caption``, or the only column);
- ``.txt``: one caption per line;
- ``.parquet``: the ``column`` column (default ``caption``);
- ``hf://datasets/ORG/NAME``: ``datasets.load_dataset(NAME, split=split, revision=revision)[column]``.

Relative paths resolve against the current folder first, then ``prompts/`` (which ships
``cc3m-validation.txt``, the 15,833 CC3M validation captions).

Filtering, in order: whitespace is normalised (stripped, inner runs collapsed to one space; the
normalised text is the prompt), empty captions are dropped, captions with fewer than ``min_words``
or more than ``max_words`` words are dropped, and with ``dedup`` only the first occurrence of a
caption is kept. With ``shuffle`` the caption order is a keyed pseudo-random permutation from the
seed (the same on every machine; no materialised shuffle).

Image ``i`` shows caption ``i // m`` of that order, copy ``i % m``; its group id is the caption's
position in the filtered list (``meta["caption_index"]``), shared by its ``m`` images, which are
positives for each other in StableRep's multi-positive contrastive loss.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Optional

from synthgen.errors import RecipeError, SynthgenError
from synthgen.prompts.base import PromptRecord, check_index
from synthgen.prompts.combinatorial import KeyedPermutation
from synthgen.prompts.tables import resolve_data_file
from synthgen.recipe import CaptionPrompts

HUB_PREFIX = "hf://datasets/"
_WS = re.compile(r"\s+")


def read_captions(config: CaptionPrompts) -> tuple[list[str], str]:
    """All raw captions of the source, in source order, and a description of where they came from."""
    if config.source.startswith(HUB_PREFIX):
        return _hub_captions(config), config.source
    path = resolve_data_file(config.source, "caption source")
    suffix = path.suffix.lower()
    try:
        if suffix == ".tsv":
            return _delimited(path, "\t", config.column, header=config.column is not None), str(path)
        if suffix == ".csv":
            return _delimited(path, ",", config.column, header=True), str(path)
        if suffix == ".txt":
            return path.read_text(encoding="utf-8").splitlines(), str(path)
        if suffix == ".parquet":
            return _parquet(path, config.column), str(path)
    except UnicodeDecodeError as exc:
        raise SynthgenError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    raise SynthgenError(f"caption source {path}: unsupported file type {suffix!r} (use .tsv, .csv, .txt or .parquet)")


def _pick_column(columns: list[str], column: Optional[str], where: str) -> str:
    if column is not None:
        if column not in columns:
            raise SynthgenError(f"{where}: no column {column!r} (columns: {', '.join(columns)})")
        return column
    if "caption" in columns:
        return "caption"
    if len(columns) == 1:
        return columns[0]
    raise SynthgenError(f"{where}: set prompts.column to one of {', '.join(columns)}")


def _delimited(path: Path, delimiter: str, column: Optional[str], header: bool) -> list[str]:
    with open(path, encoding="utf-8", newline="") as fh:
        if delimiter == "\t":
            # Plain split: captions may hold quote characters, which are not CSV quoting here.
            lines = fh.read().splitlines()
            if not header:
                return [line.split("\t", 1)[0] for line in lines]
            if not lines:
                return []
            names = lines[0].split("\t")
            at = names.index(_pick_column(names, column, str(path)))
            return [cells[at] if len(cells) > at else "" for cells in (line.split("\t") for line in lines[1:])]
        reader = csv.reader(fh)
        names = next(reader, None)
        if names is None:
            return []
        at = names.index(_pick_column(names, column, str(path)))
        return [row[at] if len(row) > at else "" for row in reader]


def _parquet(path: Path, column: Optional[str]) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        name = _pick_column(list(schema.names), column, str(path))
        table = pq.read_table(path, columns=[name])
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise SynthgenError(f"cannot read parquet file {path}: {exc}") from None
    return ["" if v is None else str(v) for v in table.column(name).to_pylist()]


def _hub_captions(config: CaptionPrompts) -> list[str]:
    name = config.source[len(HUB_PREFIX) :].strip("/")
    if name.count("/") > 1 or not name:
        raise SynthgenError(f"caption source {config.source!r}: expected hf://datasets/ORG/NAME")
    try:
        import datasets

        data = datasets.load_dataset(name, split=config.split, revision=config.revision)
    except Exception as exc:  # offline, unknown dataset, bad split or revision, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        revision = f" at revision {config.revision}" if config.revision else ""
        raise SynthgenError(
            f"cannot load Hub dataset {name} (split {config.split!r}{revision}): {type(exc).__name__}: {first}"
        ) from None
    column = _pick_column(list(data.column_names), config.column, config.source)
    return ["" if v is None else str(v) for v in data[column]]


def filter_captions(
    captions: list[str], dedup: bool = True, min_words: int = 1, max_words: Optional[int] = None
) -> tuple[list[str], list[int]]:
    """Normalised captions that pass the filters, and their positions in the source."""
    kept: list[str] = []
    origin: list[int] = []
    seen: set[str] = set()
    for position, raw in enumerate(captions):
        text = _WS.sub(" ", raw).strip()
        if not text:
            continue
        words = len(text.split(" "))
        if words < min_words or (max_words is not None and words > max_words):
            continue
        if dedup:
            if text in seen:
                continue
            seen.add(text)
        kept.append(text)
        origin.append(position)
    return kept, origin


class CaptionSampler:
    """``CaptionSampler(config, count, seed)``: ``images_per_caption`` images for each caption."""

    class_names = None  # captions are unlabelled

    def __init__(self, config: CaptionPrompts, count: int, seed: int):
        self.config = config
        self.count = int(count)
        self.seed = int(seed)
        self.images_per_caption = config.images_per_caption
        if config.max_words is not None and config.max_words < config.min_words:
            raise RecipeError(f"prompts.max_words ({config.max_words}) is below prompts.min_words ({config.min_words})")
        raw, self.source = read_captions(config)
        self.captions, self.source_positions = filter_captions(
            raw, config.dedup, config.min_words, config.max_words
        )
        if not self.captions:
            raise SynthgenError(
                f"no captions left in {self.source} after filtering ({len(raw)} read; "
                f"min_words={config.min_words}, max_words={config.max_words}, dedup={config.dedup})"
            )
        m = self.images_per_caption
        available = len(self.captions)
        if self.count > m * available:
            raise RecipeError(
                f"count {self.count} needs {-(-self.count // m)} captions at images_per_caption={m}, "
                f"but {self.source} has {available} captions after filtering (at most {m * available} images)"
            )
        self._order = KeyedPermutation(available, ("captions", self.seed)) if config.shuffle else None

    def __len__(self) -> int:
        return self.count

    @property
    def num_captions(self) -> int:
        """Captions used: ``ceil(count / images_per_caption)``."""
        return -(-self.count // self.images_per_caption)

    def caption_index(self, position: int) -> int:
        """The filtered-list index of the caption shown at ``position`` of the (shuffled) order."""
        return self._order(position) if self._order is not None else position

    def __getitem__(self, index: int) -> PromptRecord:
        i = check_index(index, self.count)
        position, copy = divmod(i, self.images_per_caption)
        k = self.caption_index(position)
        return PromptRecord(
            index=i,
            prompt=self.captions[k],
            group=k,
            meta={"caption_index": k, "copy": copy, "source_index": self.source_positions[k]},
        )

    def __iter__(self):
        return (self[i] for i in range(self.count))
