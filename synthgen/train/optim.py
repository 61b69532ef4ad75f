"""The optimiser and its step, shared by every training loop (classification, pre-training, fine-tuning)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from synthgen.errors import SynthgenError


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over ``params``; the fused kernels on CUDA.

    Fused kernels update every parameter in one launch (same update rule): on a GPU the per-tensor
    launches of the default path are a visible share of a small network's step.
    """
    params = list(params)
    fused = {"fused": True} if params and params[0].is_cuda else {}
    key = name.lower()
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **fused)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **fused)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **fused)
    raise SynthgenError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    parameters: Iterable[torch.nn.Parameter],
    grad_clip: Optional[float] = None,
) -> None:
    """Backward, optional gradient-norm clipping, step; the scaler is a no-op unless fp16 AMP is on."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimizer)
    scaler.update()
