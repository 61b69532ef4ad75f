"""What a result was made with: library versions, CPU/GPU, host. Every manifest, result JSON and
benchmark record uses these, so they all describe the environment the same way."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable

PACKAGES = (
    "synthgen",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "accelerate",
    "huggingface-hub",
    "datasets",
    "timm",
    "numpy",
    "pyarrow",
    "pillow",
    "nltk",
    "pydantic",
)


def library_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Python's version and each installed package's (missing packages are left out)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any = None) -> dict[str, Any]:
    """The machine and library versions a result was measured with (``device``: a torch device)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info: dict[str, Any] = {
        "device": dev.type,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
        "cuda": torch.version.cuda,
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(dev)
    else:
        info["device_name"] = info["cpu"]
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
