"""One optimiser step shared by every training loop (classification, pre-training, fine-tuning)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch


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
