"""The optimiser and its rate schedule, shared by every training loop (classification, pre-training, fine-tuning)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from synthgen.errors import SynthgenError


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    name: str,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over ``params``; the fused kernels on CUDA.

    ``eps`` (Adam/AdamW) is torch's, added to the bias-corrected ``sqrt(v_hat)``. Keras' Adam
    (2.11+ and legacy alike) adds its epsilon (default 1e-7) to the UNcorrected ``sqrt(v)``, which is
    torch's eps at ``epsilon / sqrt(1 - beta2**t)`` on step t: with beta2 = 0.999 that is 3.2e-6 at
    step 1, 3.2e-7 at step 100, 1.3e-7 at step 1,000 and within 1% of 1e-7 from step 3,925 on.
    So ``eps=1e-7`` matches Keras from a few thousand steps on; before, Keras damps the steps of
    weights whose gradients are ~1e-6 or smaller a little more.

    Fused kernels update every parameter in one launch (same update rule): on a GPU the per-tensor
    launches of the default path are a visible share of a small network's step.
    """
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = {"fused": True} if tensors and tensors[0].is_cuda else {}
    key = name.lower()
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **fused)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **fused)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **fused)
    raise SynthgenError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def _lr_lambda(total_steps: int, warmup: int, kind: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, kind: str):
    """Linear warm-up over ``warmup`` steps, then constant or cosine to 0 at ``total_steps`` - the
    steps the run will actually take (a capped run ends its schedule, not its warm-up)."""
    if kind not in ("constant", "cosine"):
        raise SynthgenError(f"lr_schedule must be constant or cosine, got {kind!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, min(warmup, total_steps), kind))
