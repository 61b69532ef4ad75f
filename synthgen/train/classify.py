"""Supervised image classification on :class:`~synthgen.train.data.ImageTensorDataset` s.

One loop for CAS and fine-tuning: Adam/AdamW/SGD, optional label smoothing, ReduceLROnPlateau and
early stopping on a VALIDATION split (the test split is never seen here; pass it to
:func:`evaluate_classifier` afterwards), best-validation weights restored at the end.

Speed: batches are indexed straight from the uint8 image tensor, which is moved to the GPU once
when it fits (else pinned host memory, copied per batch), and normalised on the device; on CUDA
the step runs under bf16 autocast (fp16 + GradScaler where bf16 is missing) with channels_last
for convolutional models, cuDNN autotuning and fused Adam. No DataLoader, no per-epoch decoding.
``compile="reduce-overhead"`` (CAS's "auto" on CUDA) replays each full training batch from CUDA
graphs: on an H100 a ResNet-20 step is bound by kernel launches, not arithmetic (the 0.27M and the
4.3M network both take ~10 ms eagerly), and the graphs halve it (benchmarks/device/NOTES.md).

Determinism: the shuffling and augmentation draw from generators seeded with ``config.seed``; on
CPU two runs with the same seed and the same initial weights give bit-identical results.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthgen.errors import SynthgenError
from synthgen.train.optim import build_optimizer, optimizer_step
from synthgen.train.data import ImageTensorDataset, channel_stats, to_float

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train_classifier",
    "evaluate_classifier",
    "resolve_device",
    "autocast_dtype",
    "compile_mode",
]


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw
    label_smoothing: float = 0.0
    monitor: str = "val_loss"  # val_loss | val_acc: drives the plateau schedule, early stopping and best weights
    plateau_patience: int | None = 10  # None: no ReduceLROnPlateau
    plateau_factor: float = 0.1
    min_lr: float = 0.0
    early_stopping_patience: int | None = 25  # None: run all epochs (best weights still restored)
    augment: bool = False  # random crop (4 px zero padding) + horizontal flip, on the device
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU) | bf16 | fp16 | off
    channels_last: bool | None = None  # None: on CUDA for convolutional models
    # torch.compile: False/"off"; True/"default"; "reduce-overhead" (CUDA graphs: for small nets whose
    # step is bound by kernel launches, as ResNet-20 on an H100 is); "max-autotune"; "auto":
    # reduce-overhead on CUDA, off elsewhere (a CPU compile costs more than it saves here)
    compile: bool | str = False
    eval_batch_size: int = 1024
    mean: tuple[float, ...] | None = None  # None: per-channel statistics of the training images
    std: tuple[float, ...] | None = None
    seed: int = 0
    max_gpu_fraction: float = 0.5  # put the whole uint8 tensor on the GPU when it takes at most this share of free memory

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    best_epoch: int = 0
    best_metric: float | None = None
    stopped_early: bool = False
    wall_s: float = 0.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    device: str = "cpu"

    def summary(self) -> dict:
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "stopped_early": self.stopped_early,
            "train_wall_s": round(self.wall_s, 3),
        }


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SynthgenError("device 'cuda' asked for but CUDA is not available")
    return dev


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise SynthgenError(f"amp must be auto, bf16, fp16 or off; got {amp!r}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: bool | str | None, device: torch.device | None = None) -> str | None:
    """``TrainConfig.compile`` as a ``torch.compile`` mode on ``device``, or None for none."""
    if value is None or value is False or value == "off":
        return None
    if value == "auto":
        return "reduce-overhead" if device is not None and device.type == "cuda" else None
    if value is True:
        return "default"
    if value in COMPILE_MODES:
        return str(value)
    raise SynthgenError(f"compile must be auto, off, {', '.join(COMPILE_MODES)}; got {value!r}")


def _use_channels_last(flag: bool | None, model: nn.Module, device: torch.device) -> bool:
    if flag is not None:
        return flag
    if device.type != "cuda":
        return False
    return any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())


class _Batches:
    """The images/labels of one split, on the device when they fit; yields normalised batches."""

    def __init__(self, ds: ImageTensorDataset, device: torch.device, mean, std, max_gpu_fraction: float, label_map=None):
        self.n = len(ds)
        self.device = device
        images = ds.images
        on_device = device.type != "cuda"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            on_device = images.numel() <= max_gpu_fraction * free
        if on_device:
            self.images = images.to(device)
        else:
            self.images = images.contiguous().pin_memory()
        self.on_device = on_device
        labels = ds.labels
        if labels is None:
            raise SynthgenError(f"{ds.describe()} has no labels")
        if label_map is not None:
            labels = torch.as_tensor(label_map, dtype=torch.long)[labels]
        self.labels = labels.to(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device)

    def get(self, idx: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``idx`` (row indices, on the CPU or already on the device)."""
        idx_d = idx.to(self.device, non_blocking=True)
        if self.on_device:
            x = self.images[idx_d]
        else:
            x = self.images[idx.cpu()].pin_memory().to(self.device, non_blocking=True)
        x = to_float(x, self.mean, self.std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx_d]


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding plus horizontal flip, batched on x's device."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dev = x.device
    flip, oy, ox = flip.to(dev), oy.to(dev), ox.to(dev)
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (oy.view(b, 1) + torch.arange(h, device=dev).view(1, h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (ox.view(b, 1) + torch.arange(w, device=dev).view(1, w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return xp.gather(3, cols)


@torch.inference_mode()
def _evaluate_batches(model, data: _Batches, batch_size: int, amp_dtype, channels_last: bool, num_classes: int | None) -> dict:
    model.eval()
    dev = data.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    c1 = torch.zeros((), dtype=torch.long, device=dev)
    c5 = torch.zeros((), dtype=torch.long, device=dev)
    for start in range(0, data.n, batch_size):
        idx = torch.arange(start, min(start + batch_size, data.n))
        x, y = data.get(idx, channels_last)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y.view(-1, 1)
        c1 += hit[:, 0].sum()
        c5 += hit.any(dim=1).sum()
    n = max(1, data.n)
    return {"loss": float(loss_sum) / n, "top1": float(c1) / n, "top5": float(c5) / n, "n": data.n}


def evaluate_classifier(
    model: nn.Module,
    ds: ImageTensorDataset,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    label_map=None,
    amp: str = "auto",
    channels_last: bool | None = None,
) -> dict:
    """Top-1/top-5 accuracy (fractions) and mean cross-entropy of ``model`` on ``ds``."""
    dev = resolve_device(device)
    model.to(dev)
    cl = _use_channels_last(channels_last, model, dev)
    if cl:
        model.to(memory_format=torch.channels_last)
    data = _Batches(ds, dev, mean, std, 0.5, label_map)
    return _evaluate_batches(model, data, batch_size, autocast_dtype(amp, dev), cl, None)


def train_classifier(
    model: nn.Module,
    train: ImageTensorDataset,
    val: ImageTensorDataset | None = None,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device | None = None,
    label_map=None,
    quiet: bool = False,
    console=None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on ``train``; validation (``val``) drives the LR plateau schedule, early
    stopping and the restored best weights. ``label_map[i]`` maps the datasets' label id ``i`` to
    the model's class id (both splits)."""
    cfg = config or TrainConfig()
    if len(train) == 0:
        raise SynthgenError("the training split is empty")
    if cfg.monitor not in ("val_loss", "val_acc"):
        raise SynthgenError(f"monitor must be val_loss or val_acc, got {cfg.monitor!r}")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    t0 = time.perf_counter()
    mean, std = (cfg.mean, cfg.std) if cfg.mean is not None and cfg.std is not None else channel_stats(train.images)
    model.to(dev)
    cl = _use_channels_last(cfg.channels_last, model, dev)
    if cl:
        model.to(memory_format=torch.channels_last)
    mode = compile_mode(cfg.compile, dev)
    step_model = torch.compile(model, mode=mode) if mode else model
    graphs = mode in ("reduce-overhead", "max-autotune") and dev.type == "cuda"
    amp_dtype = autocast_dtype(cfg.amp, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    tr = _Batches(train, dev, mean, std, cfg.max_gpu_fraction, label_map)
    va = _Batches(val, dev, mean, std, cfg.max_gpu_fraction, label_map) if val is not None and len(val) else None
    opt = build_optimizer(
        [p for p in model.parameters() if p.requires_grad], cfg.optimizer, lr=cfg.lr, betas=cfg.betas,
        weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
    )
    direction = "min" if cfg.monitor == "val_loss" else "max"
    sched = None
    if va is not None and cfg.plateau_patience is not None:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=direction, factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
        )
    gen = torch.Generator().manual_seed(int(cfg.seed))
    aug_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    result = TrainResult(model=model, mean=tuple(mean), std=tuple(std), device=str(dev))
    best_state: dict[str, torch.Tensor] | None = None
    best = math.inf if direction == "min" else -math.inf
    since_best = 0
    bs = cfg.batch_size
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        step_model.train()
        perm = torch.randperm(tr.n, generator=gen)  # drawn on the CPU: same order on every device
        if tr.on_device:
            perm = perm.to(dev)  # one copy per epoch instead of one per step
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        seen = 0
        for start in range(0, tr.n, bs):
            idx = perm[start : start + bs]
            if len(idx) < 2 and seen:  # a batch of one breaks BatchNorm; drop it
                continue
            x, y = tr.get(idx, cl)
            if cfg.augment:
                x = _augment(x, aug_gen)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
            # A compiled graph exists per batch shape: the one short batch of an epoch runs eagerly
            # (same parameters) instead of paying a second compile.
            fwd = step_model if len(idx) == bs else model
            if graphs and fwd is step_model:
                torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are consumed
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = fwd(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            optimizer_step(loss, opt, scaler, model.parameters())
            loss_sum += loss.detach().double() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(idx)
        row: dict[str, Any] = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": float(loss_sum) / max(1, seen),
            "train_acc": float(correct) / max(1, seen),
        }
        if not math.isfinite(row["train_loss"]):
            raise SynthgenError(f"training diverged at epoch {epoch} (loss {row['train_loss']}); lower the learning rate")
        improved = False
        if va is not None:
            # eagerly: a few batches per epoch, not worth compiled graphs for eval mode and its shapes
            ev = _evaluate_batches(model, va, cfg.eval_batch_size, amp_dtype, cl, None)
            row["val_loss"], row["val_acc"] = ev["loss"], ev["top1"]
            value = row[cfg.monitor]
            improved = value < best if direction == "min" else value > best
            if sched is not None:
                sched.step(value)
        else:
            improved = True
        if improved:
            best = row.get(cfg.monitor, float("nan"))
            result.best_epoch = epoch
            since_best = 0
            if va is not None:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        row["epoch_s"] = time.perf_counter() - te
        result.history.append(row)
        result.epochs_run = epoch
        if not quiet:
            val_txt = f" val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}" if va is not None else ""
            mark = " *" if improved and va is not None else ""
            console.print(
                f"[dim]{desc}[/dim] epoch {epoch}/{cfg.epochs} loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                f"{val_txt} lr {row['lr']:.2e} {row['epoch_s']:.1f}s{mark}",
                highlight=False,
            )
        if va is not None and cfg.early_stopping_patience is not None and since_best >= cfg.early_stopping_patience:
            result.stopped_early = True
            if not quiet:
                console.print(f"[dim]{desc}[/dim] early stop: no {cfg.monitor} improvement in {since_best} epochs", highlight=False)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.best_metric = None if va is None else float(best)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    result.wall_s = time.perf_counter() - t0
    return result


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
