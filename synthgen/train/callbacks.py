"""Epoch callbacks: what a training loop does between epochs, as objects rather than flags.

A callback has ``on_epoch_end(epoch, metrics)`` (``epoch`` counts from 1, ``metrics`` is the epoch's
row: ``train_loss``, ``val_acc``, ``lr`` ...) and returns True to stop the run; ``on_train_end()``
runs once after the last epoch. :func:`run_epoch_callbacks` calls every callback (none is skipped
because an earlier one asked to stop) and says whether any asked.

:class:`ReduceLROnPlateau` and :class:`EarlyStopping` follow Keras' semantics exactly, because
Lomurno et al.'s CAS numbers come from Keras (``tf.keras.callbacks``):

* the plateau cut happens when ``wait >= patience`` (torch's ``ReduceLROnPlateau`` cuts one epoch
  later: it needs ``patience + 1`` bad epochs), and the new rate applies from the next epoch;
* ``min_delta`` is absolute (torch's ``threshold`` is relative): for ``mode="max"`` an epoch improves
  on the best when ``value > best + min_delta`` (plateau) / ``value - min_delta > best`` (early stop);
* Keras' defaults: plateau ``min_delta=1e-4``, early stopping ``min_delta=0``; a cut only happens
  while the rate is above ``min_lr`` (compared in float32, as Keras does), and a cut resets the wait.

An Optuna pruning callback (``trial.report`` then ``trial.should_prune``) fits the same protocol.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = [
    "Callback",
    "ReduceLROnPlateau",
    "EarlyStopping",
    "LambdaCallback",
    "run_epoch_callbacks",
]


class Callback:
    """Base class: override what you need."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> bool | None:  # pragma: no cover - interface
        return None

    def on_train_end(self) -> None:
        return None


class LambdaCallback(Callback):
    """``fn(epoch, metrics)`` as a callback (return True to stop)."""

    def __init__(self, fn: Callable[[int, dict], bool | None]) -> None:
        self.fn = fn

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> bool | None:
        return self.fn(epoch, metrics)


def run_epoch_callbacks(callbacks: Sequence[Callback], epoch: int, metrics: dict[str, Any]) -> bool:
    """Call every callback's ``on_epoch_end``; True when any asks to stop."""
    stop = False
    for cb in callbacks:
        stop = bool(cb.on_epoch_end(epoch, metrics)) or stop
    return stop


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


class ReduceLROnPlateau(Callback):
    """Keras' ``ReduceLROnPlateau``: multiply the rate by ``factor`` after ``patience`` epochs
    without an improvement of ``monitor`` by more than ``min_delta`` (absolute)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        monitor: str = "val_acc",
        mode: str = "max",
        factor: float = 0.1,
        patience: int = 10,
        min_lr: float = 0.0,
        min_delta: float = 1e-4,
        cooldown: int = 0,
    ) -> None:
        if not 0 < factor < 1:
            raise ValueError("factor must be in (0, 1)")
        self.optimizer = optimizer
        self.monitor, self.mode = monitor, _check_mode(mode)
        self.factor, self.patience, self.min_lr = factor, patience, min_lr
        self.min_delta, self.cooldown = abs(min_delta), cooldown
        self.best = -math.inf if mode == "max" else math.inf
        self.wait = 0
        self.cooldown_counter = 0
        self.cuts: list[int] = []  # epochs after which the rate was cut

    def _improved(self, value: float) -> bool:
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> bool | None:
        value = metrics.get(self.monitor)
        if value is None:
            return None
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._improved(value):
            self.best = value
            self.wait = 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                cut = False
                for group in self.optimizer.param_groups:
                    old = float(group["lr"])
                    if np.float32(old) > np.float32(self.min_lr):
                        group["lr"] = max(old * self.factor, self.min_lr)
                        cut = True
                if cut:
                    self.cuts.append(epoch)
                self.cooldown_counter = self.cooldown
                self.wait = 0
        return None


class EarlyStopping(Callback):
    """Keras' ``EarlyStopping``: stop when ``monitor`` has not improved (by more than ``min_delta``,
    absolute) for ``patience`` epochs. With ``restore_best`` (a model), the weights of the best epoch
    are kept (on the CPU) and put back at the end of training, whether it stopped early or ran out
    of epochs (as Lomurno et al.'s ``CustomEarlyStopping`` does)."""

    def __init__(
        self,
        monitor: str = "val_acc",
        mode: str = "max",
        patience: int = 25,
        min_delta: float = 0.0,
        restore_best: torch.nn.Module | None = None,
    ) -> None:
        self.monitor, self.mode = monitor, _check_mode(mode)
        self.patience, self.min_delta = patience, abs(min_delta)
        self.model = restore_best
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = 0
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def _improved(self, value: float) -> bool:
        if self.mode == "max":
            return value - self.min_delta > self.best
        return value + self.min_delta < self.best

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> bool | None:
        value = metrics.get(self.monitor)
        if value is None:
            return None
        self.wait += 1
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.model is not None:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            return None
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return None

    def on_train_end(self) -> None:
        if self.model is not None and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
