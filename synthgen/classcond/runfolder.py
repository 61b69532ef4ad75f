"""The run folder: where the stages of one class-conditioned adaptation keep their files.

::

    run.json                  what the run adapts: base model (+ revision), dataset, classes, resolution
    latents.safetensors       the training images' VAE posteriors, encoded once (see latents.py)
    encoder/epoch-0001/       stage 1 checkpoints, one per finished epoch (see checkpoints.py)
    unet/epoch-0001/          stage 3 checkpoints

``run.json`` is written by the first stage and checked by every later call: a folder made for
another base model, dataset, class list or resolution is refused, so checkpoints of different
adaptations never mix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthgen.errors import SynthgenError

__all__ = ["RunFolder"]

_INFO = "run.json"
# The keys of run.json that identify an adaptation (the rest is informative).
_IDENTITY = ("base_model", "base_revision", "dataset", "class_names", "resolution")


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def info_path(self) -> Path:
        return self.root / _INFO

    @property
    def latents_path(self) -> Path:
        return self.root / "latents.safetensors"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def read_info(self) -> dict[str, Any]:
        if not self.info_path.is_file():
            raise SynthgenError(f"{self.root} is not a class-conditioning run folder (no {_INFO}); run stage 1 first")
        try:
            return json.loads(self.info_path.read_text())
        except ValueError:
            raise SynthgenError(f"{self.info_path} is not valid JSON; the run folder is damaged") from None

    def claim(self, info: dict[str, Any]) -> dict[str, Any]:
        """Write ``info`` as the run's identity, or check it against the one already there."""
        if self.info_path.is_file():
            have = self.read_info()
            for key in _IDENTITY:
                if have.get(key) != info.get(key):
                    raise SynthgenError(
                        f"{self.root} holds a run for another {key.replace('_', ' ')} "
                        f"({_short(have.get(key))}, not {_short(info.get(key))}); use another folder"
                    )
            return have
        if self.root.exists() and any(p for p in self.root.iterdir() if not p.name.startswith(".")):
            raise SynthgenError(f"{self.root} is not empty and is not a class-conditioning run folder; use another folder")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.info_path.with_name(f".{_INFO}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
        os.replace(tmp, self.info_path)
        return info


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
