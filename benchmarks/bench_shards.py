"""Shard-writing rate: images/s on one core at 256 and 512 px, PNG and JPEG.

Times ``ShardWriter.write`` (encode every image, build the Arrow table, write parquet to a temp
name, fsync, rename, write the completion marker) on synthetic images with the statistics of a
photo rather than white noise: a smooth colour field plus mild noise (pure noise is the worst case
for PNG and would understate its rate). One process, pinned to one core where the OS allows it.

    python benchmarks/bench_shards.py [--images 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthgen.provenance import cpu_name, library_versions  # noqa: E402
from synthgen.dataset.plan import ShardPlan  # noqa: E402
from synthgen.dataset.schema import dataset_features  # noqa: E402
from synthgen.dataset.writer import ShardRow, ShardWriter  # noqa: E402


def photo_like(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)
    noisy = np.clip(smooth + rng.normal(0, 6, size=smooth.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images per shard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    results = []
    features = dataset_features([f"class{i}" for i in range(10)])
    for size in (256, 512):
        images = [photo_like(size, seed) for seed in range(args.images)]
        rows = [
            ShardRow(index=i, image=img, prompt=f"a photo number {i}", label=i % 10, group=i, seed=i, retries=0,
                     meta={"template": "{c}"})
            for i, img in enumerate(images)
        ]
        for fmt in ("png", "jpeg"):
            times = []
            size_bytes = 0
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    writer = ShardWriter(tmp, features, "bench", image_format=fmt, jpeg_quality=95, encode_workers=1)
                    spec = ShardPlan(args.images, args.images).shard(0)
                    start = time.perf_counter()
                    info = writer.write(spec, rows)
                    times.append(time.perf_counter() - start)
                    size_bytes = info["bytes"]
            median = statistics.median(times)
            results.append(
                {
                    "size": size,
                    "format": fmt,
                    "images": args.images,
                    "seconds_median": round(median, 4),
                    "images_per_s_per_core": round(args.images / median, 1),
                    "bytes_per_image": round(size_bytes / args.images),
                }
            )

    print(f"{'size':>5} {'format':>6} {'img/s/core':>11} {'KiB/img':>8}")
    for r in results:
        print(f"{r['size']:>5} {r['format']:>6} {r['images_per_s_per_core']:>11} {r['bytes_per_image'] / 1024:>8.1f}")

    record = {
        "benchmark": "shard_writing",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": cpu_name(), "cores_used": 1, "host": platform.node()},
        "versions": library_versions(),
        "settings": {"images_per_shard": args.images, "repeats": args.repeats, "png_compress_level": 1,
                     "jpeg_quality": 95, "image": "smooth colour field + gaussian noise (sigma 6)"},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "shards-cpu.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
