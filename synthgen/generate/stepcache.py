"""DeepCache step caching for a diffusers UNet (Ma et al., "DeepCache", CVPR 2024), opt-in.

Between adjacent denoising steps a UNet's deep, low-resolution features change little. With
interval ``N``, every ``N``-th UNet call runs in full and keeps the outputs of the deep blocks (every
down block but the first, the mid block, every up block but the last); the calls in between run only
the shallow branch -- ``conv_in``, the first down block, the last up block, ``conv_out`` -- and reuse
those outputs (DeepCache's uniform schedule with the shallowest skip branch). It changes pixels (an
approximation), so it is off unless a recipe sets ``generator.step_cache_interval``, and the
setting is part of the settings hash.

Why not diffusers' own cache hooks: in diffusers 0.42, FirstBlockCache, FasterCache, MagCache and
the ``enable_cache`` API are for transformer denoisers (``CacheMixin``; ``UNet2DConditionModel``
has none, and the Stable Diffusion pipeline sets no cache context). This module uses diffusers'
public hook registry (``diffusers.hooks.HookRegistry``/``ModelHook``) for the same mechanism.

The cache holds one sampling run's features: :func:`reset_step_cache` must run before each
pipeline call (``ImageGenerator`` does), so a new batch never sees another batch's features.
"""

from __future__ import annotations

from typing import Any

_CLOCK = "synthgen_step_clock"
_BLOCK = "synthgen_deep_block_cache"


def _hooks():
    from diffusers.hooks import HookRegistry, ModelHook

    class StepClock(ModelHook):
        """On the UNet: counts its calls in a sampling run; every ``interval``-th runs in full."""

        _is_stateful = True

        def __init__(self, interval: int) -> None:
            super().__init__()
            self.interval = interval
            self.calls = 0
            self.full = True

        def pre_forward(self, module, *args, **kwargs):
            self.full = self.calls % self.interval == 0
            self.calls += 1
            return args, kwargs

        def reset_state(self, module):
            self.calls = 0
            self.full = True
            return module

    class DeepBlockCache(ModelHook):
        """On a deep block: compute on full steps, return the kept output in between."""

        _is_stateful = True

        def __init__(self, clock: StepClock) -> None:
            super().__init__()
            self.clock = clock
            self.output = None

        def new_forward(self, module, *args, **kwargs):
            if self.clock.full or self.output is None:
                self.output = self.fn_ref.original_forward(*args, **kwargs)
            return self.output

        def reset_state(self, module):
            self.output = None
            return module

    return HookRegistry, StepClock, DeepBlockCache


def deep_blocks(unet: Any) -> list:
    """The blocks whose outputs are reused: down blocks 1.., the mid block, up blocks ..-2."""
    return [*list(unet.down_blocks)[1:], unet.mid_block, *list(unet.up_blocks)[:-1]]


def enable_step_cache(unet: Any, interval: int) -> None:
    """Run ``unet``'s deep blocks only every ``interval``-th call (``interval >= 2``)."""
    if interval < 2:
        raise ValueError("a step cache interval is at least 2 (1 means no caching)")
    HookRegistry, StepClock, DeepBlockCache = _hooks()
    clock = StepClock(interval)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(clock, _CLOCK)
    for block in deep_blocks(unet):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(DeepBlockCache(clock), _BLOCK)


def step_cache_interval(unet: Any) -> int:
    """The interval :func:`enable_step_cache` set on ``unet``, or 1 (no caching)."""
    registry = getattr(unet, "_diffusers_hook", None)
    clock = registry.get_hook(_CLOCK) if registry is not None else None
    return clock.interval if clock is not None else 1


def reset_step_cache(unet: Any) -> None:
    """Forget the kept features (before a new sampling run); nothing happens without a cache."""
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(_CLOCK) is not None:
        registry.reset_stateful_hooks(recurse=True)
