"""Object storage: builds through ``s3://`` on a real S3-compatible server (moto's server mode, a
separate process), kill -9 then resume, two ranks sharing a bucket, reading back with
``load_dataset`` and ``synthgen cas``; lease claims; and bad URLs as one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moto_s3 import BUCKET
from synthgen.cli import main as cli_main
from test_executors import REPO, build_args, clean_env, shard_bytes

pytest.importorskip("s3fs")
CIFAR = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"
EXPECTED = sorted(
    [f"data/train-{i:05d}-of-00006.parquet" for i in range(6)]
    + [f".synthgen/done/train-{i:05d}-of-00006.json" for i in range(6)]
    + [".synthgen/plan.json", "README.md", "synthgen_manifest.json"]
)


@pytest.fixture
def fs(s3):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    yield fs


def objects(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    root = f"{BUCKET}/{prefix}".rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(root))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_pipeline_path) -> Path:
    out = tmp_path_factory.mktemp("reference") / "ds"
    run = subprocess.run([sys.executable, "-m", "synthgen", *build_args(out)], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return out


def s3_shards(fs, prefix: str) -> dict[str, bytes]:
    return {name.rsplit("/", 1)[-1]: fs.cat_file(f"{BUCKET}/{prefix}/{name}")
            for name in objects(fs, prefix) if name.startswith("data/")}


# --------------------------------------------------------------------------------------------------
# leases (memory://: one process, no server)
# --------------------------------------------------------------------------------------------------
def test_a_lease_is_exclusive_renewed_and_taken_over_when_it_expires(monkeypatch):
    from synthgen.dataset.storage import open_store

    monkeypatch.setenv("SYNTHGEN_LEASE_SECONDS", "1.5")
    store = open_store("memory://leases")
    first, second = store.claim("shard-a"), store.claim("shard-a")
    assert first.acquire() and not second.acquire()
    time.sleep(2.5)  # longer than the lease: its holder's renewals keep it
    assert not second.acquire()
    first._stop.set()  # the holder dies: no more renewals, no release
    first._renewer.join()
    time.sleep(1.6)
    assert second.acquire()  # expired: taken over
    owner = json.loads(store.read_bytes(".synthgen/leases/shard-a.json"))["owner"]
    assert owner == second.owner
    second.release()
    assert store.listing(".synthgen/leases") == {}
    with store.claim("shard-b") as held:
        assert held and "shard-b.json" in store.listing(".synthgen/leases")


# --------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------
def test_s3_build_killed_then_resumed_has_exactly_the_planned_rows(s3, fs, reference):
    from datasets import load_dataset

    url = f"s3://{BUCKET}/killed"
    args = [sys.executable, "-m", "synthgen", *build_args(url)]
    proc = subprocess.Popen(args, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len([n for n in objects(fs, "killed") if n.startswith(".synthgen/done/")]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [n for n in objects(fs, "killed") if n.startswith(".synthgen/done/")]
    assert 2 <= len(done) < 6, "the build must be killed in the middle"
    assert "synthgen_manifest.json" not in objects(fs, "killed")

    again = subprocess.run(args, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{len(done)} already done" in again.stdout and "complete" in again.stdout
    assert objects(fs, "killed") == EXPECTED  # no leases, no temp objects, nothing else
    assert s3_shards(fs, "killed") == shard_bytes(reference)  # the same bytes as a local one-process build
    manifest = json.loads(fs.cat_file(f"{BUCKET}/killed/synthgen_manifest.json"))
    assert manifest["rows"] == 24 and [m["sha256"] for m in manifest["shards"]] == [
        hashlib.sha256(b).hexdigest() for b in s3_shards(fs, "killed").values()]
    # credentials are never written
    for name in objects(fs, "killed"):
        assert s3["AWS_SECRET_ACCESS_KEY"].encode() not in fs.cat_file(f"{BUCKET}/killed/{name}")

    # datasets reads it back through storage_options
    options = {"key": s3["AWS_ACCESS_KEY_ID"], "secret": s3["AWS_SECRET_ACCESS_KEY"],
               "endpoint_url": s3["AWS_ENDPOINT_URL"]}
    ds = load_dataset("parquet", data_files={"train": f"{url}/data/train-*.parquet"}, storage_options=options,
                      split="train", cache_dir=str(reference.parent / "hf-cache"))
    assert sorted(ds["index"]) == list(range(24)) and ds.features["label"].names[0] == "airplane"
    assert type(ds.features["image"]).__name__ == "Image" and ds[5]["image"].size == (32, 32)


def test_two_ranks_share_an_s3_folder(s3, fs, reference):
    url = f"s3://{BUCKET}/ranks"
    procs = [subprocess.Popen([sys.executable, "-m", "synthgen", *build_args(url)], cwd=REPO,
                              env=clean_env(RANK=str(r), WORLD_SIZE="2"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    assert objects(fs, "ranks") == EXPECTED
    assert s3_shards(fs, "ranks") == shard_bytes(reference)
    ranks = {json.loads(fs.cat_file(f"{BUCKET}/ranks/.synthgen/done/train-{i:05d}-of-00006.json"))["worker"]["rank"]
             for i in range(2)}
    assert ranks == {0, 1}  # each rank made its own first shard


@pytest.mark.skipif(not CIFAR.is_dir(), reason="real CIFAR-10 not found beside the clone")
def test_cas_and_load_image_dataset_read_an_s3_build(s3, fs, tmp_path, capsys):
    from synthgen.train.data import load_image_dataset

    url = f"s3://{BUCKET}/ranks"  # built by the test above, or here
    if "synthgen_manifest.json" not in objects(fs, "ranks"):
        assert cli_main(build_args(url)) == 0
    options = {"endpoint_url": s3["AWS_ENDPOINT_URL"]}
    ds = load_image_dataset(url, "train", storage_options=options, cache=False)
    assert len(ds) == 24 and ds.class_names[:2] == ["airplane", "automobile"] and ds.image_size == (32, 32)
    out = tmp_path / "cas.json"
    rc = cli_main(["cas", url, "--real", str(CIFAR), "--set", "epochs=1", "--set", "batch_size=8",
                   "--set", "real_fit=20", "--set", "real_val=20", "--set", "limit_real_test=100",
                   "--threads", "1", "-q", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["runs"][0]["n_images"] == 24


@pytest.mark.parametrize("url, message", [
    ("s3://no-such-bucket-xyz/ds", "bucket 'no-such-bucket-xyz' does not exist"),
    ("gs://some-bucket/ds", "install gcsfs"),
    ("nosuch://x/ds", "unknown storage protocol 'nosuch'"),
])
def test_a_bad_storage_url_is_one_line_and_writes_nothing(s3, fs, capsys, url, message):
    before = objects(fs, "")
    assert cli_main(build_args(url)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert objects(fs, "") == before


def test_an_unreachable_endpoint_says_so_not_no_bucket(monkeypatch, capsys):
    """s3fs's exists() answers False when it cannot connect; the error names the connection."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # not one cached for the moto server of other tests
    assert cli_main(["verify", "s3://some-bucket/ds"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: storage error at s3://some-bucket/ds"), err
    assert "EndpointConnectionError" in err[0] and "does not exist" not in err[0], err


def test_a_secret_in_the_url_is_never_printed(s3, fs, capsys):
    """s3fs takes no credentials from the URL: its error quotes the bucket name, secret and all."""
    url = f"s3://AKIAUSER:not-a-real-secret-42@{BUCKET}/ds"
    before = objects(fs, "")
    for args in (build_args(url), ["verify", url]):
        assert cli_main(args) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: storage error at s3://{BUCKET}/ds"), err
        assert "not-a-real-secret-42" not in err[0] and "***@" in err[0], err
    assert objects(fs, "") == before


def test_refused_credentials_say_to_check_them(monkeypatch, capsys):
    from moto_s3 import moto_server

    import s3fs

    with moto_server(auth=True) as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            assert cli_main(build_args("s3://some-bucket/ds")) == 1
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "PermissionError" in err[0] and "check the credentials" in err[0], err
    assert env["AWS_SECRET_ACCESS_KEY"] not in err[0]
