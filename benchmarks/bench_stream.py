"""Data larger than memory: streamed parquet shards vs the in-memory tensor, at N and 4N images.

Writes a folder of parquet shards (data/train-*.parquet) of N and of 4N CIFAR-10 training images (the real JPEG cells of
../shared/datasets/cifar10 repeated, 5,000 rows a shard; no re-encoding), then measures, each case
in a fresh subprocess so that its peak RSS is its own:

* ``stream``: one epoch of :class:`synthgen.train.stream.StreamBatches` (DataLoader workers decode
  the JPEGs), images/s and the peak RSS of the main process and of its largest worker;
* ``memory``: ``load_image_dataset`` decoding the split into one uint8 tensor (no cache) plus one
  epoch of :class:`synthgen.train.batches.TensorBatches`, images/s of the epoch and peak RSS;
* ``train-resnet20`` / ``train-vit_small``: training steps (fwd + bwd + Adam) fed by each loader -
  ResNet-20 at 32 px (batch 256) and ViT-S/16 at 224 px (batch 32, images resized in the workers) -
  images/s of training next to the loader's own rate: the loader must not be the bottleneck.

Usage: python benchmarks/bench_stream.py [--n 50000] [--device cpu|cuda] [--workers 2] [--output F]
       (GPU: run through benchmarks/device/run_all.sh, stage stream). Writes benchmarks/results/stream-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def make_folder(cifar: Path, out: Path, n: int, rows_per_shard: int = 5000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (out / "data").is_dir():
        return out
    table = pa.concat_tables([pq.read_table(f) for f in sorted((cifar / "data").glob("train-*.parquet"))])
    reps = -(-n // table.num_rows)
    big = pa.concat_tables([table] * reps).slice(0, n)
    shards = -(-n // rows_per_shard)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        pq.write_table(big.slice(i * rows_per_shard, rows_per_shard), out / "data" / f"train-{i:05d}-of-{shards:05d}.parquet")
    return out  # the split comes from the file names (data/train-*.parquet), as datasets reads them


def live_children_peak_mb() -> float:
    """The largest peak RSS (VmHWM) among this process's live children (the DataLoader workers)."""
    import glob

    peak = 0.0
    for tasks in glob.glob("/proc/self/task/*/children"):
        try:
            pids = open(tasks).read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except OSError:
                pass
    return peak


def peak_rss_mb(workers_mb: float) -> dict:
    # (getrusage(RUSAGE_CHILDREN) would also count a ~430 MB helper process that importing torch
    # forks here, so the workers are read from /proc while they live)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"main_mb": round(own, 1), "largest_worker_mb": round(workers_mb, 1)}


def run_case(case: str, folder: str, device: str, workers: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from synthgen.train.batches import TensorBatches
    from synthgen.train.data import load_image_dataset, to_float
    from synthgen.train.models import create_model
    from synthgen.train.optim import build_optimizer
    from synthgen.train.runtime import Runtime
    from synthgen.train.stream import StreamBatches

    rt = Runtime.create(device)
    kind, _, model_name = case.partition(":")
    size = 224 if model_name == "vit_small" else 32
    batch = 32 if model_name == "vit_small" else 256
    t = time.perf_counter()
    if kind == "stream":
        data = StreamBatches(folder, "train", rt, num_workers=workers, image_size=None if size == 32 else size,
                             decode="auto")
        load_s = time.perf_counter() - t
    else:
        ds = load_image_dataset(folder, "train", cache=False, image_size=None if size == 32 else size,
                                limit=None if size == 32 else 4000)
        load_s = time.perf_counter() - t
        data = TensorBatches(ds, rt)
    out = {"case": case, "device": rt.device.type, "images": len(data), "setup_s": round(load_s, 2)}
    workers_mb = 0.0
    if not model_name:  # the loader alone: one epoch
        t, n = time.perf_counter(), 0
        for i, (x, _) in enumerate(data.epoch(batch, 0 if kind == "stream" else torch.Generator().manual_seed(0))):
            n += len(x)
            if i % 10 == 0:
                workers_mb = max(workers_mb, live_children_peak_mb())
        rt.synchronize()
        out.update({"epoch_images": n, "epoch_s": round(time.perf_counter() - t, 2), "images_per_s": round(n / (time.perf_counter() - t), 1)})
    else:
        torch.manual_seed(0)
        model = create_model(model_name, 10, image_size=size, **({"patch_size": 16} if model_name == "vit_small" else {}))
        net = rt.prepare(model)
        opt = build_optimizer(model.parameters(), "adam", lr=1e-3)
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        steps = min(steps, len(data) // batch - 1)  # one epoch at most
        it = data.epoch(batch, 0 if kind == "stream" else torch.Generator().manual_seed(0), drop_last=True)
        wait = 0.0
        done = 0
        t0 = None
        for i in range(steps + 1):
            tw = time.perf_counter()
            x, y = next(it)
            if i:
                wait += time.perf_counter() - tw
            if i == 1:
                rt.synchronize()
                t0 = time.perf_counter()  # the first step (warm-up, workers starting) is not timed
            with rt.autocast():
                loss = F.cross_entropy(net(to_float(x, mean, std)).float(), y)
            rt.step(loss, opt)
            if i:
                done += len(y)
            workers_mb = max(workers_mb, live_children_peak_mb())
        rt.synchronize()
        wall = time.perf_counter() - t0
        out.update({"model": model_name, "image_size": size, "batch": batch, "timed_steps": steps,
                    "train_images_per_s": round(done / wall, 1), "waiting_for_data_share": round(wait / wall, 3)})
    out["peak_rss"] = peak_rss_mb(workers_mb)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", default=str(ROOT.parent / "shared/datasets/cifar10"))
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--work", default="/tmp/synthgen-bench-stream")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    if args.case:  # a child process: one case
        print(json.dumps(run_case(args.case, args.folder, args.device, args.workers, args.steps or 10)))
        return

    from synthgen.provenance import environment, write_json

    work = Path(args.work)
    folders = {n: make_folder(Path(args.cifar), work / f"n{n}", n) for n in (args.n, 4 * args.n)}
    gpu = args.device.startswith("cuda")
    cases = []
    for n, folder in folders.items():
        cases += [("stream", folder, None), ("memory", folder, None)]
    small = folders[args.n]
    cases += [("stream:resnet20", small, 40 if gpu else 15), ("memory:resnet20", small, 40 if gpu else 15),
              ("stream:vit_small", small, 20 if gpu else 3), ("memory:vit_small", small, 20 if gpu else 3)]
    rows = []
    for case, folder, steps in cases:
        cmd = [sys.executable, __file__, "--case", case, "--folder", str(folder), "--device", args.device,
               "--workers", str(args.workers)] + (["--steps", str(steps)] if steps else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"case {case} failed")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(row, flush=True)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Streamed vs in-memory ({args.device}, {args.workers} workers)")
    for c in ("case", "images", "images/s (loader)", "train images/s", "waiting for data", "peak RSS main MB", "largest worker MB"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["case"], f"{r['images']:,}", str(r.get("images_per_s", "")), str(r.get("train_images_per_s", "")),
                  str(r.get("waiting_for_data_share", "")), str(r["peak_rss"]["main_mb"]), str(r["peak_rss"]["largest_worker_mb"]))
    Console().print(t)
    out = args.output or ROOT / "benchmarks" / "results" / f"stream-{args.device.split(':')[0]}.json"
    write_json(out, {"benchmark": "bench_stream", "environment": {k: v for k, v in environment(args.device).items() if k != "host"},
                     "load_average_after": os.getloadavg(), "n": args.n, "workers": args.workers, "rows_per_shard": 5000,
                     "what": "CIFAR-10 train JPEG cells repeated to N and 4N rows; each case a fresh process",
                     "cases": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
