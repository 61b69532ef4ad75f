"""Where synthgen finds its bundled data (prompts/, recipes/, train/) and keeps its cache."""

from __future__ import annotations

import os
from pathlib import Path

# The repository root: prompts/, recipes/ and train/ are data folders beside the package.
PROJECT_ROOT = Path(os.environ.get("SYNTHGEN_HOME", Path(__file__).resolve().parents[1]))
PROMPTS_DIR = PROJECT_ROOT / "prompts"
RECIPES_DIR = PROJECT_ROOT / "recipes"
TRAIN_RECIPES_DIR = PROJECT_ROOT / "train"


def cache_dir() -> Path:
    """synthgen's cache (built tiny pipelines, local WordNet copy, CAS baselines).

    ``SYNTHGEN_CACHE`` overrides it; tests point it at a temporary folder.
    """
    root = os.environ.get("SYNTHGEN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "synthgen"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
