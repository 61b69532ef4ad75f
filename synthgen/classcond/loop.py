"""The training loop both stages share: noise prediction on cached latents, one checkpoint per epoch.

One step, as in Lomurno et al.'s ``train_step``: draw latents from the cached VAE posteriors, add
noise at uniform random timesteps (the base model's DDPM schedule), condition the UNet on the
class tokens, and regress the noise (or ``v`` for a v-prediction base model) with the mean squared
error; AdamW with decoupled weight decay, global gradient-norm clipping, cosine decay to zero over
all steps. What is trained (the encoder, or the UNet) is the :class:`DenoisingTask`'s business.

It runs through ``accelerate``: mixed precision, and several GPUs with ``accelerate launch``
(``batch_size`` is global, split evenly over the processes). Randomness is a pure function of the
seed, the epoch and the process rank -- the shuffle, the latent draws, noise and timesteps -- so a
stage resumed from epoch ``k`` computes exactly what an uninterrupted run computes after epoch ``k``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from synthgen.classcond.checkpoints import (
    epoch_dir,
    list_epochs,
    load_optimizer,
    read_state,
    remove_partial,
    write_epoch,
)
from synthgen.classcond.config import StageConfig
from synthgen.classcond.latents import LatentSet
from synthgen.errors import SynthgenError
from synthgen.prompts.base import stable_uint64

__all__ = ["DenoisingTask", "EpochInfo", "StageResult", "run_stage", "denoising_loss", "noise_target", "make_accelerator"]

logger = logging.getLogger(__name__)
_SEED_MASK = 2**63 - 1


@dataclass
class DenoisingTask:
    """What a stage trains.

    ``condition(model, labels)`` gives the UNet's ``encoder_hidden_states`` (``model``: the prepared
    trainable module, so that gradients reach it through ``accelerate``'s wrapper);
    ``settings`` is everything an interrupted run must be resumed with.
    """

    name: str  # the stage folder's name: "encoder" or "unet"
    trainable: nn.Module
    unet: nn.Module
    condition: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    save_weights: Callable[[nn.Module, Path], None]
    load_weights: Callable[[nn.Module, Path], None]
    settings: dict[str, Any]
    trains_unet: bool = False  # the UNet is ``trainable`` (stage 3), else it is frozen (stage 1)


@dataclass
class EpochInfo:
    stage: str
    epoch: int
    epochs: int
    loss: float  # mean training loss over the epoch's images (all processes)
    lr: float  # learning rate after the epoch
    seconds: float
    images_per_s: float
    checkpoint: Path


@dataclass
class StageResult:
    """A finished (or already complete) stage: checkpoints and losses by epoch."""

    stage: str
    stage_dir: Path
    checkpoints: dict[int, Path] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    resumed_from: int = 0  # the last finished epoch found on start (0: started fresh)
    device: str = "cpu"
    mixed_precision: str = "no"
    num_processes: int = 1

    @property
    def last_epoch(self) -> int:
        return max(self.checkpoints) if self.checkpoints else 0


def resolve_mixed_precision(name: str, cpu: bool) -> str:
    if name != "auto":
        return name
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(config: StageConfig):
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision, config.cpu), cpu=config.cpu)
    except ValueError as exc:  # e.g. fp16 requested on a CPU, or a state already set differently
        raise SynthgenError(f"cannot set up training: {' '.join(str(exc).split())[:300]}") from None


def noise_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses: the noise, ``v``, or the clean latents, per the base model's scheduler."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise SynthgenError(f"the base model's scheduler predicts {kind!r}, which training does not support")


def _noisy_batch(noise_scheduler, latents: LatentSet, index: torch.Tensor, generator: torch.Generator):
    """(noisy latents, timesteps, target, labels) of rows ``index``, random draws from ``generator``."""
    x0 = latents.sample(index, generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator, device=x0.device)
    return noise_scheduler.add_noise(x0, noise, t), t, noise_target(noise_scheduler, x0, noise, t), latents.labels[index]


@torch.no_grad()
def denoising_loss(
    unet,
    noise_scheduler,
    latents: LatentSet,
    condition: Callable[[torch.Tensor], torch.Tensor],
    *,
    seed: int = 0,
    batch_size: int = 64,
    repeats: int = 1,
) -> float:
    """The mean noise-prediction loss over all of ``latents`` with fixed draws (``seed``): the same
    number for the same weights, so it compares checkpoints. ``condition(labels)`` -> UNet tokens."""
    device = unet.device
    generator = torch.Generator(device).manual_seed(seed)
    data = latents.to(device)
    total, count = 0.0, 0
    for _ in range(repeats):
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(start + batch_size, len(data)), device=device)
            noisy, t, target, labels = _noisy_batch(noise_scheduler, data, index, generator)
            cond = condition(labels).to(unet.dtype)
            pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond, return_dict=False)[0]
            total += F.mse_loss(pred.float(), target.float(), reduction="sum").item() / pred[0].numel()
            count += len(index)
    return total / count


def _same_settings(have: dict, want: dict, folder: Path) -> None:
    want = json.loads(json.dumps(want, default=str))
    if have == want:
        return
    from synthgen.dataset.folder import changed_keys

    def value(data: dict, dotted: str):
        for part in dotted.split("."):
            data = data.get(part) if isinstance(data, dict) else None
        return data

    keys = changed_keys(have, want) or sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    shown = ", ".join(f"{k}={value(have, k)!r} (now {value(want, k)!r})" for k in keys[:3])
    raise SynthgenError(
        f"{folder} was trained with {shown}{f' (and {len(keys) - 3} more)' if len(keys) > 3 else ''}; "
        "resume with the same settings or use another run folder"
    )


def run_stage(
    task: DenoisingTask,
    config: StageConfig,
    latents: LatentSet,
    noise_scheduler,
    stage_dir: Path,
    *,
    on_step_end: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    on_epoch_end: Optional[Callable[[EpochInfo], None]] = None,
) -> StageResult:
    """Train ``task`` for ``config.epochs`` epochs, resuming after the last finished one in ``stage_dir``.

    ``on_step_end(epoch, step, loss)`` runs after every optimizer step (``loss``: this process's
    batch loss, a tensor; no device sync is forced), ``on_epoch_end(info)`` after each epoch's
    checkpoint is written, on every process.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from synthgen.provenance import library_versions
    from synthgen.train.optim import build_optimizer

    accelerator = make_accelerator(config)
    device = accelerator.device
    procs, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % procs:
        raise SynthgenError(f"batch_size {config.batch_size} does not split evenly over {procs} processes")
    per_process = config.batch_size // procs
    n = len(latents)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    result = StageResult(task.name, stage_dir, device=str(device), mixed_precision=accelerator.mixed_precision,
                         num_processes=procs)
    if accelerator.is_main_process:
        remove_partial(stage_dir)
    accelerator.wait_for_everyone()
    done = list_epochs(stage_dir)
    state: dict[str, Any] = {}
    if done:
        state = read_state(epoch_dir(stage_dir, done[-1]))
        _same_settings(state.get("settings") or {}, task.settings, stage_dir)
        result.resumed_from = done[-1]
        result.losses = {int(k): float(v) for k, v in state.get("losses", {}).items()}
    result.checkpoints = {e: epoch_dir(stage_dir, e) for e in done}
    if done and done[-1] >= config.epochs:
        return result

    # Frozen weights run in the mixed-precision dtype; trained ones stay float32 (autocast computes).
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    trainable = task.trainable.to(device)
    for p in trainable.parameters():
        if not p.requires_grad:
            p.data = p.data.to(weight_dtype)
    if not task.trains_unet:
        task.unet.to(device).eval()
        if task.unet.dtype != weight_dtype:
            task.unet.to(dtype=weight_dtype)
    if done:
        task.load_weights(trainable, epoch_dir(stage_dir, done[-1]))
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    if done:
        load_optimizer(optimizer, epoch_dir(stage_dir, done[-1]), state["optimizer_param_groups"])
        schedule.load_state_dict(state["scheduler"])
    model, optimizer = accelerator.prepare(trainable, optimizer)
    if done and accelerator.scaler is not None and state.get("grad_scaler"):
        accelerator.scaler.load_state_dict(state["grad_scaler"])  # fp16: the loss scale it had reached
    model.train()
    unet = model if task.trains_unet else task.unet
    input_dtype = task.unet.dtype
    data = latents.to(device)

    for epoch in range(result.resumed_from + 1, config.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(stable_uint64("order", config.seed, epoch) & _SEED_MASK))
        if procs > 1:  # every process gets per_process rows each step: wrap around, as DistributedSampler pads
            order = torch.cat([order, order[: steps_per_epoch * config.batch_size - n]])
        order = order.to(device)  # one copy an epoch: a copy each step would wait for the GPU every step
        generator = torch.Generator(device).manual_seed(stable_uint64("draws", config.seed, epoch, rank) & _SEED_MASK)
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            if procs > 1:
                index = index[rank * per_process : (rank + 1) * per_process]
            noisy, t, target, labels = _noisy_batch(noise_scheduler, data, index, generator)
            with accelerator.autocast():
                cond = task.condition(model, labels)
                pred = unet(noisy.to(input_dtype), t, encoder_hidden_states=cond.to(input_dtype), return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target.float())
            accelerator.backward(loss)
            if config.clip_norm and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.clip_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(index)
            seen += len(index)
            if on_step_end is not None:
                on_step_end(epoch, step, loss.detach())

        totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(seen), device=device)]), reduction="sum")
        mean_loss = float(totals[0] / totals[1])
        seconds = time.perf_counter() - started
        result.losses[epoch] = mean_loss
        lr = float(schedule.get_last_lr()[0])
        folder = epoch_dir(stage_dir, epoch)
        if accelerator.is_main_process:
            state = {
                "stage": task.name,
                "epoch": epoch,
                "epochs": config.epochs,
                "global_step": epoch * steps_per_epoch,
                "steps_per_epoch": steps_per_epoch,
                "loss": mean_loss,
                "losses": {str(k): v for k, v in sorted(result.losses.items())},
                "lr": lr,
                "seconds": seconds,
                "images_per_s": float(totals[1]) / seconds,
                "settings": task.settings,
                "scheduler": schedule.state_dict(),
                "device": str(device),
                "mixed_precision": accelerator.mixed_precision,
                "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "num_processes": procs,
                "versions": library_versions(),
            }
            unwrapped = accelerator.unwrap_model(model)
            write_epoch(stage_dir, epoch, lambda d: task.save_weights(unwrapped, d), state, optimizer)
        accelerator.wait_for_everyone()
        result.checkpoints[epoch] = folder
        logger.info("%s epoch %d/%d: loss %.5f, %.1f s", task.name, epoch, config.epochs, mean_loss, seconds)
        if on_epoch_end is not None:
            on_epoch_end(EpochInfo(task.name, epoch, config.epochs, mean_loss, lr, seconds, float(totals[1]) / seconds, folder))
    return result
