"""Trainer speed: training throughput (images/s) and the wall time of one CAS run.

1. Throughput of ResNet-20 (CIFAR; He et al.'s 0.27M net and the 64-filter one of Lomurno et al.'s
   code, the CAS default) and ViT-Tiny (img 32, patch 4): one training step = forward +
   backward + Adam step on a batch of 256 random uint8 32x32 images indexed from a device tensor and
   normalised on the device (as synthgen.train.classify does); median over timed iterations after
   warm-up. CPU always (fp32); CUDA when present (bf16 autocast, channels_last for ResNet-20).
2. One CAS run (synthgen.train.cas.cas_score, real baseline NOT cached, so two trainings: real
   baseline + synthetic). On CUDA: the default protocol (train/cas-lomurno.yaml: resnet20_w64, up to
   100 epochs with early stopping, batch 256, 40,000 fit + 10,000 real validation images; the
   synthetic set is the real training split itself). On CPU: a REDUCED protocol - 1 epoch, 4,500 fit
   + 500 real validation images for each run, tested on the 5,000 test images.

GPU goal: a full 100-epoch CAS on 50,000 32x32 images (one training run) in under 3 minutes on one
H100. Measured on one H100 (benchmarks/results/train-gpu-h100*.json, cas-baseline-*-cuda-h100*.json):
the step is bound by kernel launches in eager mode (0.27M and 4.3M ResNet-20 both ~10 ms per step);
--compile-modes reduce-overhead (CUDA graphs) nearly halves it.

Usage: python benchmarks/bench_train.py [--cifar ../shared/datasets/cifar10] [--no-cas] [--threads N]
       [--devices cpu,cuda] [--models resnet20,resnet20_w64,vit_tiny] [--compile-modes reduce-overhead]
Writes benchmarks/results/train-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synthgen.train.runtime import autocast_dtype  # noqa: E402
from synthgen.train.data import to_float  # noqa: E402
from synthgen.train.models import count_parameters, create_model  # noqa: E402
from synthgen.train.optim import build_optimizer  # noqa: E402
from synthgen.provenance import environment, write_json  # noqa: E402


def throughput(name: str, kwargs: dict, device: torch.device, batch: int, warmup: int, iters: int,
               compile: str | None = None) -> dict:
    torch.manual_seed(0)
    model = create_model(name, 10, image_size=32, **kwargs).to(device)
    channels_last = device.type == "cuda" and name.startswith("resnet")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp = autocast_dtype("auto", device)
    opt = build_optimizer(model.parameters(), "adam", lr=1e-3)  # the trainer's (fused on CUDA)
    step_model = torch.compile(model, mode=compile) if compile else model
    data = torch.randint(0, 256, (batch * 4, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch * 4,), device=device)
    mean = torch.tensor([0.49, 0.48, 0.45], device=device)
    std = torch.tensor([0.25, 0.24, 0.26], device=device)
    model.train()
    times = []
    for i in range(warmup + iters):
        idx = torch.randint(0, batch * 4, (batch,), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if compile in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()
        x = to_float(data[idx], mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = step_model(x)
        loss = F.cross_entropy(out.float(), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        else:
            loss.item()
        if i == 0:
            first_s = time.perf_counter() - t  # includes cuDNN autotuning / torch.compile
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {
        "model": name, "kwargs": kwargs, "params": count_parameters(model), "device": device.type,
        "batch": batch, "amp": str(amp).replace("torch.", "") if amp else "fp32", "channels_last": channels_last,
        "compile": compile, "first_step_s": first_s,
        "warmup_iters": warmup, "timed_iters": iters, "median_step_s": med, "images_per_s": batch / med,
    }


def cas_run(cifar: str, device: torch.device) -> dict:
    from synthgen.train.cas import cas_score, load_cas_protocol

    if device.type == "cuda":
        protocol, info = load_cas_protocol()
        label = (f"full default protocol ({protocol.name}): {protocol.model}, up to {protocol.epochs} epochs (early stopping "
                 f"{protocol.early_stopping.patience}), batch {protocol.batch_size}, 40,000 fit + 10,000 real validation images per run")
    else:
        protocol, info = load_cas_protocol(None, ["epochs=1", "real_fit=4500", "real_val=500", "limit_synthetic=4500"])
        label = f"REDUCED CPU protocol: {protocol.model}, 1 epoch, batch 256, 4,500 fit + 500 real validation images per run"
    # warm the decoded-tensor cache first, so the timing is training + evaluation only
    from synthgen.train.data import load_image_dataset

    load_image_dataset(cifar, "train", limit=protocol.real_fit + protocol.real_val)
    load_image_dataset(cifar, "test")
    load_image_dataset(cifar, "train", limit=protocol.limit_synthetic, image_size=32)
    t = time.perf_counter()
    res = cas_score(cifar, cifar, protocol, seed=0, protocol_info=info, device=device, use_cache=False, quiet=True)
    wall = time.perf_counter() - t
    runs = [("real baseline", res["real_baseline"]), ("synthetic (= real train)", res["runs"][0])]
    return {
        "what": label + "; tested on the 5,000 real test images; two trainings (baseline not cached)",
        "device": device.type,
        "protocol": res["protocol"],
        "wall_s_total": wall,
        "runs": [
            {"run": n, "wall_s": r["wall_s"], "train_wall_s": r["train_wall_s"], "epochs_run": r["epochs_run"],
             "n_train": r["n_train"], "top1": r["top1"], "top5": r["top5"]}
            for n, r in runs
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", default=str(ROOT.parent / "shared/datasets/cifar10"))
    ap.add_argument("--no-cas", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--devices", default=None, help="comma-separated (default: cpu, plus cuda when present)")
    ap.add_argument("--compile-modes", default="", help="also time these torch.compile modes on CUDA, "
                    "comma-separated (default, reduce-overhead, max-autotune)")
    ap.add_argument("--models", default="resnet20,resnet20_w64,vit_tiny")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.devices:
        devices = [torch.device(d) for d in args.devices.split(",")]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        warm, iters = (10, 50) if dev.type == "cuda" else (2, 5)
        modes = [None] + ([m for m in args.compile_modes.split(",") if m] if dev.type == "cuda" else [])
        for mode in modes:
            for name in args.models.split(","):
                kwargs = {"patch_size": 4} if name.startswith("vit") else {}
                rows.append(throughput(name, kwargs, dev, 256, warm, iters, mode))
                print(rows[-1], flush=True)
    cas = []
    if not args.no_cas and Path(args.cifar).is_dir():
        cas.append(cas_run(args.cifar, devices[-1]))

    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="Training throughput (fwd+bwd+Adam step, batch 256, 32x32)")
    for c in ("model", "device", "precision", "compile", "params", "first step (s)", "median step (s)", "images/s"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["model"] + (" p4" if r["kwargs"] else ""), r["device"], r["amp"], r["compile"] or "no",
                  f"{r['params']:,}", f"{r['first_step_s']:.2f}", f"{r['median_step_s']:.4f}", f"{r['images_per_s']:,.0f}")
    console.print(t)
    for c in cas:
        console.print(f"CAS ({c['device']}): {c['what']}: total {c['wall_s_total']:.1f}s")
        for r in c["runs"]:
            console.print(f"  {r['run']}: {r['wall_s']:.1f}s ({r['epochs_run']} epochs, {r['n_train']} fit images), top-1 {r['top1']:.2f}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = args.output or ROOT / "benchmarks" / "results" / f"train-{devices[-1].type}.json"
    env = {k: v for k, v in environment(devices[-1]).items() if k != "host"}
    write_json(out, {
        "benchmark": "bench_train", "environment": env, "load_average": load,
        "gpu_goal": "full 100-epoch CAS on 50,000 32x32 images in < 180 s on one H100",
        "throughput": rows, "cas": cas,
    })
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
