"""Prompt samplers: WordNet (ImageNet-SD), captions (StableRep), combinatorial (Mormille & Atsumi) and
class ids for a class-conditioned pipeline (Lomurno et al.).

Every sampler is built as ``Sampler(config, count, seed)`` and is a fixed indexable sequence of
:class:`~synthgen.prompts.base.PromptRecord` (see :mod:`synthgen.prompts.base`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from synthgen.prompts.base import PromptRecord, PromptSampler, check_index, stable_uint64
from synthgen.prompts.captions import CaptionSampler
from synthgen.prompts.classes import ClassSampler
from synthgen.prompts.combinatorial import CombinatorialSampler, KeyedPermutation
from synthgen.prompts.tables import ClassInfo, build_class_table, read_class_table, write_class_table
from synthgen.prompts.wordnet import WordNetSampler

if TYPE_CHECKING:
    from synthgen.recipe import Recipe

SAMPLERS = {
    "wordnet": WordNetSampler,
    "captions": CaptionSampler,
    "combinatorial": CombinatorialSampler,
    "classes": ClassSampler,
}


def build_sampler(recipe: "Recipe") -> PromptSampler:
    """The prompt sampler a recipe asks for, with the recipe's ``count`` and ``seed``."""
    config = recipe.prompts
    try:
        cls = SAMPLERS[config.kind]
    except KeyError:
        from synthgen.errors import RecipeError

        raise RecipeError(f"prompts.kind: unknown sampler {config.kind!r}; choose one of {', '.join(SAMPLERS)}") from None
    sampler = cls(config, recipe.count, recipe.seed)
    check = getattr(sampler, "check_generator", None)  # a sampler that needs a kind of model says so now
    if check is not None:
        check(recipe.generator)
    return sampler


__all__ = [
    "SAMPLERS",
    "CaptionSampler",
    "ClassSampler",
    "ClassInfo",
    "CombinatorialSampler",
    "KeyedPermutation",
    "PromptRecord",
    "PromptSampler",
    "WordNetSampler",
    "build_class_table",
    "build_sampler",
    "check_index",
    "read_class_table",
    "stable_uint64",
    "write_class_table",
]
