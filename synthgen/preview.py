"""Look at a dataset folder (a local path or any fsspec URL; the PNGs written are local files): an
image grid with prompts, and one row regenerated next to its original."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from synthgen.dataset.storage import Store, open_store
from synthgen.errors import SynthgenError


def read_first_rows(folder: str | Path | Store, n: int, storage_options: Optional[dict[str, Any]] = None) -> list[dict]:
    """The first ``n`` rows of the folder's shards (a path, an fsspec URL or a store), in shard order;
    only the row groups that hold them are read."""
    import pyarrow.parquet as pq

    store = open_store(folder, storage_options, reading=True)
    shards = sorted(f"data/{name}" for name in store.listing("data") if name.endswith(".parquet"))
    if not shards:
        from synthgen.dataset.read import refuse_unfinished

        refuse_unfinished(store)  # a build that has not finished a shard yet
        raise SynthgenError(f"{store.display} holds no parquet shards (data/*.parquet); is it a dataset folder?")
    rows: list[dict] = []
    for shard in shards:
        try:
            with store.open_read(shard) as f:
                parquet = pq.ParquetFile(f)
                columns = [c for c in ("image", "index", "prompt", "label") if c in parquet.schema_arrow.names]
                if "image" not in columns or "index" not in columns:
                    raise SynthgenError(f"{store.display}/{shard} is not a shard of a synthgen dataset (no image and "
                                        f"index columns); run `synthgen verify {store.display}`")
                names = _label_names(parquet.schema_arrow)
                for batch in parquet.iter_batches(batch_size=n - len(rows), columns=columns):
                    for row in batch.slice(0, n - len(rows)).to_pylist():
                        label = row.get("label")
                        row["label_name"] = names[label] if isinstance(label, int) and 0 <= label < len(names) else label
                        rows.append(row)
                    if len(rows) >= n:
                        break
        except (OSError, pa.ArrowException) as exc:
            raise SynthgenError(f"{store.display}/{shard} is unreadable ({str(exc).splitlines()[0][:120]}); "
                                f"run `synthgen verify {store.display}`") from None
        if len(rows) >= n:
            break
    return rows


def _label_names(schema: pa.Schema) -> list[str]:
    """The ``label`` column's class names, from the ``datasets`` features stored in the shard's metadata."""
    import json

    try:
        features = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
        return list(features["label"]["names"])
    except (KeyError, TypeError, ValueError):
        return []


def write_preview(folder: str | Path | Store, out: str | Path, n: int = 16, columns: int = 4, cell: int = 192, *,
                  storage_options: Optional[dict[str, Any]] = None) -> Path:
    """Write a grid of the first ``n`` images of ``folder`` (a path or any fsspec URL), each with its
    index and prompt (its class name when it has no prompt), to the local PNG ``out``."""
    if n <= 0 or columns <= 0 or cell < 32:
        raise SynthgenError("preview needs n > 0, columns > 0 and a cell of at least 32 px")
    store = open_store(folder, storage_options, reading=True)
    rows = read_first_rows(store, n)
    font = ImageFont.load_default()
    text_h = 44
    grid_rows = -(-len(rows) // columns)
    grid = Image.new("RGB", (columns * cell, grid_rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, cell // 6)
    for k, row in enumerate(rows):
        x, y = (k % columns) * cell, (k // columns) * (cell + text_h)
        try:
            image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        except (OSError, ValueError):  # PIL's errors for broken data are OSErrors, not the disk's
            raise SynthgenError(f"{store.display}: row {row['index']}'s image does not decode; "
                                f"run `synthgen verify {store.display}`") from None
        # nearest keeps tiny images (32 px) crisp instead of blurring them
        image = image.resize((cell, cell), Image.NEAREST if image.width < cell // 2 else Image.BICUBIC)
        grid.paste(image, (x, y))
        # a class-conditioned row has no prompt: its class name is what it was made from
        caption = f"#{row['index']} {row.get('prompt') or row.get('label_name') or ''}"
        lines = textwrap.wrap(caption, chars)[:3]
        draw.multiline_text((x + 2, y + cell + 2), "\n".join(lines), fill="black", font=font, spacing=2)
    return _save(grid, out)


def _save(image: Image.Image, out: str | Path) -> Path:
    """Save a PNG, creating its folder; a read-only or missing place is one line, not a traceback."""
    from synthgen.dataset.build import disk_errors

    out = Path(out)
    with disk_errors():
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, format="PNG")
    return out


def regenerate_to_file(folder: str | Path | Store, index: int, out: str | Path, loaded_pipeline=None, *,
                       storage_options: Optional[dict[str, Any]] = None) -> int:
    """Regenerate row ``index`` of ``folder`` (a path or any fsspec URL) into the local PNG ``out``;
    returns the largest pixel difference from the stored image. The row and its shard are checked
    before anything is written."""
    import numpy as np

    from synthgen.dataset import read_row, regenerate_row

    store = open_store(folder, storage_options, reading=True)
    row = read_row(store, index)  # raises on a damaged shard: no PNG is written then
    stored = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")).astype(int)
    image = regenerate_row(store, index, loaded_pipeline=loaded_pipeline, row=row)
    _save(image, out)
    return int(np.abs(stored - np.asarray(image.convert("RGB")).astype(int)).max())
