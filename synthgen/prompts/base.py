"""The one interface every prompt sampler implements.

A sampler is a fixed, indexable sequence: ``len(sampler)`` images and ``sampler[i]`` the prompt of
image ``i``. ``sampler[i]`` is a pure function of the sampler's settings, its seed and ``i``, so any
process on any machine can generate any shard, in any order, and get the same prompts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class PromptRecord:
    index: int  # the image's global index in the dataset
    prompt: Optional[str]  # text prompt (None for class-conditioned generation)
    label: Optional[int] = None  # label id (position in ``class_names``), None when unlabelled
    label_name: Optional[str] = None
    group: int = 0  # images sharing a group id are positives for each other (same caption)
    class_id: Optional[int] = None  # class fed to a class-conditioned pipeline
    meta: dict[str, Any] = field(default_factory=dict)  # template, hypernym, background, axes, ...


@runtime_checkable
class PromptSampler(Protocol):
    #: label names in label-id order, or None for an unlabelled dataset
    class_names: Optional[Sequence[str]]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> PromptRecord: ...


def stable_uint64(*parts: object) -> int:
    """A 64-bit integer from its parts, the same on every machine and Python (unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def check_index(index: int, length: int) -> int:
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {length} prompts")
    return index
