"""Per-shard coordination overhead of a build, on a local folder and on an S3 server, and what it
means for scaling ImageNet-SD over 8, 64 and 512 GPUs.

Coordination is everything a process does for a shard besides generating and writing it: the claim
(``flock`` locally; a lease object on S3: write, settle, read back, renew, delete), the check that
the shard is not done yet (its marker), clearing a dead writer's temp files, the marker itself, and
the check after each shard whether it was the last. Once per process there is the helpers' scan of
the others' shards (a listing, then every marker, read together), and once per build the manifest
and card. Each is
timed on the real store code (``synthgen.dataset.storage``/``folder``) over a plan with ImageNet-SD's
shard count (1.2M images, 2,000 per shard: 600 shards, their markers all present for the scan and
the manifest). Shard files are a one-row stand-in (the manifest and card read their parquet footers
and labels, not their rows); the 40 MB write and full sha256 read of a real shard are timed apart,
as context: they happen with one GPU too.

The projection: a build of N shards on W GPUs ends after ``startup + ceil(N / W) * (T + c) + scan +
manifest``, where T is a shard's GPU time and c its coordination; efficiency is ``N * T / (W * wall)``.
Shards are indivisible, so ``ceil(N / W)`` (the tail) is usually the largest loss. T comes from the
issue's figure: 1.2M images in about 60 GPU-hours is 5.56 images/s per GPU, 360 s per 2,000-image
shard. ``--startup`` (model load on each GPU, default 30 s) is an assumption, not a measurement.

    python benchmarks/bench_coordination.py                 # local + moto S3, writes results/coordination-cpu.json
    python benchmarks/bench_coordination.py --repeats 5 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from synthgen.provenance import cpu_name, library_versions, write_json  # noqa: E402

IMAGES = 1_200_000  # ImageNet-SD
PER_SHARD = 2_000
GPU_HOURS = 60.0  # the issue's estimate for 1.2M images: 5.56 images/s per GPU, ~60% of an H100's FLOP limit
GPUS = (8, 64, 512)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stand_in_shard(plan) -> bytes:
    """A valid one-row parquet shard of the dataset's schema."""
    import pyarrow.parquet as pq
    from PIL import Image

    from synthgen.dataset.writer import ShardRow

    writer = plan.writer("bench")
    row = ShardRow(index=0, image=Image.new("RGB", (8, 8)), prompt="x", label=0, group=0, seed=0, retries=0, meta={})
    buffer = io.BytesIO()
    pq.write_table(writer.to_table([row]), buffer)
    return buffer.getvalue()


def measure(out: str, repeats: int, big_mb: int) -> dict:
    """Timings (seconds) of every coordination step on the store at ``out``."""
    from synthgen.dataset import plan_build
    from synthgen.dataset.folder import finalize, target_markers
    from synthgen.dataset.storage import LEASE_SETTLE_SECONDS
    from synthgen.recipe import load_recipe

    recipe = load_recipe("demo", [f"count={IMAGES}", f"output.images_per_shard={PER_SHARD}"])
    build = plan_build(recipe, out)
    store, writer = build.store, build.writer("bench")
    specs = build.targets
    data = stand_in_shard(build)
    digest = hashlib.sha256(data).hexdigest()
    store.write_text(".synthgen/plan.json", "{}")
    t0 = time.perf_counter()
    for spec in specs:
        store.write_bytes(spec.filename, data)
        marker = {"shard": spec.name, "file": spec.filename, "rows": len(spec), "start": spec.start,
                  "stop": spec.stop, "bytes": len(data), "sha256": digest, "retries": 0, "retried_images": 0,
                  "settings_hash": "bench", "model": {"model": recipe.generator.model, "device": "cuda:0"}}
        store.write_text(writer.marker_rel(spec), json.dumps(marker, indent=1))
    setup = time.perf_counter() - t0

    last = specs[-1]
    last_marker = store.read_bytes(writer.marker_rel(last))
    probe = specs[len(specs) // 2]

    def claim_cycle():
        claim = store.claim(probe.name)
        assert claim.acquire()
        claim.release()

    def finalize_check():  # after a shard: is any marker still missing? (one is)
        assert target_markers(build, writer) is None

    store.remove(writer.marker_rel(last))
    steps = {
        "claim": timed(claim_cycle, repeats),
        "done_check": timed(lambda: writer.finished(last), repeats),  # the claimer's check: no marker yet
        "temp_cleanup": timed(store.temp_files, repeats),
        "marker_write": timed(lambda: store.write_bytes(writer.marker_rel(last), last_marker), repeats),
    }
    store.remove(writer.marker_rel(last))
    steps["last_shard_check"] = timed(finalize_check, repeats)
    store.write_bytes(writer.marker_rel(last), last_marker)
    once = {"helper_scan": timed(lambda: writer.marked_many(specs), max(2, repeats // 4))}  # per rank, all shards

    def manifest():
        store.remove("synthgen_manifest.json")
        assert finalize(build, writer) is not None

    once["manifest_and_card"] = timed(manifest, max(2, repeats // 10))
    big = os.urandom(big_mb << 20)
    once[f"write_{big_mb}MB_shard"] = timed(lambda: store.write_bytes("data/big.bin", big), max(2, repeats // 10))
    once[f"sha256_{big_mb}MB_shard"] = timed(lambda: store.sha256("data/big.bin"), max(2, repeats // 10))
    store.remove("data/big.bin")
    per_shard = sum(steps.values())
    return {
        "store": type(store).__name__,
        "shards": len(specs),
        "setup_seconds_for_all_shards_and_markers": round(setup, 2),
        "per_shard_seconds": {k: round(v, 5) for k, v in steps.items()},
        "per_shard_total_seconds": round(per_shard, 5),
        "lease_settle_seconds": LEASE_SETTLE_SECONDS if type(store).__name__ == "ObjectStore" else 0.0,
        "once_seconds": {k: round(v, 4) for k, v in once.items()},
    }


def project(m: dict, shards: int, shard_seconds: float, startup: float) -> list[dict]:
    c = m["per_shard_total_seconds"]
    rows = []
    for gpus in GPUS:
        rounds = math.ceil(shards / gpus)
        scale = shards / m["shards"]  # both read every marker: linear in the shard count
        scan = m["once_seconds"]["helper_scan"] * scale  # once per rank, after its share
        manifest = m["once_seconds"]["manifest_and_card"] * scale
        wall = startup + rounds * (shard_seconds + c) + scan + manifest
        ideal = shards * shard_seconds / gpus
        rows.append({
            "gpus": gpus,
            "shards": shards,
            "rounds": rounds,
            "wall_hours": round(wall / 3600, 3),
            "efficiency": round(ideal / wall, 4),
            "loss_tail": round(1 - (shards / gpus) / rounds, 4),  # idle GPUs in the last round
            "loss_coordination": round((rounds * c + scan + manifest) / wall, 5),
            "loss_startup": round(startup / wall, 4),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--big-mb", type=int, default=40, help="size of a real ImageNet-SD shard (2,000 JPEGs at 256 px)")
    parser.add_argument("--startup", type=float, default=30.0, help="assumed model load per GPU, seconds")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "coordination-cpu.json")
    args = parser.parse_args()
    shard_seconds = GPU_HOURS * 3600 / IMAGES * PER_SHARD

    from moto_s3 import create_bucket, moto_server

    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        measured["local"] = measure(str(Path(tmp) / "ds"), args.repeats, args.big_mb)
    with moto_server() as env:
        os.environ.update(env)
        create_bucket(env, "bench")
        measured["s3"] = measure("s3://bench/ds", args.repeats, args.big_mb)

    shards = IMAGES // PER_SHARD
    projections = {
        name: {
            f"images_per_shard={PER_SHARD}": project(m, shards, shard_seconds, args.startup),
            # smaller shards shorten the tail at 512 GPUs (a LAYOUT setting: same images, other files)
            "images_per_shard=500": project(m, IMAGES // 500, shard_seconds * 500 / PER_SHARD, args.startup),
        }
        for name, m in measured.items()
    }
    print(f"{'store':>6} {'claim':>8} {'done?':>8} {'temp':>8} {'marker':>8} {'last?':>8} {'per shard':>10} "
          f"{'scan':>8} {'manifest':>9}   (ms; scan and manifest: s, over {shards} shards)")
    for name, m in measured.items():
        s = m["per_shard_seconds"]
        print(f"{name:>6} {s['claim']*1e3:8.2f} {s['done_check']*1e3:8.2f} {s['temp_cleanup']*1e3:8.2f} "
              f"{s['marker_write']*1e3:8.2f} {s['last_shard_check']*1e3:8.2f} {m['per_shard_total_seconds']*1e3:10.2f} "
              f"{m['once_seconds']['helper_scan']:8.2f} {m['once_seconds']['manifest_and_card']:9.2f}")
    print(f"\nprojection: {shard_seconds:.0f} s of GPU time per {PER_SHARD}-image shard, {args.startup:.0f} s startup (assumed)")
    for name, layouts in projections.items():
        for layout, rows in layouts.items():
            cells = ", ".join(f"{r['gpus']} GPUs {r['efficiency']:.1%}" for r in rows)
            print(f"{name:>6} {layout:>22}: {cells}")

    record = {
        "benchmark": "coordination",
        "device": {"cpu": cpu_name(), "storage": {"local": "a temporary folder on this machine's disk",
                                                  "s3": "moto server mode on localhost (one process, HTTP)"}},
        "versions": library_versions(("synthgen", "fsspec", "s3fs", "moto", "pyarrow", "datasets")),
        "settings": {"images": IMAGES, "images_per_shard": PER_SHARD, "shards": shards, "repeats": args.repeats,
                     "gpu_hours_for_all_images": GPU_HOURS, "gpu_seconds_per_shard": shard_seconds,
                     "startup_seconds_assumed": args.startup, "shard_files": "one-row stand-ins (coordination only)"},
        "measured": measured,
        "projection": projections,
        "model": "wall = startup + ceil(N/W) * (T + c) + scan + manifest; efficiency = N*T / (W*wall)",
    }
    path = write_json(args.out, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
