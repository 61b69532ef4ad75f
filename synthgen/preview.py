"""Look at a dataset folder: an image grid with prompts, and one row regenerated next to its original."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from synthgen.errors import SynthgenError


def read_first_rows(folder: str | Path, n: int) -> list[dict]:
    import pyarrow.parquet as pq

    shards = sorted(Path(folder).glob("data/*.parquet"))
    if not shards:
        raise SynthgenError(f"{folder} holds no parquet shards (data/*.parquet); is it a dataset folder?")
    rows: list[dict] = []
    for shard in shards:
        try:
            table = pq.read_table(shard)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise SynthgenError(f"{shard} is unreadable ({str(exc).splitlines()[0][:120]}); run `synthgen verify {folder}`") from None
        columns = [c for c in ("image", "index", "prompt", "label") if c in table.column_names]
        rows.extend(table.select(columns).slice(0, n - len(rows)).to_pylist())
        if len(rows) >= n:
            break
    return rows


def write_preview(folder: str | Path, out: str | Path, n: int = 16, columns: int = 4, cell: int = 192) -> Path:
    if n <= 0 or columns <= 0 or cell < 32:
        raise SynthgenError("preview needs n > 0, columns > 0 and a cell of at least 32 px")
    rows = read_first_rows(folder, n)
    font = ImageFont.load_default()
    text_h = 44
    grid_rows = -(-len(rows) // columns)
    grid = Image.new("RGB", (columns * cell, grid_rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, cell // 6)
    for k, row in enumerate(rows):
        x, y = (k % columns) * cell, (k // columns) * (cell + text_h)
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        # nearest keeps tiny images (32 px) crisp instead of blurring them
        image = image.resize((cell, cell), Image.NEAREST if image.width < cell // 2 else Image.BICUBIC)
        grid.paste(image, (x, y))
        caption = f"#{row['index']} {row.get('prompt') or ''}"
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


def regenerate_to_file(folder: str | Path, index: int, out: str | Path, loaded_pipeline=None) -> int:
    """Regenerate row ``index`` of ``folder`` into the PNG ``out``; returns the largest pixel
    difference from the stored image. The row and its shard are checked before anything is written."""
    import numpy as np

    from synthgen.dataset import read_row, regenerate_row

    row = read_row(folder, index)  # raises on a damaged shard: no PNG is written then
    stored = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")).astype(int)
    image = regenerate_row(folder, index, loaded_pipeline=loaded_pipeline, row=row)
    _save(image, out)
    return int(np.abs(stored - np.asarray(image.convert("RGB")).astype(int)).max())
