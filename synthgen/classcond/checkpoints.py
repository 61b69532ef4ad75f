"""Per-epoch checkpoints of a training stage: safetensors for tensors, JSON for the rest.

A stage folder holds ``epoch-0001/``, ``epoch-0002/``, ... Each is written under a temporary name
and renamed into place when complete, so an ``epoch-NNNN`` folder that exists is whole, and a run
killed mid-write leaves only a ``.epoch-NNNN.tmp*`` folder, removed on the next start. Each holds:

* the trained weights (``save_pretrained`` layout of the module, or a LoRA adapter's);
* ``trainer_state.json`` -- epoch, global step, loss history, stage settings, the learning-rate
  schedule's state and the optimizer's hyper-parameters;
* ``optimizer.safetensors`` -- the optimizer's moment tensors, kept in the newest epoch only (older
  epochs keep just the weights, which is all that tuning and generation read).

Nothing here is unpickled: resuming reads JSON and safetensors only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from synthgen.errors import SynthgenError

__all__ = [
    "epoch_dir",
    "list_epochs",
    "require_epoch",
    "write_epoch",
    "read_state",
    "optimizer_tensors",
    "load_optimizer",
    "remove_partial",
    "load_module_weights",
    "STATE_FILE",
    "OPTIMIZER_FILE",
]

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_EPOCH = re.compile(r"^epoch-(\d{4,})$")


def epoch_dir(stage_dir: Path, epoch: int) -> Path:
    return Path(stage_dir) / f"epoch-{epoch:04d}"


def list_epochs(stage_dir: str | os.PathLike) -> list[int]:
    """The finished epochs in ``stage_dir``, ascending."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = []
    for p in stage_dir.iterdir():
        m = _EPOCH.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append(int(m.group(1)))
    return sorted(found)


def require_epoch(stage_dir: Path, epoch: int | None, what: str) -> int:
    """``epoch`` if ``stage_dir`` has it (None: the last one); SynthgenError naming what exists."""
    have = list_epochs(stage_dir)
    if not have:
        raise SynthgenError(f"no {what} checkpoints in {stage_dir}; train that stage first")
    if epoch is None:
        return have[-1]
    if epoch not in have:
        raise SynthgenError(f"{what} epoch {epoch} does not exist in {stage_dir} (finished epochs: {_ranges(have)})")
    return epoch


def _ranges(values: list[int]) -> str:
    parts, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)


def remove_partial(stage_dir: Path) -> None:
    """Delete temporary epoch folders a killed run left behind (call on the main process only)."""
    if stage_dir.is_dir():
        for p in stage_dir.iterdir():
            if p.name.startswith(".epoch-") and ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def write_epoch(
    stage_dir: Path,
    epoch: int,
    save_weights: Callable[[Path], None],
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
) -> Path:
    """Write epoch ``epoch``'s checkpoint atomically; drop the optimizer state of older epochs."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = epoch_dir(stage_dir, epoch)
    tmp = stage_dir / f".{final.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(tmp)
    if optimizer is not None:
        tensors, groups = optimizer_tensors(optimizer)
        save_file(tensors, tmp / OPTIMIZER_FILE)
        state = {**state, "optimizer_param_groups": groups}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str) + "\n")
    if final.exists():  # a rerun of an epoch whose folder survived: replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    for older in list_epochs(stage_dir):
        if older < epoch:
            (epoch_dir(stage_dir, older) / OPTIMIZER_FILE).unlink(missing_ok=True)
    return final


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise SynthgenError(f"cannot read {folder / STATE_FILE}: {type(exc).__name__}") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's state as flat tensors (``"<param>.<name>"``) plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, values in sd["state"].items():
        for name, value in values.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, param_groups: list[dict]) -> None:
    """Restore ``optimizer`` from ``folder/optimizer.safetensors`` and the saved param groups."""
    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        raise SynthgenError(f"cannot resume from {folder}: its optimizer state ({OPTIMIZER_FILE}) is missing")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError) as exc:
        raise SynthgenError(f"cannot resume from {folder}: the optimizer state does not fit ({exc})") from None


def load_module_weights(module: torch.nn.Module, folder: Path, prefix: str = "diffusion_pytorch_model") -> None:
    """Load the ``save_pretrained`` weights in ``folder`` (one file or shards) into ``module``."""
    files = sorted(Path(folder).glob(f"{prefix}*.safetensors"))
    if not files:
        raise SynthgenError(f"no weights ({prefix}*.safetensors) in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SynthgenError(
            f"the weights in {folder} do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
