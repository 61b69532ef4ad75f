"""Per-image seeds: derived from the recipe seed and the image's global index, never call order."""

from __future__ import annotations

from synthgen.prompts.base import stable_uint64

_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64-1; keep it a positive int64


def image_seed(recipe_seed: int, index: int, attempt: int = 0) -> int:
    """The seed of image ``index``; ``attempt`` > 0 derives the seed of a regeneration."""
    return stable_uint64("synthgen-image-seed", recipe_seed, index, attempt) & _MAX_SEED
