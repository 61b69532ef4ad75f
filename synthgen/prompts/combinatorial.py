"""Combinatorial prompts (Mormille & Atsumi): one value from each named axis, joined.

The vocabulary is a YAML file ``axes: {name: [values, ...], ...}`` (axes in prompt order). The
shipped ``prompts/combinatorial.yaml`` has category (1,000 ImageNet-1K names) x size (8) x color
(12) x view (10) x illumination (10) = 9,600,000 prompts, e.g.
"American Alligator, Small, Gray, Left-Side View, Twilight".

Prompts use plain category words, as the paper's do: a value written ``Word (Sense)`` in the
vocabulary (ImageNet has two classes called "crane", two "maillot", two "cardigan") is ``Word`` in
the prompt and keeps its full ``Word (Sense)`` as the label name, so the two classes stay two labels
(:func:`prompt_word`).

``count`` distinct prompts are drawn without materialising the product: image ``i`` takes
combination ``perm(i)``, where ``perm`` is a keyed pseudo-random permutation of
``range(space_size)`` (:class:`KeyedPermutation`: a balanced Feistel network over the smallest even
bit width that covers the space, with cycle-walking, round keys from ``stable_uint64(seed, ...)``).
The combination number is decoded in mixed radix, the first axis most significant.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from synthgen.errors import RecipeError, SynthgenError
from synthgen.prompts.base import PromptRecord, check_index, stable_uint64
from synthgen.prompts.tables import resolve_data_file
from synthgen.recipe import CombinatorialPrompts

_SENSE = re.compile(r"\s*\([^()]*\)$")


def prompt_word(value: str) -> str:
    """A vocabulary value as it appears in a prompt: ``"Crane (Wading Bird)"`` -> ``"Crane"``."""
    return _SENSE.sub("", value)


_MASK64 = (1 << 64) - 1
_M1 = 0xBF58476D1CE4E5B9  # splitmix64 finaliser constants
_M2 = 0x94D049BB133111EB


class KeyedPermutation:
    """A pseudo-random permutation of ``range(size)``, a pure function of ``(size, key)``.

    A balanced Feistel network on ``2 * half_bits`` bits (``rounds`` rounds, splitmix64-style round
    function), made a permutation of ``range(size)`` by cycle-walking: values ``>= size`` are
    encrypted again until they fall inside (on average fewer than 4 passes, as the domain is less
    than 4x the size). Python-int and numpy paths give the same values.
    """

    def __init__(self, size: int, key: Any, rounds: int = 6):
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = int(size)
        bits = max(2, (self.size - 1).bit_length())
        self.half_bits = (bits + 1) // 2
        self.half_mask = (1 << self.half_bits) - 1
        self.round_keys = [stable_uint64("feistel", key, self.size, r) for r in range(rounds)]

    # -- scalar -------------------------------------------------------------------------------
    def _round(self, value: int, round_key: int) -> int:
        x = (value ^ round_key) & _MASK64
        x = ((x ^ (x >> 30)) * _M1) & _MASK64
        x = ((x ^ (x >> 27)) * _M2) & _MASK64
        return (x ^ (x >> 31)) & self.half_mask

    def _encrypt(self, value: int) -> int:
        left, right = value >> self.half_bits, value & self.half_mask
        for k in self.round_keys:
            left, right = right, left ^ self._round(right, k)
        return (left << self.half_bits) | right

    def __call__(self, index: int) -> int:
        index = check_index(index, self.size)
        value = self._encrypt(index)
        while value >= self.size:
            value = self._encrypt(value)
        return value

    # -- vectorised ---------------------------------------------------------------------------
    def _round_np(self, value: np.ndarray, round_key: int) -> np.ndarray:
        x = value ^ np.uint64(round_key)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
        return (x ^ (x >> np.uint64(31))) & np.uint64(self.half_mask)

    def _encrypt_np(self, value: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = value >> shift, value & np.uint64(self.half_mask)
        for k in self.round_keys:
            left, right = right, left ^ self._round_np(right, k)
        return (left << shift) | right

    def many(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[perm(i) for i in indices]`` as a uint64 array, computed with numpy."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            bad = idx[(idx < 0) | (idx >= self.size)][0]
            raise IndexError(f"index {bad} out of range for a permutation of {self.size}")
        with np.errstate(over="ignore"):
            out = self._encrypt_np(idx.astype(np.uint64))
            todo = np.nonzero(out >= np.uint64(self.size))[0]
            while todo.size:
                out[todo] = self._encrypt_np(out[todo])
                todo = todo[out[todo] >= np.uint64(self.size)]
        return out


def load_vocabulary(vocabulary: str) -> tuple[dict[str, list[str]], Path]:
    """Ordered axes of a vocabulary YAML (``axes: {name: [values]}``), checked."""
    import yaml

    path = resolve_data_file(vocabulary, "vocabulary", (".yaml", ".yml"))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SynthgenError(f"{path}: malformed YAML: {getattr(exc, 'problem', exc)}") from None
    axes = data.get("axes") if isinstance(data, dict) else None
    if not isinstance(axes, dict) or not axes:
        raise SynthgenError(f"{path}: a vocabulary is a mapping `axes: {{name: [values, ...]}}`")
    out: dict[str, list[str]] = {}
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SynthgenError(f"{path}: axis {name!r} must be a non-empty list of values")
        values = [str(v).strip() for v in values]
        if any(not v for v in values):
            raise SynthgenError(f"{path}: axis {name!r} has an empty value")
        if len(set(values)) != len(values):
            dup = next(v for v in values if values.count(v) > 1)
            raise SynthgenError(f"{path}: axis {name!r} lists {dup!r} twice")
        out[str(name)] = values
    return out, path


class CombinatorialSampler:
    """``CombinatorialSampler(config, count, seed)``: ``count`` distinct random axis combinations."""

    def __init__(self, config: CombinatorialPrompts, count: int, seed: int):
        self.config = config
        self.count = int(count)
        self.seed = int(seed)
        self.axes, self.vocabulary_path = load_vocabulary(config.vocabulary)
        self.axis_names = list(self.axes)
        self.radices = [len(v) for v in self.axes.values()]
        self.space_size = math.prod(self.radices)
        if self.count > self.space_size:
            raise RecipeError(
                f"count {self.count} exceeds the {self.space_size:,} distinct prompts of vocabulary "
                f"{config.vocabulary!r} ({' x '.join(map(str, self.radices))})"
            )
        self.label_axis = config.label_axis
        self._label_pos: Optional[int] = None
        self.class_names: Optional[list[str]] = None
        if self.label_axis is not None:
            if self.label_axis not in self.axes:
                raise RecipeError(
                    f"prompts.label_axis: {self.label_axis!r} is not an axis of {self.vocabulary_path} "
                    f"(axes: {', '.join(self.axis_names)})"
                )
            self._label_pos = self.axis_names.index(self.label_axis)
            self.class_names = list(self.axes[self.label_axis])
        self.permutation = KeyedPermutation(self.space_size, ("combinatorial", self.seed))
        self._values = list(self.axes.values())
        self._words = [np.asarray([prompt_word(v) for v in vals], dtype=object) for vals in self._values]

    def __len__(self) -> int:
        return self.count

    def decode(self, combination: int) -> list[int]:
        """Mixed-radix digits of a combination number (first axis most significant)."""
        digits = []
        for radix in reversed(self.radices):
            combination, d = divmod(combination, radix)
            digits.append(d)
        return digits[::-1]

    def _record(self, i: int, combination: int, digits: Sequence[int]) -> PromptRecord:
        values = [vals[d] for vals, d in zip(self._values, digits)]
        words = [w[d] for w, d in zip(self._words, digits)]
        label = label_name = None
        if self._label_pos is not None:
            label = int(digits[self._label_pos])
            label_name = values[self._label_pos]
        return PromptRecord(
            index=i,
            prompt=self.config.separator.join(words),
            label=label,
            label_name=label_name,
            group=i,
            meta={"combination": int(combination), "axes": dict(zip(self.axis_names, values))},
        )

    def __getitem__(self, index: int) -> PromptRecord:
        i = check_index(index, self.count)
        combination = self.permutation(i)
        return self._record(i, combination, self.decode(combination))

    def combinations(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Combination numbers of many images at once (numpy)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            bad = idx[(idx < 0) | (idx >= self.count)][0]
            raise IndexError(f"index {bad} out of range for {self.count} prompts")
        return self.permutation.many(idx)

    def _digits(self, combos: np.ndarray) -> list[np.ndarray]:
        rest = combos.astype(np.int64)
        digits = []
        for radix in reversed(self.radices):
            digits.append(rest % radix)
            rest = rest // radix
        return digits[::-1]

    def prompts_for(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """The prompts of many images at once: ``[self[i].prompt for i in indices]``, faster."""
        digits = self._digits(self.combinations(indices))
        columns = [words[d] for words, d in zip(self._words, digits)]
        sep = self.config.separator
        return [sep.join(parts) for parts in zip(*columns)]

    def records(self, start: int = 0, stop: Optional[int] = None) -> list[PromptRecord]:
        """``[self[i] for i in range(start, stop)]``, computed in one vectorised pass."""
        stop = self.count if stop is None else stop
        if not 0 <= start <= stop <= self.count:
            raise IndexError(f"range {start}:{stop} out of range for {self.count} prompts")
        indices = np.arange(start, stop, dtype=np.int64)
        combos = self.combinations(indices)
        digits = np.stack(self._digits(combos), axis=1).tolist() if len(indices) else []
        return [self._record(i, c, d) for i, c, d in zip(range(start, stop), combos.tolist(), digits)]

    def __iter__(self):
        step = 8192
        for start in range(0, self.count, step):
            yield from self.records(start, min(start + step, self.count))
