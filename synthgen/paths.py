"""Where synthgen finds its bundled data (prompts/, recipes/, train/) and keeps its cache.

The data folders live at the top of the repository. A wheel ships them inside the package as
``synthgen/_data/{prompts,recipes,train}`` (``[tool.setuptools]`` maps them there), found with
``importlib.resources``. A source checkout (``PYTHONPATH``, or an editable install) reads the
folders beside the package directly, so an edit to a recipe takes effect without reinstalling.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def data_root() -> Path:
    """The folder holding ``prompts/``, ``recipes/`` and ``train/``."""
    checkout = Path(__file__).resolve().parents[1]
    # A checkout has pyproject.toml beside the data; an installed wheel's site-packages has not.
    # Checking the checkout first also keeps a worktree on PYTHONPATH from reading the data of
    # another copy that an editable install elsewhere maps into ``synthgen._data``.
    if (checkout / "pyproject.toml").is_file() and (checkout / "recipes").is_dir():
        return checkout
    return Path(str(files("synthgen") / "_data"))


DATA_ROOT = data_root()
PROMPTS_DIR = DATA_ROOT / "prompts"
RECIPES_DIR = DATA_ROOT / "recipes"
TRAIN_RECIPES_DIR = DATA_ROOT / "train"

#: Extra dataset-recipe folders, searched before the built-in ones (``os.pathsep``-separated).
USER_RECIPES_ENV = "SYNTHGEN_RECIPES"


def recipe_folders() -> list[Path]:
    """Folders a bare dataset-recipe name is looked up in: ``$SYNTHGEN_RECIPES`` first, then the
    built-in ``recipes/``. Read at call time, so the CLI's ``--recipes`` flag can extend it."""
    extra = [Path(p).expanduser() for p in os.environ.get(USER_RECIPES_ENV, "").split(os.pathsep) if p.strip()]
    return [*extra, RECIPES_DIR]


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
