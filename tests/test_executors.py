"""Executors: the same shards, made by real torchrun ranks, a simulated Slurm array (real processes
with the array's variables) and real Ray tasks, end byte for byte equal to a one-process build.
A rank or a Ray worker killed mid-shard leaves its shards to a rerun, a "finish what is left" pass,
or Ray's retry; bad rank variables and an unreachable Ray address are one line each."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synthgen.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SHARDS = 6
# The demo recipe, shrunk: 6 shards of 4 images, each shard ~1 s on a CPU core.
SETTINGS = ["count=24", "output.images_per_shard=4", "generator.steps=12", "generator.height=32",
            "generator.width=32", "generator.batch_size=2", "generator.device=cpu"]
# Every process on one torch thread (torchrun's and Ray's default): the reference matches bit for bit.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
             "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")


def build_args(out, *extra: str, settings=SETTINGS) -> list[str]:
    args = ["build", "demo", "--out", str(out), "-q"]
    for item in settings:
        args += ["--set", item]
    return args + list(extra)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    return {**env, **ONE_THREAD, **extra}


def synthgen(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "synthgen", *args], cwd=REPO, env=env or clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "data").glob("*.parquet"))}


def markers(folder: Path) -> dict[int, dict]:
    out = {}
    for path in sorted((folder / ".synthgen" / "done").glob("*.json")):
        marker = json.loads(path.read_text())
        out[marker["start"] // 4] = marker
    return out


def assert_exact_dataset(folder: Path, reference: Path) -> None:
    """Exactly the planned rows, no duplicates, no temp files, verified, and the same shard files
    as the one-process build, byte for byte."""
    from synthgen.dataset import verify_dataset

    indices = [i for p in sorted((folder / "data").glob("*.parquet"))
               for i in pq.read_table(p, columns=["index"]).column("index").to_pylist()]
    assert indices == list(range(24))
    assert [p for p in folder.rglob(".tmp-*")] == []
    report = verify_dataset(folder)
    assert report.ok, report.problems
    assert shard_bytes(folder) == shard_bytes(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_pipeline_path) -> Path:
    """A one-process build of the same recipe."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    proc = synthgen(*build_args(out))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert len(shard_bytes(out)) == SHARDS
    return out


# --------------------------------------------------------------------------------------------------
# rank variables
# --------------------------------------------------------------------------------------------------
def test_ranks_from_the_launchers_variables():
    from synthgen.dataset.executors import Ranks, device_for_rank, ranks_from_env

    assert ranks_from_env({}) is None
    assert ranks_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1, "RANK/WORLD_SIZE")
    assert ranks_from_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3"}).rank == 3
    array = ranks_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (array.rank, array.world_size) == (2, 4)
    # --array=1-7:2 gives ids 1, 3, 5, 7
    stepped = ranks_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4",
                              "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"})
    assert (stepped.rank, stepped.world_size) == (2, 4)
    # an array of torchrun jobs: array task 1 of 3, process 1 of 2 -> rank 3 of 6
    both = ranks_from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "2"})
    assert (both.rank, both.world_size) == (3, 6)
    assert [s for s in range(12) if s % 6 == both.rank] == [3, 9]
    # on a machine without CUDA a rank keeps the recipe's device
    assert device_for_rank("auto", 1) is None and device_for_rank("cpu", 0) is None


@pytest.mark.parametrize("env, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is out of range for WORLD_SIZE=2 (expected 0..1)"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 is out of range"),
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID=4 is out of range for SLURM_ARRAY_TASK_COUNT=4"),
    ({"SLURM_ARRAY_TASK_ID": "4"}, "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT must be set together"),
])
def test_a_bad_rank_variable_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, env, message):
    for key in RANK_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "ds"
    assert cli_main(build_args(out)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_executor_ranks_without_rank_variables_is_refused(tmp_path, monkeypatch, capsys):
    for key in RANK_VARS:
        monkeypatch.delenv(key, raising=False)
    assert cli_main(build_args(tmp_path / "ds", "--executor", "ranks")) == 1
    assert "found no rank variables" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------------
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    # accelerate's multi-GPU launcher is torchrun underneath; on a machine without GPUs it runs CPU processes
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


def assert_owners_from_the_front_helpers_from_the_end(workers: dict[int, tuple]) -> None:
    """Shard i belongs to rank i % 2, which makes its share from the front; the other rank, once
    done with its own, helps from the end. Whatever the timing (a rank that starts late may be
    helped with all of its share), each share splits into a prefix made by its owner and a suffix
    made by the helper."""
    for owner in (0, 1):
        makers = [workers[i][1] for i in range(owner, SHARDS, 2)]
        helped = makers.index(1 - owner) if 1 - owner in makers else len(makers)
        assert makers == [owner] * helped + [1 - owner] * (len(makers) - helped), (owner, makers)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_launched_ranks_split_the_shards_and_equal_a_one_process_build(tmp_path, reference, launcher):
    out = tmp_path / "ds"
    run = subprocess.run(
        [*LAUNCHERS[launcher], "-m", "synthgen", *build_args(out)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0/2:" in run.stdout and "rank 1/2:" in run.stdout
    made = markers(out)
    workers = {i: (m["worker"]["executor"], m["worker"]["rank"], m["worker"]["world_size"]) for i, m in made.items()}
    assert sorted(workers) == list(range(SHARDS)) and {(e, w) for e, _, w in workers.values()} == {("ranks", 2)}
    assert_owners_from_the_front_helpers_from_the_end(workers)
    assert_exact_dataset(out, reference)
    manifest = json.loads((out / "synthgen_manifest.json").read_text())
    assert manifest["rows"] == 24 and manifest["complete"]


# --------------------------------------------------------------------------------------------------
# a Slurm array, simulated: the same command with SLURM_ARRAY_TASK_ID=0..3, SLURM_ARRAY_TASK_COUNT=4
# --------------------------------------------------------------------------------------------------
def array_task(out: Path, task: int, *extra: str) -> subprocess.Popen:
    env = clean_env(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="4")
    return synthgen(*build_args(out, *extra), env=env)


def held_lock_pid(locks: Path, names: list[str]) -> int | None:
    """The pid written in the first of ``names``' lock files that another process holds now."""
    for name in names:
        path = locks / f"{name}.lock"
        if not path.exists():
            continue
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                text = handle.read().strip()
                if text.isdigit():
                    return int(text)
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def test_slurm_array_tasks_make_their_shares_and_a_dead_tasks_share_is_finished_later(tmp_path, reference):
    """Tasks 0..3 of 4 run at once, each its share only (shard i is task i % 4's); task 2 is killed
    (-9) in the middle of its shard. A rerun of task 2 completes the dataset: the union of the four
    shares; on a copy, task 0 run without --share-only finishes what is left instead."""
    out = tmp_path / "ds"
    procs = {task: array_task(out, task, "--share-only") for task in range(4)}
    victim = procs[2]
    deadline = time.monotonic() + 300
    while held_lock_pid(out / ".synthgen" / "locks", ["train-00002-of-00006"]) != victim.pid:
        assert time.monotonic() < deadline and victim.poll() is None, "task 2 never started its shard"
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    for task in (0, 1, 3):
        code, err = procs[task].wait(timeout=600), procs[task].stderr.read()
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        # its share is done, not the dataset: the dead task's shard is named (and any other a live
        # task was still making when this one finished)
        assert code == 3 and len(lines) == 1 and "train-00002-of-00006" in lines[0], err
    assert sorted(markers(out)) == [0, 1, 3, 4, 5] and not (out / "synthgen_manifest.json").exists()
    finish = tmp_path / "finish"
    shutil.copytree(out, finish)

    rerun = array_task(out, 2, "--share-only")
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    assert {i: m["worker"]["rank"] for i, m in markers(out).items()} == {i: i % 4 for i in range(SHARDS)}
    assert_exact_dataset(out, reference)

    helper = array_task(finish, 0)
    assert helper.wait(timeout=600) == 0, helper.stderr.read()
    assert "1 shard(s) written, 5 already done" in helper.stdout.read()
    assert markers(finish)[2]["worker"]["rank"] == 0
    assert_exact_dataset(finish, reference)


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the workers inherit the driver's environment
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


def ray_build(out: Path):
    from synthgen.dataset import build_dataset
    from synthgen.recipe import load_recipe

    return build_dataset(load_recipe("demo", SETTINGS), out, executor="ray", progress=False)


def test_ray_tasks_build_the_same_dataset(tmp_path, reference, ray_cluster):
    result = ray_build(tmp_path / "ds")
    assert result.dataset_complete and result.shards_written == SHARDS
    assert {m["worker"]["executor"] for m in markers(tmp_path / "ds").values()} == {"ray"}
    assert_exact_dataset(tmp_path / "ds", reference)


def test_a_ray_worker_killed_mid_shard_is_retried_to_exactly_the_planned_rows(tmp_path, reference, ray_cluster):
    import psutil

    out = tmp_path / "ds"
    names = [f"train-{i:05d}-of-{SHARDS:05d}" for i in range(SHARDS)]
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(result=ray_build(out)))
    driver.start()
    try:
        deadline = time.monotonic() + 300
        while (pid := held_lock_pid(out / ".synthgen" / "locks", names)) is None:
            assert time.monotonic() < deadline and driver.is_alive(), "no shard was started"
            time.sleep(0.005)
        victim = psutil.Process(pid)
        assert victim.cmdline()[0].startswith("ray::"), victim.cmdline()  # a Ray worker running a task
        victim.kill()
    finally:
        driver.join(timeout=600)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    result = outcome["result"]
    assert result.dataset_complete and result.shards_written == SHARDS
    assert_exact_dataset(out, reference)


def test_ray_overwrite_starts_a_folder_begun_with_another_model_again(tmp_path, tiny_pipeline_path, ray_cluster):
    """Regression: the Ray workers refused a folder begun with another model even with --overwrite
    (and with every target shard done the driver returned the old dataset as complete)."""
    from safetensors.torch import load_file, save_file

    from synthgen.dataset import build_dataset
    from synthgen.recipe import load_recipe

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_path, model)
    recipe = load_recipe("demo", [*SETTINGS, f"generator.model={model}"])
    out = tmp_path / "ds"

    def ray_build(**kw):
        return build_dataset(recipe, out, executor="ray", progress=False, limit=8, **kw)

    first = ray_build()  # 2 of the 6 shards: every target shard done
    weights = next((model / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name] + 0.5}, weights)
    again = ray_build(overwrite=True)
    assert (again.dataset_complete, again.complete, again.shards_written) == (False, True, 2)
    assert again.manifest["model"]["model_revision"] != first.manifest["model"]["model_revision"]
    hashes = {h for p in (out / "data").glob("*.parquet") for h in pq.read_table(p, columns=["settings_hash"]).column(0).to_pylist()}
    assert hashes == {again.manifest["settings_hash"]} != {first.manifest["settings_hash"]}
    assert {m["worker"]["executor"] for m in markers(out).values()} == {"ray"} and len(markers(out)) == 2
    assert ray_build(overwrite=True).shards_written == 0  # the same model again: nothing to restart


def test_an_unreachable_ray_address_is_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ds"
    started = time.monotonic()
    assert cli_main(build_args(out, "--ray-address", f"127.0.0.1:{port}")) == 1
    assert time.monotonic() - started < 60
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err[0], err
    assert not out.exists()
