"""Self-supervised pre-training: rotation prediction, SimCLR, StableRep.

``pretrain(config, out_dir)`` trains ``config.model`` (a feature extractor from
:func:`synthgen.train.models.create_model` with ``num_classes=0``) plus an objective head:

* ``rotation`` — a linear 4-way classifier on the pooled features; every batch of ``batch_size``
  images becomes ``4 * batch_size`` rotated copies (:func:`~synthgen.train.losses.rotate_batch`).
* ``simclr`` — two :class:`~synthgen.train.augment.ContrastiveAugment` views per image, an MLP
  projection, :func:`~synthgen.train.losses.nt_xent_loss`.
* ``stablerep`` — batches of ``groups_per_batch`` captions x ``images_per_group`` images from
  :class:`~synthgen.train.samplers.GroupBatchSampler`, one augmented view per image, an MLP
  projection, :func:`~synthgen.train.losses.multi_positive_contrastive_loss`.

Images are decoded once (:func:`~synthgen.train.data.load_image_dataset`) into a uint8 tensor and
batches are cut from it and augmented on the device. On CUDA: bf16 autocast (fp16 + GradScaler where
bf16 is unsupported) and channels_last.

The output folder holds ``checkpoint.pt`` (backbone and head state dicts, optimizer, scheduler,
step, resolved config, normalisation), ``config.yaml`` (the resolved config) and ``metrics.json``
(loss history). Running the same config into the same folder resumes from the checkpoint (written
every ``checkpoint_every`` epochs, at the end, and on Ctrl-C); a finished run is not repeated.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from synthgen.errors import SynthgenError
from synthgen.provenance import library_versions
from synthgen.train.optim import build_optimizer, optimizer_step
from synthgen.train.augment import ContrastiveAugment, normalize, random_crop_flip, to_unit_float
from synthgen.train.config import (
    PretrainConfig,
    RotationObjective,
    SimCLRObjective,
    StableRepObjective,
    config_hash,
    resolve_source,
)
from synthgen.train.losses import multi_positive_contrastive_loss, nt_xent_loss, rotate_batch, rotation_loss
from synthgen.train.samplers import GroupBatchSampler

__all__ = [
    "PretrainResult",
    "pretrain",
    "build_head",
    "resolve_device",
    "resolve_normalization",
    "autocast_context",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = 1
# Settings that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"log_every", "checkpoint_every", "device"}


@dataclass
class PretrainResult:
    out_dir: Path
    checkpoint: Path
    metrics: dict[str, Any]
    resumed_from_step: int | None = None


# --------------------------------------------------------------------------------------------------
# helpers shared with evaluate.py
# --------------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SynthgenError(f"unknown device {name!r} (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SynthgenError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_normalization(kind: str, images: torch.Tensor | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from synthgen.train.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, channel_stats

    if kind == "imagenet":
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    if kind == "cifar":
        return tuple(CIFAR_MEAN), tuple(CIFAR_STD)
    if kind == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if kind == "dataset":
        if images is None:
            raise SynthgenError("normalization 'dataset' needs the training images")
        return channel_stats(images)
    raise SynthgenError(f"unknown normalization {kind!r}")


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); a no-op elsewhere."""
    import contextlib

    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> nn.Module:
    if layers == 1:
        return nn.Linear(d_in, d_out)
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


def build_head(objective, num_features: int) -> nn.Module:
    """The objective's head on top of the pooled backbone features."""
    if isinstance(objective, RotationObjective):
        return nn.Linear(num_features, 4)
    hidden = objective.projection_hidden or num_features
    return _mlp(num_features, hidden, objective.projection_dim, objective.projection_layers)


class _Trainee(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from synthgen.train.models import extract_features

        return self.head(extract_features(self.backbone, x))


def _lr_lambda(total_steps: int, warmup: int, kind: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def make_optimizer(spec, params) -> torch.optim.Optimizer:
    """The optimizer an :class:`OptimizerSpec` describes (SGD uses Nesterov momentum when any)."""
    return build_optimizer(
        params, spec.name, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay,
        momentum=spec.momentum, nesterov=spec.momentum > 0,
    )


def make_scheduler(optimizer, total_steps: int, warmup: int, kind: str):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup, kind))


def progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _resume_key(config: PretrainConfig) -> str:
    data = config.model_dump(mode="json")
    for key in _RESUMABLE_CHANGES:
        data.pop(key, None)
    data["schedule"].pop("max_steps", None)
    return json.dumps(data, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------------
def load_pretrain_dataset(config: PretrainConfig):
    from synthgen.train.data import load_image_dataset

    spec = config.dataset
    group_column = spec.group_column
    if isinstance(config.objective, StableRepObjective) and group_column is None:
        group_column = "group"
    return load_image_dataset(
        resolve_source(spec.source),
        spec.split,
        revision=spec.revision,
        image_column=spec.image_column,
        label_column=spec.label_column,
        group_column=group_column,
        image_size=spec.image_size or config.model.image_size,
        limit=spec.limit,
    )


def pretrain(
    config: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    dataset=None,
) -> PretrainResult:
    """Train ``config`` into ``out_dir`` (created); see the module docstring. ``dataset`` (an
    :class:`~synthgen.train.data.ImageTensorDataset`) skips loading ``config.dataset``."""
    from synthgen.train.models import create_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    device = resolve_device(config.device)
    obj = config.objective
    torch.manual_seed(config.seed)

    state = None
    if ckpt_path.exists():
        if not resume:
            raise SynthgenError(f"{out} already holds a checkpoint; use another --out, or resume")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state.get("resume_key") != _resume_key(config):
            raise SynthgenError(
                f"{ckpt_path} was trained with a different config; use another --out (or the same settings to resume)"
            )

    ds = dataset if dataset is not None else load_pretrain_dataset(config)
    if len(ds) == 0:
        raise SynthgenError("the pre-training dataset is empty")
    if ds.images.shape[-1] != ds.images.shape[-2] and isinstance(obj, RotationObjective):
        raise SynthgenError("rotation pre-training needs square images; set dataset.image_size")
    if state is not None:
        mean, std = tuple(state["normalization"]["mean"]), tuple(state["normalization"]["std"])
    else:
        mean, std = resolve_normalization(config.normalization, ds.images)
    size = config.model.image_size

    # batches per epoch
    if isinstance(obj, StableRepObjective):
        if ds.groups is None:
            raise SynthgenError("stablerep needs a group (caption id) column; set dataset.group_column")
        sampler = GroupBatchSampler(
            ds.groups, obj.groups_per_batch, obj.images_per_group, seed=config.seed, short_groups=obj.short_groups
        )
        steps_per_epoch = len(sampler)
        if steps_per_epoch == 0:
            raise SynthgenError(
                f"{sampler.num_groups} usable groups < groups_per_batch={obj.groups_per_batch}: not one full batch"
            )
    else:
        sampler = None
        if len(ds) < obj.batch_size:
            raise SynthgenError(f"{len(ds)} images < batch_size={obj.batch_size}: not one full batch")
        steps_per_epoch = len(ds) // obj.batch_size
    total_steps = config.schedule.epochs * steps_per_epoch
    if config.schedule.max_steps is not None:
        total_steps = min(total_steps, config.schedule.max_steps)
    sched_steps = config.schedule.epochs * steps_per_epoch  # the LR schedule ignores max_steps

    backbone = create_model(config.model.name, 0, image_size=size, pretrained=config.model.pretrained, **config.model.kwargs)
    head = build_head(obj, int(backbone.num_features))
    model = _Trainee(backbone, head).to(device)
    cuda = device.type == "cuda"
    if cuda and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config.optimizer, [p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(optimizer, sched_steps, config.schedule.warmup_steps, config.schedule.lr_schedule)
    use_scaler = cuda and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    step = 0
    history: list[dict] = []
    epochs_log: list[dict] = []
    elapsed_before = 0.0
    resumed_from = None
    if state is not None:
        model.backbone.load_state_dict(state["backbone"])
        model.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        history = list(state.get("history", []))
        epochs_log = list(state.get("epochs_log", []))
        elapsed_before = float(state.get("elapsed_s", 0.0))
        resumed_from = step

    aug = None
    if not isinstance(obj, RotationObjective):
        a = obj.augment
        aug = ContrastiveAugment(
            size=size, mean=mean, std=std, scale=tuple(a.scale), strength=a.strength,
            jitter_p=a.jitter_p, grayscale_p=a.grayscale_p, blur_p=a.blur_p, flip_p=a.flip_p,
        )  # fmt: skip

    resolved = config.model_dump(mode="json")
    resolved["dataset"]["resolved_source"] = ds.source

    def metrics_doc(finished: bool) -> dict:
        losses = [h["loss"] for h in history]
        return {
            "name": config.name,
            "objective": obj.kind,
            "finished": finished,
            "step": step,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "images": len(ds),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "history": history,
            "epochs": epochs_log,
            "elapsed_s": round(elapsed_before + (time.time() - t0), 2),
            "device": device_description(device),
            "dataset": ds.source,
            "seed": config.seed,
            "config_hash": config_hash(config),
            "versions": library_versions(),
        }

    def save(finished: bool) -> None:
        doc = metrics_doc(finished)
        _atomic_save(
            {
                "format": _FORMAT,
                "kind": "synthgen-pretrain",
                "backbone": model.backbone.state_dict(),
                "head": model.head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None,
                "step": step,
                "finished": finished,
                "config": resolved,
                "resume_key": _resume_key(config),
                "model": config.model.model_dump(mode="json"),
                "num_features": int(model.backbone.num_features),
                "normalization": {"mean": list(mean), "std": list(std), "kind": config.normalization},
                "history": history,
                "epochs_log": epochs_log,
                "elapsed_s": doc["elapsed_s"],
            },
            ckpt_path,
        )
        _atomic_write(yaml.safe_dump(resolved, sort_keys=False), out / "config.yaml")
        _atomic_write(json.dumps(doc, indent=2) + "\n", out / "metrics.json")

    t0 = time.time()
    if step >= total_steps:
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else metrics_doc(True)
        return PretrainResult(out, ckpt_path, metrics, resumed_from)

    images_cpu = ds.images
    groups_all = ds.groups
    if cuda:
        # keep the whole uint8 set on the GPU when it takes under a quarter of its memory
        free, _ = torch.cuda.mem_get_info(device)
        if images_cpu.numel() < free // 4:
            images_cpu = images_cpu.to(device)

    def batch_to_device(idx: torch.Tensor) -> torch.Tensor:
        x = images_cpu[idx.to(images_cpu.device)]
        return x.to(device, non_blocking=True)

    def step_loss(x_u8: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        extra: dict = {}
        mf = torch.channels_last if (cuda and config.channels_last) else torch.contiguous_format
        if isinstance(obj, RotationObjective):
            x = to_unit_float(x_u8)
            if obj.augment == "crop_flip":
                x = random_crop_flip(x, generator=gen)
            x = normalize(x, mean, std)
            x4, y4 = rotate_batch(x)
            with autocast_context(device, config.amp):
                logits = model(x4.contiguous(memory_format=mf))
            loss = rotation_loss(logits, y4)
            extra["acc"] = (logits.argmax(1) == y4).float().mean().item()
        elif isinstance(obj, SimCLRObjective):
            v = torch.cat([aug(x_u8, gen), aug(x_u8, gen)])
            with autocast_context(device, config.amp):
                z = model(v.contiguous(memory_format=mf))
            n = x_u8.shape[0]
            loss = nt_xent_loss(z[:n], z[n:], temperature=obj.temperature)
        else:
            v = aug(x_u8, gen)
            with autocast_context(device, config.amp):
                z = model(v.contiguous(memory_format=mf))
            loss = multi_positive_contrastive_loss(z, groups_all[idx].to(device), temperature=obj.temperature)
        return loss, extra

    model.train()
    start_epoch = step // steps_per_epoch
    window: list[float] = []
    window_acc: list[float] = []
    bar = progress_bar(progress)
    try:
        with bar:
            task = bar.add_task(f"pretrain {config.name} ({obj.kind})", total=total_steps, completed=step, info="")
            for epoch in range(start_epoch, config.schedule.epochs):
                if step >= total_steps:
                    break
                gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
                if sampler is not None:
                    sampler.set_epoch(epoch)
                    batches = [torch.tensor(b) for b in sampler]
                else:
                    perm = torch.randperm(len(ds), generator=gen)
                    batches = list(perm[: steps_per_epoch * obj.batch_size].view(steps_per_epoch, obj.batch_size))
                skip = step - epoch * steps_per_epoch  # batches of this epoch done before a resume
                epoch_losses: list[float] = []
                for idx in batches[skip:]:
                    if step >= total_steps:
                        break
                    x = batch_to_device(idx)
                    loss, extra = step_loss(x, idx, gen)
                    if not torch.isfinite(loss):
                        raise SynthgenError(f"loss became {loss.item()} at step {step}; lower optimizer.lr")
                    optimizer_step(loss, optimizer, scaler, model.parameters(), config.optimizer.grad_clip)
                    scheduler.step()
                    step += 1
                    value = loss.item()
                    window.append(value)
                    epoch_losses.append(value)
                    if "acc" in extra:
                        window_acc.append(extra["acc"])
                    if step % config.log_every == 0 or step == total_steps or step == 1:
                        rec = {"step": step, "epoch": epoch, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0]}
                        if window_acc:
                            rec["acc"] = sum(window_acc) / len(window_acc)
                        history.append(rec)
                        window, window_acc = [], []
                    bar.update(task, completed=step, info=f"epoch {epoch + 1}/{config.schedule.epochs} loss {value:.4f}")
                if epoch_losses:
                    epochs_log.append({"epoch": epoch, "mean_loss": sum(epoch_losses) / len(epoch_losses), "steps": len(epoch_losses)})
                if (epoch + 1) % config.checkpoint_every == 0 and step < total_steps:
                    save(False)
    except KeyboardInterrupt:
        save(False)
        raise
    save(True)
    return PretrainResult(out, ckpt_path, metrics_doc(True), resumed_from)
