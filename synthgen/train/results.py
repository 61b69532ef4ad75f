"""Result files: JSON with the device and library versions next to the numbers."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "write_json"]


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """The machine and library versions a result was measured with."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info: dict[str, Any] = {
        "device": dev.type,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {m: _version(m) for m in ("synthgen", "torch", "torchvision", "timm", "datasets", "numpy")},
        "cuda": torch.version.cuda,
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(dev)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` (plus a timestamp) atomically as indented JSON; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, p)
    return p
