"""Supervised image classification: the CAS classifier's and fine-tuning's training loop.

:func:`train_classifier` trains on a training split, computes validation metrics each epoch and
hands every epoch's row (``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``lr``) to its
callbacks (:mod:`synthgen.train.callbacks`: the plateau schedule, early stopping with the best
weights restored, Optuna pruning ...), any of which may stop the run. The test split is never seen
here: score it with :func:`evaluate_classifier` afterwards.

Device, precision, compile mode and DDP come from the :class:`~synthgen.train.runtime.Runtime`;
batches from :class:`~synthgen.train.batches.TensorBatches` (the split on the GPU when it fits) or
:class:`~synthgen.train.stream.StreamBatches` (parquet shards streamed by DataLoader workers).

Determinism: shuffling and augmentation draw from CPU generators seeded with ``config.seed``; on a
CPU two runs with the same seed and initial weights are bit-identical.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from synthgen.errors import SynthgenError
from synthgen.train.augment import random_crop_flip
from synthgen.train.batches import TensorBatches, resolve_normalization
from synthgen.train.callbacks import Callback, run_epoch_callbacks
from synthgen.train.data import to_float
from synthgen.train.optim import build_optimizer, make_scheduler
from synthgen.train.runtime import Runtime

__all__ = ["TrainConfig", "TrainResult", "train_classifier", "evaluate_classifier", "classification_metrics"]


class TrainConfig(BaseModel):
    """How a classifier is trained (CAS protocols extend this with their data and schedule sections)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=2)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)  # sgd only
    nesterov: bool = False  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw
    adam_eps: float = Field(1e-8, gt=0)  # adam / adamw: torch's eps (Keras' 1e-7 sits elsewhere: see build_optimizer)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # per step, sized to the steps run
    warmup_steps: int = Field(0, ge=0)
    max_steps: Optional[int] = Field(None, ge=1)  # cap on optimizer steps (quick runs)
    grad_clip: Optional[float] = Field(None, gt=0)
    augment: Literal["none", "crop_flip"] = "none"  # crop_flip: pad-4 random crop + horizontal flip
    # per-channel (mean, std): unit = x/255 only (Keras' Rescaling), dataset = the training images' own
    normalization: Literal["dataset", "unit", "cifar", "imagenet", "half"] = "dataset"
    eval_batch_size: int = Field(1024, ge=1)
    max_gpu_fraction: float = Field(0.5, gt=0, le=1)  # hold the uint8 split on the GPU up to this share of free memory


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    steps: int = 0
    stopped_early: bool = False
    wall_s: float = 0.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    device: str = "cpu"

    def summary(self) -> dict:
        return {"epochs_run": self.epochs_run, "stopped_early": self.stopped_early, "train_wall_s": round(self.wall_s, 3)}


@torch.inference_mode()
def classification_metrics(model: nn.Module, batches, runtime: Runtime, mean, std, batch_size: int, channels_last: bool = False) -> dict:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy over ``batches`` (in order), and per
    model class id its top-1 hits and rows (``class_hits``, ``class_rows``: lists of ints)."""
    model.eval()
    dev = runtime.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    hits = torch.zeros(2, dtype=torch.long, device=dev)
    per_class = None  # [classes, 2]: top-1 hits and rows of each class, summed on the device
    for x, y in batches.epoch(batch_size, None, min_batch=1):
        x = to_float(x, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.view(-1, 1)
        hits += torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])
        if per_class is None:
            per_class = torch.zeros(logits.shape[1], 2, dtype=torch.long, device=dev)
        # index_add_, not bincount: bincount sizes its output from the labels' maximum (a host sync)
        per_class.index_add_(0, y, torch.stack([top[:, 0].long(), torch.ones_like(y)], 1))
    # Two reductions in all. A process given no rows has seen no logits, so the number of classes
    # comes with the loss: the classes each scoring process saw, summed, over the number of them.
    width = 0 if per_class is None else per_class.shape[0]
    head = runtime.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(width), loss_sum.new_tensor(float(width > 0))]))
    loss, widths, scorers = head.tolist()
    classes = round(widths / scorers) if scorers else 0
    if per_class is None:
        per_class = torch.zeros(classes, 2, dtype=torch.long, device=dev)
    counts = runtime.all_reduce_sum(torch.cat([hits, per_class.flatten()])).tolist()
    class_hits, class_rows = counts[2::2], counts[3::2]
    n = sum(class_rows)
    return {"loss": loss / max(1, n), "top1": counts[0] / max(1, n), "top5": counts[1] / max(1, n), "n": n,
            "class_hits": class_hits, "class_rows": class_rows}


def evaluate_classifier(model: nn.Module, ds, *, mean: Sequence[float], std: Sequence[float], runtime: Runtime | None = None,
                        batch_size: int = 1024, label_map=None) -> dict:
    """Top-1/top-5 accuracy and loss of ``model`` on ``ds`` (an ImageTensorDataset or batches)."""
    rt = runtime or Runtime.create("auto")
    model.to(rt.device)
    cl = rt.uses_channels_last(model)
    if cl:
        model.to(memory_format=torch.channels_last)
    batches = ds if hasattr(ds, "epoch") else TensorBatches(ds, rt, label_map)
    return classification_metrics(model, batches, rt, mean, std, batch_size, cl)


def train_classifier(
    model: nn.Module,
    train,
    val=None,
    config: TrainConfig | None = None,
    *,
    runtime: Runtime | None = None,
    callbacks: Sequence[Callback] = (),
    seed: int = 0,
    label_map=None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    quiet: bool = False,
    console=None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on ``train`` (an ImageTensorDataset or StreamBatches); ``val`` (same kinds)
    feeds the per-epoch ``val_*`` metrics the callbacks watch. ``label_map[i]`` maps label id ``i``
    of both splits to the model's class id; ``mean``/``std`` override the config's normalisation.
    A stream shuffles by its own seed and the epoch number; ``seed`` draws the tensor path's order."""
    cfg = config or TrainConfig()
    rt = runtime or Runtime.create("auto")
    if len(train) == 0:
        raise SynthgenError("the training split is empty")
    if cfg.batch_size % rt.world_size:
        raise SynthgenError(f"batch_size {cfg.batch_size} does not split evenly over {rt.world_size} processes")
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    t0 = time.perf_counter()
    tr = train if hasattr(train, "epoch") else TensorBatches(train, rt, label_map, cfg.max_gpu_fraction)
    va = None if val is None or len(val) == 0 else (val if hasattr(val, "epoch") else TensorBatches(val, rt, label_map, cfg.max_gpu_fraction))
    if mean is None or std is None:
        if cfg.normalization == "dataset" and not hasattr(train, "images"):
            mean, std = train.channel_stats()  # a stream: the statistics of its first images
        else:
            mean, std = resolve_normalization(cfg.normalization, getattr(train, "images", None))
    net = rt.prepare(model, batch_size=cfg.batch_size // rt.world_size)
    rt.reset_scaler()
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, lr=cfg.lr, betas=cfg.betas,
                          weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov, eps=cfg.adam_eps)
    for cb in callbacks:  # callbacks built before the optimizer existed get it now
        if getattr(cb, "optimizer", False) is None:
            cb.optimizer = opt
    # The steps the run takes, so that a schedule ends where the run does: a stream under DDP gives
    # every process the fewest full batches any has (this depends on the epoch: its epochs are
    # numbered, 0, 1, ..., so the plan holds), not len / batch_size.
    streamed = not isinstance(tr, TensorBatches)
    per_epoch = tr.batches_per_epoch(cfg.batch_size, cfg.epochs, drop_last=False)
    if per_epoch == 0:
        over = f" over {rt.world_size} processes" if rt.distributed else ""
        raise SynthgenError(f"{len(tr)} training images make no training batch of {cfg.batch_size}{over}; "
                            "lower batch_size or add images")
    total = cfg.epochs * per_epoch
    total = min(total, cfg.max_steps or total)
    sched = make_scheduler(opt, total, cfg.warmup_steps, cfg.lr_schedule) if cfg.lr_schedule != "constant" or cfg.warmup_steps else None
    step = 0
    gen, aug_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    result = TrainResult(model=model, mean=tuple(mean), std=tuple(std), device=str(rt.device))
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        model.train()
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
        correct = torch.zeros((), device=rt.device, dtype=torch.long)
        seen = 0
        batches = tr.epoch(cfg.batch_size, epoch - 1, batches=per_epoch) if streamed else tr.epoch(cfg.batch_size, gen)
        for x, y in batches:
            if step >= total:
                break
            x = to_float(x, mean, std)
            if cfg.augment == "crop_flip":
                x = random_crop_flip(x, padding=4, generator=aug_gen, fill="zeros")
            with rt.autocast():
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            rt.step(loss, opt, grad_clip=cfg.grad_clip)
            step += 1
            if sched is not None:
                sched.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        seen_all = int(rt.all_reduce_sum(torch.tensor(seen, device=rt.device)))
        row: dict[str, Any] = {"epoch": epoch, "lr": lr,
                               "train_loss": float(rt.all_reduce_sum(loss_sum)) / max(1, seen_all),
                               "train_acc": float(rt.all_reduce_sum(correct)) / max(1, seen_all)}
        if not math.isfinite(row["train_loss"]):
            raise SynthgenError(f"training diverged at epoch {epoch} (loss {row['train_loss']}); lower the learning rate")
        if va is not None:
            ev = classification_metrics(model, va, rt, mean, std, cfg.eval_batch_size, net.channels_last)
            row["val_loss"], row["val_acc"], row["val_top5"] = ev["loss"], ev["top1"], ev["top5"]
        row["epoch_s"] = time.perf_counter() - te
        stop = run_epoch_callbacks(callbacks, epoch, row)
        result.history.append(row)
        result.epochs_run = epoch
        if not quiet and rt.is_main:
            val_txt = f" val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}" if va is not None else ""
            console.print(f"[dim]{desc}[/dim] epoch {epoch}/{cfg.epochs} loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                          f"{val_txt} lr {lr:.2e} {row['epoch_s']:.1f}s", highlight=False, soft_wrap=True)
        if stop or step >= total:
            result.stopped_early = stop and epoch < cfg.epochs
            break
    for cb in callbacks:
        cb.on_train_end()
    result.steps = step
    rt.synchronize()
    result.wall_s = time.perf_counter() - t0
    return result
