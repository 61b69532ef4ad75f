"""Publishing to the Hub, against the local fake Hub (tests/hub_server.py) with the real
``huggingface_hub`` client, the real ``datasets.load_dataset`` and datasets built by the real
builder with the tiny pipeline."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import TOKEN, fake_hub  # noqa: F401 - the fixture

from synthgen.hub import Backoff, push_dataset

# huggingface_hub's own LFS upload passes a file as data=; httpx2 warns about it on every upload
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
FAST = Backoff(attempts=6, base=0.05, cap=0.5)  # our own commit/tag retries, quick in tests
SMALL = ["count=40", "output.images_per_shard=20", "generator.steps=2", "generator.batch_size=20",
         "generator.device=cpu"]
WRITES = r"/preupload/|/commit/|lfs/objects|^/_lfs/|/tag/|/branch/|/discussions"


def _build(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    from synthgen.dataset import build_dataset
    from synthgen.recipe import load_recipe

    folder = tmp_path_factory.mktemp(name) / "demo"
    assert build_dataset(load_recipe("demo", overrides), folder, progress=False).complete
    return folder


@pytest.fixture(scope="module")
def built_v1(tmp_path_factory, tiny_pipeline_path) -> Path:
    return _build(tmp_path_factory, "v1", SMALL)


@pytest.fixture(scope="module")
def built_v2(tmp_path_factory, tiny_pipeline_path) -> Path:
    # another version of the same dataset: other seed, more images, other shard names
    return _build(tmp_path_factory, "v2", [*SMALL, "count=60", "seed=1"])


@pytest.fixture
def v1(built_v1, tmp_path) -> Path:
    return Path(shutil.copytree(built_v1, tmp_path / "v1"))


@pytest.fixture
def v2(built_v2, tmp_path) -> Path:
    return Path(shutil.copytree(built_v2, tmp_path / "v2"))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from synthgen.cli import main

    capsys.readouterr()  # drop what earlier steps printed (e.g. upload progress bars)
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def local_table(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((folder / "data").glob("*.parquet")))


def hub_table(repo_id: str, revision: str):
    """The dataset as downstream users load it, with the stored image bytes (not re-encoded)."""
    import datasets

    ds = datasets.load_dataset(repo_id, revision=revision, split="train")
    raw = ds.cast_column("image", datasets.Image(decode=False))
    return ds, raw


def assert_same_rows(folder: Path, repo_id: str, revision: str) -> None:
    import numpy as np
    from PIL import Image

    local = local_table(folder).to_pylist()
    ds, raw = hub_table(repo_id, revision)
    assert len(ds) == len(local)
    assert ds.features["label"].names == json.loads((folder / "synthgen_manifest.json").read_text())["class_names"]
    for mine, theirs in zip(local, raw):
        assert theirs["image"]["bytes"] == mine["image"]["bytes"]  # the same pixels, bit for bit
        for column in ("index", "prompt", "label", "group", "seed", "retries", "settings_hash", "meta"):
            assert theirs[column] == mine[column], column
    first = np.asarray(Image.open(pa.BufferReader(local[0]["image"]["bytes"])).convert("RGB"))
    assert (np.asarray(ds[0]["image"].convert("RGB")) == first).all()


def writes(hub) -> list:
    return hub.calls(None, WRITES)


# --------------------------------------------------------------------------------------------------
# 1. push -> load_dataset(revision=...) returns exactly what was built; versions stay put
# --------------------------------------------------------------------------------------------------
def test_push_and_load_versions(fake_hub, v1, v2, capsys):
    fake_hub.tree_page_size = 2  # tree listings come in pages: the clients must follow them
    code, out, err = cli(capsys, "push", v1, "org/demo", "--tag", "v1.0.0")
    assert code == 0, err
    assert "v1.0.0" in out
    assert_same_rows(v1, "org/demo", "v1.0.0")

    code, _, err = cli(capsys, "push", v2, "org/demo", "--tag", "v1.1.0")
    assert code == 0, err
    assert_same_rows(v2, "org/demo", "v1.1.0")
    assert_same_rows(v1, "org/demo", "v1.0.0")  # the old version still loads the old rows
    assert_same_rows(v2, "org/demo", "main")

    repo = fake_hub.repo("org/demo")
    assert [c.sha for c in fake_hub.history("org/demo")][:2] == [repo.tags["v1.1.0"], repo.tags["v1.0.0"]]
    assert len(fake_hub.history("org/demo")) == 3  # the repo's initial commit + one per version
    # v1.1.0 replaced v1.0.0's shards on main: no stale shard would leak into data/train-*.parquet
    assert sorted(p for p in fake_hub.files("org/demo") if p.startswith("data/")) == \
        sorted(p.relative_to(v2).as_posix() for p in (v2 / "data").glob("*.parquet"))
    assert any("cursor" in r.query for r in fake_hub.calls("GET", r"/tree/"))


# --------------------------------------------------------------------------------------------------
# 2. what goes up: no build state; a card the Hub and datasets read; the manifest records the push
# --------------------------------------------------------------------------------------------------
def test_uploaded_tree_card_and_manifest(fake_hub, v1):
    from huggingface_hub import DatasetCard, HfApi
    from PIL import Image

    result = push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)
    tree = fake_hub.files("org/demo", "v1.0.0")
    shards = sorted(p.relative_to(v1).as_posix() for p in (v1 / "data").glob("*.parquet"))
    assert sorted(tree) == sorted([".gitattributes", "README.md", "preview.png", "synthgen_manifest.json", *shards])
    assert (v1 / ".synthgen" / "plan.json").is_file()  # there locally, never uploaded
    listed = [f.path for f in HfApi().list_repo_tree("org/demo", repo_type="dataset", revision="v1.0.0", recursive=True)]
    assert listed and not any(".synthgen" in path for path in listed)

    card = DatasetCard.load("org/demo", repo_type="dataset")  # through the Hub's resolve endpoint
    data = card.data
    assert data.license == "apache-2.0"  # builtin:tiny-sd: synthgen's own random weights
    assert data.size_categories == ["n<1K"]
    assert data.task_categories == ["image-classification"]
    assert data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]
    label = next(f for f in data.dataset_info["features"] if f["name"] == "label")
    assert list(label["dtype"]["class_label"]["names"].values())[:3] == ["airplane", "automobile", "bird"]
    assert {"name": "image", "dtype": "image"} in data.dataset_info["features"]
    assert "![" in card.text and "(preview.png)" in card.text
    assert "```bibtex" in card.text and "@inproceedings{sariyildiz2023fake" in card.text
    assert 'load_dataset("org/demo", revision="v1.0.0", split="train")' in card.text
    assert "| 0 | airplane | 4 |" in card.text  # per-class counts: 40 images, 10 classes
    preview = Image.open(pa.BufferReader(tree["preview.png"]))
    assert preview.format == "PNG" and preview.width >= 4 * 32

    local = json.loads((v1 / "synthgen_manifest.json").read_text())
    (record,) = local["pushes"]
    assert record["repo_id"] == "org/demo" and record["tag"] == "v1.0.0"
    assert record["commit"] == result.commit == fake_hub.repo("org/demo").tags["v1.0.0"]
    uploaded = json.loads(tree["synthgen_manifest.json"])
    assert "pushes" not in uploaded and uploaded["shards"] == local["shards"]


def test_same_tag_same_content_is_a_no_op(fake_hub, v1):
    first = push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)
    before = len(fake_hub.requests)
    again = push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)
    assert again.commit == first.commit and not again.new_commit
    assert not [r for r in fake_hub.requests[before:] if r.matches(None, WRITES)]
    assert len(json.loads((v1 / "synthgen_manifest.json").read_text())["pushes"]) == 1


# --------------------------------------------------------------------------------------------------
# 3. faults: retried; a lost commit response is not committed twice; kill -9 and re-run; the token
# --------------------------------------------------------------------------------------------------
def test_transient_faults_are_retried(fake_hub, v1):
    hub = fake_hub
    hub.fail("POST", r"/preupload/", status=429, retry_after=0)  # retried by huggingface_hub
    hub.fail("POST", r"lfs/objects/batch", status=503)
    hub.fail("PUT", r"^/_lfs/", kind="drop")
    hub.fail("POST", r"/commit/", status=500)  # sent once by huggingface_hub: retried by synthgen
    hub.fail("POST", r"/commit/", status=429, retry_after=1)
    hub.fail("POST", r"/commit/", kind="drop")
    hub.fail("POST", r"/tag/", kind="drop")
    result = push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)

    commits = hub.calls("POST", r"/commit/")
    assert [c.fault for c in commits] == ["500", "429", "drop", None] and commits[-1].status == 200
    assert commits[2].at - commits[1].at >= 1.0  # Retry-After honoured
    assert all(c.ndjson()[0]["value"]["parentCommit"] == hub.history("org/demo")[1].sha for c in commits)
    assert [c.fault for c in hub.calls("POST", r"/preupload/")][:2] == ["429", None]
    assert [c.fault for c in hub.calls("PUT", r"^/_lfs/")].count("drop") == 1
    assert len(hub.history("org/demo")) == 2  # initial commit + exactly one push commit
    assert hub.repo("org/demo").tags["v1.0.0"] == result.commit == hub.history("org/demo")[0].sha
    assert_same_rows(v1, "org/demo", "v1.0.0")


def test_lost_commit_response_does_not_commit_twice(fake_hub, v1):
    fake_hub.fail("POST", r"/commit/", kind="drop-after")  # the commit lands; its response is lost
    result = push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)
    assert len(fake_hub.calls("POST", r"/commit/")) == 1  # found it landed: not sent again
    assert len(fake_hub.history("org/demo")) == 2
    assert fake_hub.repo("org/demo").tags["v1.0.0"] == result.commit == fake_hub.history("org/demo")[0].sha


def test_partly_committed_upload_goes_on_from_there(fake_hub, v1):
    """``upload_folder`` commits a large folder in batches (with hf_xet): if one batch landed and
    the next failed, the retry builds on the landed part instead of calling it a conflict."""
    hub = fake_hub
    first_shard = sorted((v1 / "data").glob("*.parquet"))[0]

    def batch_landed(request) -> None:
        hub.put_files("org/demo", {"data/" + first_shard.name: first_shard.read_bytes()}, message="part 1")

    hub.on("POST", r"/commit/", lambda r: batch_landed(r) if len(hub.calls("POST", r"/commit/")) == 1 else None)
    hub.fail("POST", r"/commit/", status=500)
    result = push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)
    assert [c.title for c in hub.history("org/demo")][1:] == ["part 1", "initial commit"]
    assert hub.repo("org/demo").tags["v1.0.0"] == result.commit == hub.history("org/demo")[0].sha
    assert hub.calls("POST", r"/commit/")[-1].ndjson()[0]["value"]["parentCommit"] == hub.history("org/demo")[1].sha
    assert_same_rows(v1, "org/demo", "v1.0.0")


def test_repo_left_by_an_interrupted_push_is_not_another_dataset(fake_hub, v1):
    shard = sorted((v1 / "data").glob("*.parquet"))[1]
    fake_hub.put_files("org/demo", {"data/" + shard.name: shard.read_bytes()})  # no manifest yet
    push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)
    assert_same_rows(v1, "org/demo", "v1.0.0")


def run_push(hub, folder: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    environment = {**os.environ, **hub.env, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "synthgen", "push", str(folder), "org/demo", *args],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("where", ["lfs-upload", "tag"])
def test_killed_push_completes_when_run_again(fake_hub, v1, where):
    hub = fake_hub
    method, pattern = ("PUT", r"^/_lfs/") if where == "lfs-upload" else ("POST", r"/tag/")
    skip = 1 if where == "lfs-upload" else 0  # the second shard upload, or creating the tag
    seen = []
    proc = run_push(hub, v1, "--tag", "v1.0.0")

    def kill(request) -> None:
        seen.append(request)
        if len(seen) == skip + 1:
            os.kill(proc.pid, signal.SIGKILL)

    hub.on(method, pattern, kill)
    hub.fail(method, pattern, kind="drop", skip=skip)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert "v1.0.0" not in hub.repo("org/demo").tags
    commits_before = len(hub.calls("POST", r"/commit/"))
    uploads_before = len(hub.calls("PUT", r"^/_lfs/"))
    stored_before = set(hub.lfs)  # the uploads that completed before the kill

    hub.hooks.clear()
    rerun = run_push(hub, v1, "--tag", "v1.0.0")
    out2, err2 = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err2
    history = hub.history("org/demo")
    assert len(history) == 2  # one complete revision, never a duplicate commit of the same content
    assert hub.repo("org/demo").tags["v1.0.0"] == history[0].sha
    new_commits = len(hub.calls("POST", r"/commit/")) - commits_before
    new_uploads = len(hub.calls("PUT", r"^/_lfs/")) - uploads_before
    lfs_files = {blob.sha256 for blob in history[0].tree.values() if blob.is_lfs}
    assert new_uploads == len(lfs_files - stored_before)  # what was uploaded is not sent again
    if where == "tag":
        assert commits_before == 1 and new_commits == 0 and new_uploads == 0  # only the tag was missing
    else:
        assert commits_before == 0 and new_commits == 1
    assert_same_rows(v1, "org/demo", "v1.0.0")
    assert json.loads((v1 / "synthgen_manifest.json").read_text())["pushes"][0]["commit"] == history[0].sha
    assert not list((v1 / ".synthgen").glob(".synthgen-push-*"))  # the killed push's staging is gone too
    for text in (out, err, out2, err2):
        assert TOKEN not in text


def test_token_never_written_or_printed(fake_hub, v1, tmp_path):
    hub = fake_hub
    hub.fail("POST", r"/commit/", status=500)
    hub.fail("POST", r"/preupload/", status=502)
    ok = run_push(hub, v1, "--tag", "v1.0.0", env={"HF_HUB_VERBOSITY": "debug"})
    outputs = list(ok.communicate(timeout=120))
    assert ok.returncode == 0, outputs[1]
    assert "retrying" in outputs[1]  # the retry was logged...
    wrong = "hf_wrongTOKENsecret987654321zyxw"
    bad = run_push(hub, v1, "--tag", "v1.0.1", env={"HF_TOKEN": wrong})
    outputs += bad.communicate(timeout=120)
    assert bad.returncode == 1
    assert "refused the token" in outputs[-1]
    for text in outputs:
        assert TOKEN not in text and wrong not in text
    written = [p for root in (v1, hub.home, tmp_path) for p in Path(root).rglob("*") if p.is_file()]
    assert any(p.name == "synthgen_manifest.json" for p in written)
    for path in written:
        data = path.read_bytes()
        assert TOKEN.encode() not in data and wrong.encode() not in data, path
    for files in (hub.files("org/demo"),):
        assert not any(TOKEN.encode() in data for data in files.values())


def test_a_hub_error_that_echoes_the_token_is_redacted(fake_hub, v1, capsys):
    # a server (or a proxy before it) may quote the credentials it refused
    fake_hub.fail("POST", r"/preupload/", status=403, message=f"token {TOKEN} may only read")
    code, out, err = cli(capsys, "push", v1, "org/demo", "--tag", "v1.0.0")
    assert code == 1 and err.count("\n") == 1, err
    assert err == "error: the token may not write to org/demo (HTTP 403): token <token> may only read\n"
    assert TOKEN not in out + err
    assert fake_hub.calls("POST", r"/preupload/")[0].fault == "403"  # the message did come from the Hub


# --------------------------------------------------------------------------------------------------
# 4. bad input: one clear line, non-zero exit, nothing pushed
# --------------------------------------------------------------------------------------------------
def corrupt(folder: Path) -> None:
    shard = sorted((folder / "data").glob("*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


BAD_FOLDERS = {
    "no manifest": lambda f: (f / "synthgen_manifest.json").unlink(),
    "missing shard": lambda f: sorted((f / "data").glob("*.parquet"))[0].unlink(),
    "corrupt shard": corrupt,
    "stray shard": lambda f: (f / "data" / "train-00009-of-00010.parquet").write_bytes(b"x"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_incomplete_or_corrupt_folder_is_refused(fake_hub, v1, capsys, case):
    BAD_FOLDERS[case](v1)
    code, out, err = cli(capsys, "push", v1, "org/demo", "--tag", "v1.0.0")
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fake_hub.requests == []  # refused before any call


@pytest.mark.parametrize("url", ["s3://bucket/ds", "memory://ds"])
def test_an_object_store_folder_is_refused_with_what_to_do(fake_hub, capsys, url):
    code, _, err = cli(capsys, "push", url, "org/demo")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: push needs a local folder, got {url}: copy it first"), err
    assert fake_hub.requests == []


@pytest.mark.parametrize("repo_id", ["org/na me", "a/b/c", "demo", "org/--x", "org/x.git"])
def test_malformed_repo_id_is_refused(fake_hub, v1, capsys, repo_id):
    code, _, err = cli(capsys, "push", v1, repo_id)
    assert code == 1 and err.startswith("error: malformed repo id") and err.count("\n") == 1, err
    assert fake_hub.requests == []


def test_no_token_is_refused(fake_hub, v1, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = cli(capsys, "push", v1, "org/demo", "--tag", "v1.0.0")
    assert code == 1 and err == "error: no Hugging Face token: set HF_TOKEN or log in with `hf auth login`\n"
    assert fake_hub.requests == []


def test_existing_tag_with_other_content_is_refused(fake_hub, v1, v2, capsys):
    first = push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)
    before = len(fake_hub.requests)
    code, _, err = cli(capsys, "push", v2, "org/demo", "--tag", "v1.0.0")
    assert code == 1 and err.count("\n") == 1
    assert "tag v1.0.0 of org/demo already exists" in err and "never moved" in err
    assert not [r for r in fake_hub.requests[before:] if r.matches(None, WRITES)]
    assert fake_hub.repo("org/demo").tags == {"v1.0.0": first.commit}
    assert len(fake_hub.history("org/demo")) == 2


@pytest.mark.parametrize("other", ["synthgen dataset", "foreign files"])
def test_repo_holding_another_dataset_needs_force(fake_hub, v1, capsys, other):
    if other == "synthgen dataset":
        files = {"synthgen_manifest.json": json.dumps({"recipe": {"name": "imagenet-sd"}}).encode()}
    else:
        files = {"train.csv": b"text,label\nhello,0\n"}
    seeded = fake_hub.put_files("org/demo", files)
    code, _, err = cli(capsys, "push", v1, "org/demo", "--tag", "v1.0.0")
    assert code == 1 and err.count("\n") == 1 and "--force" in err and "org/demo" in err
    assert not fake_hub.calls(None, WRITES)
    assert fake_hub.history("org/demo")[0].sha == seeded and not fake_hub.repo("org/demo").tags

    code, _, err = cli(capsys, "push", v1, "org/demo", "--tag", "v1.0.0", "--force")
    assert code == 0, err
    assert_same_rows(v1, "org/demo", "v1.0.0")


# --------------------------------------------------------------------------------------------------
# branches, pull requests and models
# --------------------------------------------------------------------------------------------------
def test_branch_and_pull_request(fake_hub, v1, v2, tmp_path_factory):
    hub = fake_hub
    push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)
    main = hub.repo("org/demo").branches["main"]

    dev = push_dataset(v2, "org/demo", branch="dev", tag="v1.1.0-rc1", backoff=FAST)
    assert hub.repo("org/demo").branches["dev"] == dev.commit == hub.repo("org/demo").tags["v1.1.0-rc1"]
    assert hub.repo("org/demo").branches["main"] == main
    assert_same_rows(v2, "org/demo", "v1.1.0-rc1")

    pr = push_dataset(v2, "org/demo", create_pr=True, backoff=FAST)
    assert pr.revision == "refs/pr/1" and pr.pr_url and pr.pr_url.endswith("/discussions/1")
    assert hub.repo("org/demo").branches["main"] == main  # proposed, not merged
    assert_same_rows(v2, "org/demo", "refs/pr/1")
    again = push_dataset(v2, "org/demo", create_pr=True, backoff=FAST)  # e.g. a re-run
    assert again.revision == "refs/pr/1" and again.commit == pr.commit and not again.new_commit
    assert list(hub.repo("org/demo").prs) == [1]

    # another version with the same name and row count (another seed): its own pull request, PR 1 untouched
    v3 = _build(tmp_path_factory, "v3", [*SMALL, "count=60", "seed=2"])
    other = push_dataset(v3, "org/demo", create_pr=True, backoff=FAST)
    assert other.revision == "refs/pr/2" and list(hub.repo("org/demo").prs) == [1, 2]
    assert_same_rows(v2, "org/demo", "refs/pr/1")
    assert_same_rows(v3, "org/demo", "refs/pr/2")


def test_push_a_pipeline_to_a_model_repo(fake_hub, v1, tiny_pipeline_path, tmp_path):
    from diffusers import DiffusionPipeline
    from huggingface_hub import ModelCard

    from synthgen.hub import push_model

    push_dataset(v1, "org/demo", tag="v1.0.0", backoff=FAST)
    folder = Path(shutil.copytree(tiny_pipeline_path, tmp_path / "pipeline"))
    result = push_model(folder, "org/tiny-sd", datasets=[str(v1)], tag="v1.0.0", backoff=FAST)
    assert result.repo_type == "model" and fake_hub.repo("org/tiny-sd", "model").tags["v1.0.0"] == result.commit

    card = ModelCard.load("org/tiny-sd")
    assert card.data.datasets == ["org/demo"]  # the data it was trained on, as published
    assert "`org/demo`" in card.text and "revision `v1.0.0`" in card.text
    assert card.data.library_name == "diffusers"
    pipeline = DiffusionPipeline.from_pretrained("org/tiny-sd", revision="v1.0.0")
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert not any(".synthgen" in p for p in fake_hub.files("org/tiny-sd", "v1.0.0", "model"))
    assert not [p for p in folder.iterdir() if p.name.startswith(".synthgen")]  # staging cleaned up

    with pytest.raises(Exception, match="name the data the model was trained on"):
        push_model(folder, "org/tiny-sd", datasets=[], tag="v1.0.1")


def test_a_class_conditioned_pipeline_card_loads_it(fake_hub, v1, tmp_path):
    """The card's snippet is run as written: diffusers has no ClassConditionedPipeline, synthgen does."""
    import re

    from huggingface_hub import ModelCard

    from synthgen.classcond.base import load_base_components
    from synthgen.classcond.encoder import ClassEncoder
    from synthgen.classcond.pipeline import ClassConditionedPipeline
    from synthgen.hub import push_model

    base = load_base_components("builtin:tiny-sd", vae=True)
    encoder = ClassEncoder.for_unet(base.unet, 2, num_tokens=4, hidden_dims=(8,))
    ClassConditionedPipeline(vae=base.vae, unet=base.unet, scheduler=base.scheduler, class_encoder=encoder,
                             class_names=["cat", "dog"], resolution=32, training={}).save_pretrained(tmp_path / "cc")
    push_model(tmp_path / "cc", "org/cc", datasets=[str(v1)], tag="v1", backoff=FAST)

    snippet = re.search(r"```python\n(.*?)```", ModelCard.load("org/cc").text, re.S).group(1)
    assert 'ClassConditionedPipeline.from_pretrained("org/cc", revision="v1")' in snippet
    scope: dict = {}
    exec(snippet, scope)
    assert type(scope["pipeline"]).__name__ == "ClassConditionedPipeline"
    assert scope["pipeline"].class_names == ["cat", "dog"]

    # and a recipe builds from it by Hub id, at the tagged commit
    from synthgen.generate import load_pipeline
    from synthgen.recipe import GeneratorConfig

    loaded = load_pipeline(GeneratorConfig(model="org/cc", revision="v1", device="cpu", dtype="float32"))
    assert type(loaded.pipe).__name__ == "ClassConditionedPipeline"
    assert loaded.provenance()["model_revision"] == fake_hub.repo("org/cc", "model").tags["v1"]


# --------------------------------------------------------------------------------------------------
# the fake Hub itself: what the real client sees
# --------------------------------------------------------------------------------------------------
def test_fake_hub_speaks_the_protocol_the_client_expects(fake_hub):
    from huggingface_hub import HfApi, HfFileSystem, RepoFile, RepoFolder, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    hub = fake_hub
    blob = bytes(range(256)) * 40
    v1 = hub.put_files("org/x", {"a.txt": b"hello", "dir/b.parquet": blob, "dir/sub/c.txt": b"c"}, tag="v1")
    v2 = hub.put_files("org/x", {"a.txt": b"hello again"})
    assert hub.history("org/x")[0].parents == [v1] and v1 != v2
    same_tree = hub.put_files("org/x", {})  # same files, another parent: another sha
    assert same_tree not in (v1, v2) and hub.repo("org/x").commits[same_tree].tree == hub.repo("org/x").commits[v2].tree

    api = HfApi()
    hub.tree_page_size = 2
    listed = list(api.list_repo_tree("org/x", repo_type="dataset", revision="v1", recursive=True))
    assert sorted(e.path for e in listed) == [".gitattributes", "a.txt", "dir", "dir/b.parquet", "dir/sub", "dir/sub/c.txt"]
    assert len(hub.calls("GET", r"/tree/")) == 3  # three pages
    parquet = next(e for e in listed if e.path == "dir/b.parquet")
    assert parquet.lfs.sha256 == hashlib.sha256(blob).hexdigest() and parquet.size == len(blob)
    info = api.get_paths_info("org/x", ["a.txt", "dir", "nope"], repo_type="dataset", revision="v1")
    assert [(type(e), e.path) for e in info] == [(RepoFile, "a.txt"), (RepoFolder, "dir")]
    assert api.dataset_info("org/x", revision="v1").sha == v1 and api.dataset_info("org/x").sha == same_tree

    assert Path(hf_hub_download("org/x", "a.txt", repo_type="dataset", revision="v1")).read_bytes() == b"hello"
    with HfFileSystem().open("datasets/org/x@v1/dir/b.parquet", "rb", block_size=64) as f:
        f.seek(1000)
        assert f.read(10) == blob[1000:1010]
    assert any("range" in r.headers for r in hub.calls("GET", r"/resolve/"))
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/x", "missing.txt", repo_type="dataset", revision="v1")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/x", "a.txt", repo_type="dataset", revision="v9")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("org/nothing")


def test_seeded_folder_loads_at_its_tag(fake_hub, v1):
    """What tests of Hub readers (e.g. `synthgen cas org/name --revision v1.0.0`) build on."""
    from huggingface_hub import HfApi

    sha = fake_hub.put_folder("org/demo", v1, tag="v1.0.0")
    assert not any(".synthgen" in path for path in fake_hub.files("org/demo", "v1.0.0"))
    assert HfApi().dataset_info("org/demo", revision="v1.0.0").sha == sha
    assert_same_rows(v1, "org/demo", "v1.0.0")


# --------------------------------------------------------------------------------------------------
# backoff
# --------------------------------------------------------------------------------------------------
def test_backoff_honours_retry_after_and_only_retries_transient_errors():
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    from huggingface_hub.errors import HfHubHTTPError

    # the HTTP client of the installed huggingface_hub: httpx2 from 2.x on, httpx in 1.x
    http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")

    from synthgen.hub.retry import is_transient, with_retries

    def error(status: int, retry_after: str | None = None) -> HfHubHTTPError:
        headers = {"Retry-After": retry_after} if retry_after else {}
        response = http.Response(status, headers=headers, request=http.Request("POST", "http://hub/commit"))
        return HfHubHTTPError("boom", response=response)

    backoff = Backoff(attempts=4, base=1.0, cap=3.0)
    assert [backoff.delay(i, error(500)) for i in range(4)] == [1.0, 2.0, 3.0, 3.0]
    assert backoff.delay(0, error(429, "7")) == 7.0
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= backoff.delay(0, error(503, later)) <= 30
    assert is_transient(error(429)) and is_transient(error(502)) and not is_transient(error(404))
    assert is_transient(http.RemoteProtocolError("dropped")) and not is_transient(ValueError("x"))

    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise error(503, "2")
        return "ok"

    assert with_retries(flaky, backoff, "test", sleep=slept.append) == "ok" and slept == [2.0, 2.0]
    with pytest.raises(HfHubHTTPError):
        with_retries(lambda: (_ for _ in ()).throw(error(400)), backoff, "test", sleep=slept.append)
    assert slept == [2.0, 2.0]  # a client error is not retried


# --------------------------------------------------------------------------------------------------
# 5. the trainer records the commit of every Hub dataset it reads
# --------------------------------------------------------------------------------------------------
CIFAR = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"real CIFAR-10 folder not found at {CIFAR}")
def test_cas_on_a_hub_revision_records_its_commit(fake_hub, v1, v2, tmp_path, capsys):
    """`synthgen cas org/name --revision v1.0.0` reads that version (not the newer one on main) and
    records the commit the tag resolved to."""
    sha_v1 = fake_hub.put_folder("org/demo", v1, tag="v1.0.0")
    sha_v2 = fake_hub.put_folder("org/demo", v2, tag="v1.1.0")
    assert sha_v1 != sha_v2
    out = tmp_path / "cas.json"
    small = ["model=resnet20", "epochs=1", "batch_size=64", "real_fit=300", "real_val=100", "limit_real_test=200"]
    code, _, err = cli(capsys, "cas", "org/demo", "--revision", "v1.0.0", "--real", CIFAR,
                       *[a for kv in small for a in ("--set", kv)], "--threads", "1", "-q", "-o", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    synthetic = result["synthetic"]
    assert synthetic["id"] == "org/demo" and synthetic["revision"] == "v1.0.0"
    assert synthetic["sha"] == sha_v1
    assert [r["n_images"] for r in result["runs"]] == [40]  # v1.0.0's rows, not v1.1.0's 60


# --------------------------------------------------------------------------------------------------
# build --push-to-hub
# --------------------------------------------------------------------------------------------------
def test_build_push_to_hub(fake_hub, tiny_pipeline_path, tmp_path, capsys):
    out = tmp_path / "built"
    sets = [a for kv in SMALL for a in ("--set", kv)]
    code, stdout, err = cli(capsys, "build", "demo", *sets, "--out", out, "-q", "--push-to-hub", "org/built", "--tag", "v1.0.0")
    assert code == 0, err
    assert "org/built" in stdout and "tagged v1.0.0" in stdout
    assert_same_rows(out, "org/built", "v1.0.0")
    pushes = json.loads((out / "synthgen_manifest.json").read_text())["pushes"]
    assert [(p["repo_id"], p["tag"]) for p in pushes] == [("org/built", "v1.0.0")]


@pytest.mark.parametrize("args, message", [
    (["--push-to-hub", "not a repo id"], "malformed repo id"),
    (["--push-to-hub", "org/built", "--limit", "10"], "drop --limit"),
    (["--tag", "v1.0.0"], "go with --push-to-hub"),
])
def test_build_push_to_hub_bad_input_builds_nothing(fake_hub, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code, _, err = cli(capsys, "build", "demo", "--out", out, "-q", *args)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0]
    assert not out.exists() and writes(fake_hub) == []


def test_build_push_to_hub_without_token_builds_nothing(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "never"
    code, _, err = cli(capsys, "build", "demo", "--out", out, "-q", "--push-to-hub", "org/built")
    assert code == 1 and "no Hugging Face token" in err and not out.exists()
