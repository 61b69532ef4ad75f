"""An image grid with prompts, to eyeball a dataset folder."""

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
        table = pq.read_table(shard)
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
