"""The pipelined writer (``output.writer: pipelined``, the default): shards are resized, encoded and
written in a background thread while the generator makes the next shard.

* it writes the same bytes as the serial writer (1 and 2 shards in flight);
* memory is bounded: with a slow writer the generator runs ahead only until ``shards_in_flight``
  shards wait for the writer (counted: live generated shards, and their rows), then waits;
* ``kill -9`` while the background thread is inside a write (temp file written, not renamed; file
  renamed, marker not written) resumes to exactly the planned rows, byte-identical to an
  uninterrupted serial build;
* a real full disk during a background write is one error line, a non-zero exit and a stopped
  build, with nothing half-written marked; freeing space and rerunning completes it.

The kill and disk-full cases run ``synthgen build`` in a real subprocess through a small driver that
pauses the writer thread at an exact point of one shard's write (the test then kills it there, or
fills the disk before letting it go on): the only thing it changes is *when* the write happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_resume import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_path):
    from synthgen.generate import load_pipeline

    return load_pipeline(tiny().generator)


def build(recipe, out, loaded, **kw):
    from synthgen.dataset import build_dataset

    return build_dataset(recipe, out, progress=False, loaded_pipeline=loaded, **kw)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "data").glob("*.parquet"))}


def markers(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / ".synthgen" / "done").glob("*.json"))]


# --------------------------------------------------------------------------------------------------
# same bytes, bounded memory (in process, the tiny pipeline)
# --------------------------------------------------------------------------------------------------
def test_pipelined_shards_are_byte_identical_to_serial_ones(tmp_path, loaded):
    from synthgen.dataset import verify_dataset

    stored = {"output.image_size": 16}  # the writer's threads resize 32 px -> 16 px
    folders = {}
    for mode, in_flight in [("serial", 1), ("pipelined", 1), ("pipelined", 2)]:
        out = folders[(mode, in_flight)] = tmp_path / f"{mode}-{in_flight}"
        recipe = tiny(**stored, **{"output.writer": mode, "output.shards_in_flight": in_flight})
        result = build(recipe, out, loaded)
        assert result.dataset_complete and result.shards_written == 3 and result.shards_skipped == 0
        assert verify_dataset(out).ok
        expected = {"mode": "serial"} if mode == "serial" else {"mode": "pipelined", "shards_in_flight": in_flight}
        assert [m["writer"] for m in markers(out)] == [expected] * 3  # runtime info, in every marker
        manifest = json.loads((out / "synthgen_manifest.json").read_text())
        assert [s["writer"] for s in manifest["shards"]] == [expected] * 3
    serial = shard_bytes(folders[("serial", 1)])
    assert len(serial) == 3
    assert shard_bytes(folders[("pipelined", 1)]) == serial
    assert shard_bytes(folders[("pipelined", 2)]) == serial
    image = pq.read_table(folders[("pipelined", 1)] / "data" / "train-00000-of-00003.parquet").column("image")[0]
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(image["bytes"].as_py())).size == (16, 16)
    # the writer is runtime: out of the hashes, and the folder resumes across a change of it (nothing to redo)
    for key, value in [("output.writer", "serial"), ("output.shards_in_flight", 3)]:
        other = tiny(**stored, **{key: value})
        assert (other.recipe_hash(), other.settings_hash()) == (tiny(**stored).recipe_hash(), tiny(**stored).settings_hash())
    again = build(tiny(**stored, **{"output.writer": "serial"}), folders[("pipelined", 2)], loaded)
    assert again.dataset_complete and again.shards_written == 0 and again.shards_skipped == 3


class Alive:
    """Generated shards still in memory (weak references: a shard the writer let go is gone)."""

    def __init__(self) -> None:
        self.refs: dict[int, weakref.ref] = {}

    def add(self, shard) -> None:
        self.refs[id(shard)] = weakref.ref(shard, lambda _, key=id(shard): self.refs.pop(key, None))

    def shards(self) -> list:
        return [s for s in (r() for r in list(self.refs.values())) if s is not None]


@pytest.mark.parametrize("in_flight", [1, 2])
def test_memory_is_bounded_by_the_shards_in_flight(tmp_path, loaded, monkeypatch, in_flight):
    """A writer slower than the generator: generated shards pile up to the bound, never past it."""
    from synthgen.dataset.shard_task import ShardMaker

    alive = Alive()  # generated shards not yet freed
    peak = {"shards": 0, "rows": 0}
    lock = threading.Lock()
    generate, write = ShardMaker._generate, ShardMaker.write

    def note() -> None:
        with lock:
            shards = alive.shards()
            peak["shards"] = max(peak["shards"], len(shards))
            peak["rows"] = max(peak["rows"], sum(len(s.rows) for s in shards))

    def counted_generate(self, spec, advance):
        shard = generate(self, spec, advance)
        alive.add(shard)
        note()
        return shard

    def slow_write(self, shard):
        note()
        time.sleep(0.4)  # far slower than generating a shard of 2 tiny images
        return write(self, shard)

    monkeypatch.setattr(ShardMaker, "_generate", counted_generate)
    monkeypatch.setattr(ShardMaker, "write", slow_write)
    recipe = tiny(**{"count": 16, "output.images_per_shard": 2, "generator.batch_size": 2,
                     "output.shards_in_flight": in_flight})
    out = tmp_path / "ds"
    result = build(recipe, out, loaded)
    assert result.dataset_complete and result.shards_written == 8
    # the generator ran ahead of the writer (the bound was reached), and no further
    assert peak["shards"] == in_flight + 1, peak
    assert peak["rows"] <= (in_flight + 1) * 2, peak
    # the manifest was written after the last write: it lists every shard
    manifest = json.loads((out / "synthgen_manifest.json").read_text())
    assert manifest["rows"] == 16 and len(manifest["shards"]) == 8 and manifest["complete"]


def test_serial_writer_holds_one_shard(tmp_path, loaded, monkeypatch):
    from synthgen.dataset.shard_task import ShardMaker

    alive = Alive()
    most = []
    generate = ShardMaker._generate

    def counted_generate(self, spec, advance):
        shard = generate(self, spec, advance)
        alive.add(shard)
        most.append(len(alive.shards()))
        return shard

    monkeypatch.setattr(ShardMaker, "_generate", counted_generate)
    recipe = tiny(**{"count": 8, "output.images_per_shard": 2, "generator.batch_size": 2, "output.writer": "serial"})
    assert build(recipe, tmp_path / "ds", loaded).shards_written == 4
    assert most == [1, 1, 1, 1]


# --------------------------------------------------------------------------------------------------
# a real subprocess, paused inside one shard's background write
# --------------------------------------------------------------------------------------------------
SETTINGS = ["count=12", "output.images_per_shard=4", "generator.steps=2", "generator.height=32",
            "generator.width=32", "generator.batch_size=2", "generator.device=cpu"]

# `python driver.py build ...`: synthgen's CLI, with the writer thread paused at PAUSE_POINT of shard
# PAUSE_SHARD's file until RELEASE exists (it never does when the test kills the process there).
DRIVER = r'''
import os, sys, threading, time
from pathlib import Path

from synthgen.cli import main
from synthgen.dataset import storage

shard, point = os.environ["PAUSE_SHARD"], os.environ["PAUSE_POINT"]
paused, release = Path(os.environ["PAUSED"]), Path(os.environ["RELEASE"])
write_whole = storage.atomic_write_bytes


def pause():
    paused.write_text(threading.current_thread().name)
    while not release.exists():
        time.sleep(0.01)


def atomic_write_bytes(path, data):
    if not (path.name.startswith(shard) and path.suffix == ".parquet"):
        return write_whole(path, data)
    if point == "before-write":
        pause()
        return write_whole(path, data)
    if point == "temp-file":  # written, not yet fsynced and renamed
        return storage.write_atomically(path, lambda tmp: (tmp.write_bytes(data), pause()))
    write_whole(path, data)  # "before-marker": the file is in place, its marker not yet written
    pause()


storage.atomic_write_bytes = atomic_write_bytes
sys.exit(main(sys.argv[1:]))
'''


def build_args(out: Path, *settings: str) -> list[str]:
    args = ["build", "demo", "--out", str(out), "-q"]
    for item in [*SETTINGS, *settings]:
        args += ["--set", item]
    return args


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process


def start_paused(tmp: Path, out: Path, shard: str, point: str) -> tuple[subprocess.Popen, Path, Path]:
    driver = tmp / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    paused, release = tmp / f"paused-{point}", tmp / f"release-{point}"
    env = {**one_thread_env(), "PAUSE_SHARD": shard, "PAUSE_POINT": point, "PAUSED": str(paused),
           "RELEASE": str(release)}
    proc = subprocess.Popen([sys.executable, str(driver), *build_args(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not paused.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the build never reached {point} of {shard}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.01)
    time.sleep(0.05)  # the thread name is written
    return proc, paused, release


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthgen", *args], cwd=REPO, env=one_thread_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_kill_9_inside_background_writes_then_resume_is_byte_identical(tmp_path, tiny_pipeline_path):
    from synthgen.dataset import verify_dataset

    reference = tmp_path / "reference"
    done = cli(*build_args(reference, "output.writer=serial"))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "ds"
    name1, name2 = "train-00001-of-00003", "train-00002-of-00003"

    # 1: killed with shard 1's temp file written, not renamed
    proc, paused, _ = start_paused(tmp_path, out, name1, "temp-file")
    assert paused.read_text().startswith("synthgen-writer")  # a background write, not the main thread
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in (out / "data").glob(".tmp-*")] == [f".tmp-{name1}.parquet.{proc.pid}"]
    assert not (out / "data" / f"{name1}.parquet").exists()
    assert [m["shard"] for m in markers(out)] == ["train-00000-of-00003"]

    # 2: the resume is killed with shard 2's file in place, its marker not written
    proc, paused, _ = start_paused(tmp_path, out, name2, "before-marker")
    assert paused.read_text().startswith("synthgen-writer")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "data" / f"{name2}.parquet").exists()
    assert [m["shard"] for m in markers(out)] == ["train-00000-of-00003", name1]  # shard 2 is not done
    assert not (out / "synthgen_manifest.json").exists()

    # 3: a plain resume finishes: exactly the planned rows, the same bytes as the serial build
    done = cli(*build_args(out))
    assert done.returncode == 0, done.stderr
    assert shard_bytes(out) == shard_bytes(reference)
    indices = [i for p in sorted((out / "data").glob("*.parquet"))
               for i in pq.read_table(p, columns=["index"]).column("index").to_pylist()]
    assert indices == list(range(12))
    assert list(out.rglob(".tmp-*")) == []
    assert verify_dataset(out).ok
    assert json.loads((out / "synthgen_manifest.json").read_text())["rows"] == 12


# Runs inside a private mount namespace (see test_fs_errors.py): a real tmpfs fills up while the
# writer thread is paused before shard 1's file; then the write goes on and fails.
DISK_FULL = r'''
import contextlib, hashlib, json, os, subprocess, sys, time
from pathlib import Path

tmp, python, driver = Path(sys.argv[1]), sys.executable, sys.argv[2]
args = json.loads(sys.argv[3])
full = tmp / "full"
full.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)], check=True)
out = full / "ds"
paused, release = tmp / "paused", tmp / "release"
env = {**os.environ, "PAUSE_SHARD": "train-00001-of-00003", "PAUSE_POINT": "before-write",
       "PAUSED": str(paused), "RELEASE": str(release)}
args = [a.replace("@OUT@", str(out)) for a in args]
proc = subprocess.Popen([python, driver, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
deadline = time.monotonic() + 300
while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
results = {"paused": paused.exists()}
with open(full / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
    while True:  # to the disk's last block
        f.write(bytes(4096))
release.write_text("go")
stdout, stderr = proc.communicate(timeout=300)
results["failed"] = {"rc": proc.returncode, "err": stderr, "thread": paused.read_text() if paused.exists() else ""}
results["markers"] = sorted(p.name for p in (out / ".synthgen" / "done").glob("*.json"))
results["data"] = sorted(p.name for p in (out / "data").iterdir())
results["manifest"] = (out / "synthgen_manifest.json").exists()
(full / "filler").unlink()
resumed = subprocess.run([python, "-m", "synthgen", *args], capture_output=True, text=True)
results["resumed"] = {"rc": resumed.returncode, "err": resumed.stderr[-2000:]}
results["digests"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").glob("*.parquet"))}
results["temp_files"] = sorted(str(p) for p in out.rglob(".tmp-*"))
print(json.dumps(results))
'''


@pytest.mark.slow
def test_a_disk_full_in_a_background_write_is_one_line_and_stops_the_build(tmp_path, tiny_pipeline_path):
    from test_fs_errors import _namespace_prefix

    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (needs unshare --mount)")
    reference = tmp_path / "reference"
    done = cli(*build_args(reference, "output.writer=serial"))
    assert done.returncode == 0, done.stderr
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    script = tmp_path / "disk_full.py"
    script.write_text(textwrap.dedent(DISK_FULL))
    run = subprocess.run([*prefix, sys.executable, str(script), str(tmp_path), str(driver),
                          json.dumps(build_args(Path("@OUT@")))],
                         capture_output=True, text=True, cwd=REPO, env=one_thread_env(), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results["paused"]
    failed = results["failed"]
    assert failed["thread"].startswith("synthgen-writer")  # the failing write ran in the background
    assert failed["rc"] == 1 and "Traceback" not in failed["err"], failed
    lines = [line for line in failed["err"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk full"), lines
    assert "run the same command again" in lines[0]
    # the build stopped: shard 0 alone is marked; shard 1 has no file, shard 2 was never written
    assert results["markers"] == ["train-00000-of-00003.json"], results
    assert results["data"] == ["train-00000-of-00003.parquet"], results
    assert not results["manifest"]
    assert results["resumed"]["rc"] == 0, results["resumed"]
    reference_digests = {name: hashlib.sha256(data).hexdigest() for name, data in shard_bytes(reference).items()}
    assert results["digests"] == reference_digests
    assert results["temp_files"] == []
