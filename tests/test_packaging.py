"""The package as users install it: a wheel (not editable) carries the recipes, prompt tables and
training recipes, found through importlib.resources, and the CLI works from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_in_the_wheel_list():
    """pyproject.toml lists packages (the data folders are mapped in, which `find` cannot do):
    a new subpackage of synthgen/ must be added there or the wheel would lack it."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "synthgen").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(on_disk - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert {"synthgen._data.recipes", "synthgen._data.prompts", "synthgen._data.train"} <= listed


def test_data_folders_resolve_in_a_checkout():
    from synthgen.paths import PROMPTS_DIR, RECIPES_DIR, TRAIN_RECIPES_DIR

    assert RECIPES_DIR == REPO / "recipes" and PROMPTS_DIR == REPO / "prompts" and TRAIN_RECIPES_DIR == REPO / "train"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_builds_demo(tmp_path, tiny_pipeline_path):
    # Build from a copy of the sources, so the build leaves nothing in the repository.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("synthgen", "recipes", "prompts", "train"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    wheel = next(dist.glob("synthgen-*.whl"))

    # A fresh venv with the wheel installed; then the heavy third-party packages come from this
    # venv through a .pth line (added after the install, so pip sees no other synthgen; a folder a
    # .pth file adds is on sys.path, but its own .pth files, e.g. an editable synthgen, are not run).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "SYNTHGEN_RECIPES"}}
    run = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=300, env=clean)
    assert run.returncode == 0, run.stderr
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert (Path(purelib) / "synthgen" / "_data" / "recipes" / "demo.yaml").is_file()
    Path(purelib, "dev-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean
    where = subprocess.run([str(python), "-c", "import synthgen.paths as p; print(p.__file__); print(p.RECIPES_DIR)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env, check=True).stdout.split()
    assert where[0].startswith(purelib) and where[1] == str(Path(purelib) / "synthgen" / "_data" / "recipes")

    synthgen = str(venv / "bin" / "synthgen")
    listed = subprocess.run([synthgen, "recipes", "list"], capture_output=True, text=True, cwd=elsewhere, env=env,
                            timeout=300)
    assert listed.returncode == 0, listed.stderr
    for name in ("demo", "imagenet-sd", "imagenet100-sd", "stablerep-cc3m", "combinatorial"):
        assert name in listed.stdout
    built = subprocess.run([synthgen, "build", "demo", "--limit", "20", "-q"], capture_output=True, text=True,
                           cwd=elsewhere, env=env, timeout=600)
    assert built.returncode == 0, built.stderr
    assert "first 20 images built" in built.stdout
    checked = subprocess.run([synthgen, "verify", "outputs/demo"], capture_output=True, text=True, cwd=elsewhere,
                             env=env, timeout=300)
    assert checked.returncode == 0 and "ok; 20 rows" in checked.stdout, checked.stdout + checked.stderr
