"""File-system errors are one line, never a traceback: read-only folders, a parent that is a file,
a full disk (during a shard and during the manifest; the resume after freeing space works),
preview into a read-only folder, regenerate into a missing folder or from a damaged shard. A
finished build on read-only storage is a no-op success.

Real file systems, not patched calls: the scenario runs in a private mount namespace
(``unshare --mount``) on small tmpfs mounts it can fill up and remount read-only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RECIPE = {
    "name": "fs",
    "seed": 1,
    "count": 8,
    "prompts": {"kind": "wordnet", "classes": "cifar10", "templates": ["{c}"]},
    "generator": {"model": "builtin:tiny-sd", "scheduler": "ddim", "steps": 2, "guidance_scale": 2.0,
                  "height": 32, "width": 32, "dtype": "float32", "batch_size": 4, "device": "cpu"},
    "output": {"images_per_shard": 4, "image_format": "png"},
}

# Runs inside the namespace: each step calls the CLI in-process and records (rc, stdout, stderr).
SCENARIO = r'''
import contextlib, io, json, os, shutil, subprocess, sys
from pathlib import Path
from synthgen.cli import main

tmp, recipe = Path(sys.argv[1]), sys.argv[2]
results = {}

def mount(where, options):
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)

def remount(where, options):
    subprocess.run(["mount", "-o", "remount," + options, str(where)], check=True)

def step(name, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except BaseException as exc:  # a traceback is what the test looks for
            import traceback
            traceback.print_exc(file=err)
            rc = "raised"
    results[name] = {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}

ro = tmp / "ro"
mount(ro, "size=1m")
remount(ro, "ro")
step("readonly_new", "build", recipe, "--out", str(ro / "ds"), "-q")
(tmp / "afile").write_text("x")
step("parent_is_file", "build", recipe, "--out", str(tmp / "afile" / "ds"), "-q")

full = tmp / "full"
mount(full, "size=40k")
ds = full / "ds"
step("disk_full_shard", "build", recipe, "--out", str(ds), "-q")
results["temp_files_after_disk_full"] = sorted(p.name for p in full.rglob(".tmp-*"))
remount(full, "size=4m")
step("resume_after_freeing_space", "build", recipe, "--out", str(ds), "-q")

(ds / "synthgen_manifest.json").unlink()
(ds / "README.md").unlink()
with open(full / "filler", "wb", buffering=0) as f:  # fill the disk to the last block
    try:
        while True:
            f.write(b"\0" * 4096)
    except OSError:
        pass
step("disk_full_manifest", "build", recipe, "--out", str(ds), "-q")
(full / "filler").unlink()
step("manifest_after_freeing_space", "build", recipe, "--out", str(ds), "-q")

shutil.copytree(ds, tmp / "copy")
remount(full, "ro")
step("complete_build_on_readonly", "build", recipe, "--out", str(ds), "-q")
step("verify_readonly", "verify", str(ds))
step("preview_readonly", "preview", str(ds), "--out", str(ds / "preview.png"))
step("regenerate_missing_folder", "regenerate", str(ds), "1", "-o", str(tmp / "new" / "sub" / "row1.png"))

shard = tmp / "copy" / "data" / "train-00000-of-00002.parquet"
data = bytearray(shard.read_bytes())
data[-12:-4] = bytes(b ^ 0xFF for b in data[-12:-4])
shard.write_bytes(bytes(data))
step("regenerate_corrupt_shard", "regenerate", str(tmp / "copy"), "1", "-o", str(tmp / "corrupt.png"))
results["corrupt_png_written"] = (tmp / "corrupt.png").exists()
print(json.dumps(results))
'''


def _namespace_prefix() -> list[str] | None:
    """``unshare`` arguments for a private mount namespace, or None where none can be made."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, timeout=60)
    return prefix if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, tiny_pipeline_path):
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (needs unshare --mount)")
    tmp = tmp_path_factory.mktemp("fs")
    recipe = tmp / "fs.yaml"
    recipe.write_text(json.dumps(RECIPE))
    script = tmp / "scenario.py"
    script.write_text(textwrap.dedent(SCENARIO))
    run = subprocess.run([*prefix, sys.executable, str(script), str(tmp), str(recipe)],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    results["tmp"] = tmp
    return results


def one_error_line(result: dict) -> str:
    assert result["rc"] == 1, result
    assert "Traceback" not in result["err"], result["err"]
    lines = [line for line in result["err"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result["err"]
    return lines[0]


def test_read_only_output_folder(scenario):
    line = one_error_line(scenario["readonly_new"])
    assert "read-only" in line


def test_output_path_under_a_file(scenario):
    line = one_error_line(scenario["parent_is_file"])
    assert "afile" in line and "is a file" in line


def test_disk_full_during_a_shard_then_resume(scenario):
    line = one_error_line(scenario["disk_full_shard"])
    assert "disk full" in line and "run the same command again" in line
    assert scenario["temp_files_after_disk_full"] == []  # the half-written temp file is gone
    resumed = scenario["resume_after_freeing_space"]
    assert resumed["rc"] == 0 and "complete" in resumed["out"], resumed


def test_disk_full_while_writing_the_manifest_then_resume(scenario):
    line = one_error_line(scenario["disk_full_manifest"])
    assert "disk full" in line
    again = scenario["manifest_after_freeing_space"]
    assert again["rc"] == 0 and "complete" in again["out"]


def test_a_finished_build_on_read_only_storage_is_a_no_op(scenario):
    result = scenario["complete_build_on_readonly"]
    assert result["rc"] == 0 and result["err"] == "" and "complete" in result["out"]
    assert scenario["verify_readonly"]["rc"] == 0


def test_preview_into_a_read_only_folder(scenario):
    line = one_error_line(scenario["preview_readonly"])
    assert "read-only" in line and "preview.png" in line


def test_regenerate_into_a_missing_folder_creates_it(scenario):
    result = scenario["regenerate_missing_folder"]
    assert result["rc"] == 0, result["err"]
    assert (scenario["tmp"] / "new" / "sub" / "row1.png").is_file()


def test_regenerate_from_a_damaged_shard_writes_nothing(scenario):
    line = one_error_line(scenario["regenerate_corrupt_shard"])
    assert "train-00000-of-00002.parquet is damaged" in line
    assert scenario["corrupt_png_written"] is False
