"""Checkpoints that cannot run code: tensors in safetensors, everything else in JSON.

A checkpoint is a folder:

* ``model.safetensors`` - the model's state dict (e.g. ``backbone.*`` and ``head.*``);
* ``optimizer.safetensors`` - the optimizer's per-parameter tensors (optional);
* ``checkpoint.json`` - the rest: the optimizer's param groups and scalar state, scheduler and
  scaler state, step, config, history, and the sha256 of both tensor files.

Writing is atomic per file and ``checkpoint.json`` is written last, so it is the commit point: a
crash mid-write leaves the previous checkpoint readable (its JSON names the hashes of the tensor
files it belongs to; a mismatch is reported, never loaded). Nothing here unpickles: a crafted file
is an error, not code execution.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from synthgen.errors import SynthgenError

__all__ = [
    "CHECKPOINT_JSON",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "has_checkpoint",
    "atomic_write_text",
    "load_model_state",
]

CHECKPOINT_JSON = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "synthgen-checkpoint/1"


def atomic_write_text(path: str | Path, text: str) -> Path:
    p = Path(path)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    digest = _sha256(tmp)
    os.replace(tmp, path)
    return digest


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as (tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def has_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / CHECKPOINT_JSON).is_file()


def save_checkpoint(
    folder: str | Path,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``model_state`` (tensors), the optimizer's state and ``state`` (JSON-able) into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"format": FORMAT, **state}
    doc["files"] = {MODEL_FILE: _save_tensors(model_state, out / MODEL_FILE)}
    if optimizer is not None:
        tensors, rest = _split_optimizer(optimizer.state_dict())
        doc["files"][OPTIMIZER_FILE] = _save_tensors(tensors, out / OPTIMIZER_FILE)
        doc["optimizer"] = rest
    atomic_write_text(out / CHECKPOINT_JSON, json.dumps(doc, default=str))
    return out / CHECKPOINT_JSON


class Checkpoint(dict):
    """The JSON state of a checkpoint (a dict) plus ``path`` and lazy tensor loading."""

    path: Path

    def model_state(self) -> dict[str, torch.Tensor]:
        return self._tensors(MODEL_FILE)

    def optimizer_state(self) -> dict | None:
        if "optimizer" not in self:
            return None
        return _join_optimizer(self._tensors(OPTIMIZER_FILE), self["optimizer"])

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = self.path.parent / name
        want = self.get("files", {}).get(name)
        if not p.is_file():
            raise SynthgenError(f"checkpoint {self.path.parent} lacks {name}")
        if want is not None and _sha256(p) != want:
            raise SynthgenError(f"{p} does not match {self.path.name} (sha256 differs): a partial or mixed checkpoint")
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SynthgenError(f"cannot read {p}: {' '.join(str(exc).split())}") from None


def load_checkpoint(path: str | Path, kind: str | None = None) -> Checkpoint:
    """Read a checkpoint folder (or its ``checkpoint.json``); ``kind`` checks ``state["kind"]``.

    Legacy pickled ``checkpoint.pt`` files are refused: unpickling can run arbitrary code.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_JSON
    if p.suffix in (".pt", ".pth", ".bin", ".pkl"):
        raise SynthgenError(
            f"{p} is a pickled checkpoint; synthgen does not unpickle (it can run code). "
            f"Point at a checkpoint folder holding {CHECKPOINT_JSON} and {MODEL_FILE}"
        )
    if not p.is_file():
        raise SynthgenError(f"no checkpoint at {p.parent if p.name == CHECKPOINT_JSON else p}")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SynthgenError(f"{p} is not a readable checkpoint ({type(exc).__name__}); it is damaged or not a synthgen checkpoint") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SynthgenError(f"{p} is not a synthgen checkpoint (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if kind is not None and doc.get("kind") != kind:
        raise SynthgenError(f"{p} is a {doc.get('kind')!r} checkpoint, not {kind!r}")
    ck = Checkpoint(doc)
    ck.path = p
    return ck


def load_model_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """``module.load_state_dict(tensors)`` with a one-line error for another model's weights."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise SynthgenError(f"{where} holds the weights of another model: {'; '.join(parts)}")
    module.load_state_dict(tensors)
