"""Reading a dataset folder back from an object store: ``verify``, ``preview``, ``regenerate`` and the
card's per-class counts through ``s3://`` on a real S3-compatible server (moto's server mode, a
separate process), each checked against the same build in a local folder; damaged, missing and
unusable folders as problems or one line."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moto_s3 import BUCKET
from synthgen.cli import main as cli_main

pytest.importorskip("s3fs")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the demo recipe, shrunk: 3 shards of 4 images, CIFAR-10 classes in turn (two classes have 2 images)
SETTINGS = ["count=12", "output.images_per_shard=4", "generator.steps=2", "generator.height=32",
            "generator.width=32", "generator.batch_size=4", "generator.device=cpu"]
SHARD = "data/train-00001-of-00003.parquet"
CLASS_ROW = re.compile(r"^\| (\d+) \| \w+ \| ([\d,]+) \|$", re.M)


@pytest.fixture(scope="module")
def recipe():
    from synthgen.recipe import load_recipe

    return load_recipe("demo", SETTINGS)


@pytest.fixture(scope="module")
def loaded(recipe, tiny_pipeline_path):
    from synthgen.generate import load_pipeline

    return load_pipeline(recipe.generator)


def _build(recipe, out, loaded):
    from synthgen.dataset import build_dataset

    result = build_dataset(recipe, out, progress=False, loaded_pipeline=loaded)
    assert result.dataset_complete
    return result


@pytest.fixture(scope="module")
def local(tmp_path_factory, recipe, loaded) -> Path:
    out = tmp_path_factory.mktemp("local") / "ds"
    _build(recipe, out, loaded)
    return out


@pytest.fixture(scope="module")
def built(s3, recipe, loaded) -> str:
    url = f"s3://{BUCKET}/built"
    _build(recipe, url, loaded)
    return url


@pytest.fixture
def fs(s3):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def copy(built, fs, request) -> str:
    """A copy of the S3 build that this test may damage."""
    name = re.sub(r"\W", "-", request.node.name)
    for path in fs.find(f"{BUCKET}/built"):
        fs.pipe_file(path.replace(f"{BUCKET}/built/", f"{BUCKET}/{name}/", 1), fs.cat_file(path))
    return f"s3://{BUCKET}/{name}"


def card_counts(text: str) -> dict[int, int]:
    return {int(label): int(n.replace(",", "")) for label, n in CLASS_ROW.findall(text)}


def label_column(read, files) -> Counter:
    counts: Counter = Counter()
    for name in files:
        counts.update(pq.read_table(io.BytesIO(read(name)), columns=["label"]).column("label").to_pylist())
    return counts


# --------------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------------
def test_verify_checks_an_s3_build_like_a_local_one(s3, built, local, capsys, monkeypatch):
    from synthgen.dataset import verify_dataset

    report = verify_dataset(built)
    assert report.ok, report.problems
    assert (report.folder, report.rows, report.shards, report.images_decoded) == (built, 12, 3, 12)
    assert not report.notes
    assert cli_main(["verify", built]) == 0
    assert f"{built}: ok; 12 rows in 3 shard(s), 12 images decoded" in capsys.readouterr().out
    local_report = verify_dataset(local)
    assert local_report.ok and (local_report.rows, local_report.images_decoded) == (12, 12)
    # storage_options reach the store: without the endpoint in the environment (and with a fresh
    # s3fs instance, not one cached with the environment's), they name the server
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"endpoint_url": s3["AWS_ENDPOINT_URL"], "skip_instance_cache": True}
    assert verify_dataset(built, decode=False, storage_options=options).ok


@pytest.mark.parametrize("damage, problem", [
    ("garbled", f"{SHARD}: sha256 differs from the manifest"),
    ("deleted", f"{SHARD}: missing"),
])
def test_verify_reports_a_damaged_shard_on_s3(copy, fs, capsys, damage, problem):
    path = f"{copy.removeprefix('s3://')}/{SHARD}"
    if damage == "garbled":
        data = bytearray(fs.cat_file(path))
        data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 64])
        fs.pipe_file(path, bytes(data))  # the same size: only the sha256 tells
    else:
        fs.rm_file(path)
    assert cli_main(["verify", copy]) == 1
    captured = capsys.readouterr()
    assert f"problem: {problem}" in captured.err, captured.err
    assert "problem(s)" in captured.out and "Traceback" not in captured.err
    if damage == "deleted":
        assert "the manifest says 12 rows; the shards hold 8" in captured.err


def test_verify_checks_label_counts_and_the_card_against_the_labels(copy, fs):
    from synthgen.dataset import verify_dataset

    root = copy.removeprefix("s3://")
    manifest = json.loads(fs.cat_file(f"{root}/synthgen_manifest.json"))
    first = manifest["shards"][0]["label_counts"]
    label = next(iter(first))
    first[label] += 1
    fs.pipe_file(f"{root}/synthgen_manifest.json", json.dumps(manifest).encode())
    card = fs.cat_file(f"{root}/README.md").decode()
    row = CLASS_ROW.search(card)
    fs.pipe_file(f"{root}/README.md", card.replace(row.group(0), row.group(0)[:-2] + "9 |", 1).encode())
    report = verify_dataset(copy, decode=False)
    assert report.problems == [
        "data/train-00000-of-00003.parquet: its labels are not the per-class counts the manifest records",
        f"README.md: per-class counts differ from the shards' labels (label {row.group(1)})",
    ]


# --------------------------------------------------------------------------------------------------
# the card's per-class counts
# --------------------------------------------------------------------------------------------------
def test_an_s3_card_counts_classes_like_a_local_card(built, local, fs):
    root = built.removeprefix("s3://")
    manifest = json.loads(fs.cat_file(f"{root}/synthgen_manifest.json"))
    files = [s["file"] for s in manifest["shards"]]
    s3_labels = label_column(lambda name: fs.cat_file(f"{root}/{name}"), files)
    local_labels = label_column(lambda name: (local / name).read_bytes(), files)
    assert s3_labels == local_labels and sorted(s3_labels.values()) == [1] * 8 + [2, 2]
    s3_card = fs.cat_file(f"{root}/README.md").decode()
    local_card = (local / "README.md").read_text()
    expected = {i: s3_labels.get(i, 0) for i in range(10)}
    assert card_counts(s3_card) == expected  # the label column's counts
    assert card_counts(local_card) == expected  # a local card's counts are unchanged
    # the markers carry the counts (and the card's uncompressed size), so the two cards are the same
    assert sum((Counter({int(k): v for k, v in s["label_counts"].items()}) for s in manifest["shards"]), Counter()) == s3_labels
    built_line = re.compile(r"^- Built: .*$", re.M)
    assert built_line.sub("", s3_card) == built_line.sub("", local_card)


def test_class_counts_of_a_folder_whose_markers_predate_them(built, local):
    """Markers of an older synthgen have no label_counts: the card reads the label column, through
    the store, to the same numbers (and the parquet footers to the same size)."""
    from synthgen.dataset import read_manifest
    from synthgen.dataset.card import class_counts, uncompressed_bytes

    for folder in (built, local):
        manifest = read_manifest(folder)
        old = {**manifest, "shards": [{k: v for k, v in s.items() if k not in ("label_counts", "uncompressed_bytes")}
                                      for s in manifest["shards"]]}
        assert class_counts(folder, old) == class_counts(None, manifest) and sum(class_counts(folder, old).values()) == 12
        assert uncompressed_bytes(folder, old) == uncompressed_bytes(None, manifest) != manifest["bytes"]
        assert class_counts(None, old) is None and uncompressed_bytes(None, old) == manifest["bytes"]


def test_markers_rebuild_the_manifest_and_card_on_s3(copy, fs, recipe, loaded):
    from synthgen.dataset import verify_dataset

    root = copy.removeprefix("s3://")
    before = json.loads(fs.cat_file(f"{root}/synthgen_manifest.json"))
    card = fs.cat_file(f"{root}/README.md")
    fs.rm_file(f"{root}/synthgen_manifest.json")
    fs.rm_file(f"{root}/README.md")
    result = _build(recipe, copy, loaded)
    assert result.shards_written == 0 and result.shards_skipped == 3
    after = json.loads(fs.cat_file(f"{root}/synthgen_manifest.json"))
    assert after["shards"] == before["shards"]  # label counts included: they come from the markers
    built_line = re.compile(rb"^- Built: .*$", re.M)
    assert built_line.sub(b"", fs.cat_file(f"{root}/README.md")) == built_line.sub(b"", card)
    assert verify_dataset(copy, decode=False).ok


# --------------------------------------------------------------------------------------------------
# preview and regenerate
# --------------------------------------------------------------------------------------------------
def test_preview_of_an_s3_build_is_a_local_png(built, local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["preview", built, "-n", "6", "--columns", "4", "--cell", "64"]) == 0
    assert "wrote preview.png" in capsys.readouterr().out
    assert cli_main(["preview", str(local), "-n", "6", "--columns", "4", "--cell", "64"]) == 0
    with Image.open(tmp_path / "preview.png") as s3_grid, Image.open(local / "preview.png") as local_grid:
        assert s3_grid.size == (4 * 64, 2 * (64 + 44))  # 6 images: 2 rows of 4 cells, captions below
        assert np.array_equal(np.asarray(s3_grid), np.asarray(local_grid))  # the same rows, read through s3fs


def test_regenerate_a_row_of_an_s3_build(built, loaded, tmp_path, capsys):
    from synthgen.dataset import read_row, regenerate_row

    row = read_row(built, 5)
    assert row["index"] == 5
    stored = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
    assert np.array_equal(np.asarray(regenerate_row(built, 5, loaded_pipeline=loaded).convert("RGB")), stored)
    assert cli_main(["regenerate", built, "5", "--out", str(tmp_path / "row5.png")]) == 0
    assert "max pixel difference from the stored image" in capsys.readouterr().out
    assert Image.open(tmp_path / "row5.png").size == (32, 32)


# --------------------------------------------------------------------------------------------------
# folders that cannot be read: one line
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["verify", "preview", "regenerate"])
@pytest.mark.parametrize("url, message", [
    ("s3://no-such-bucket-xyz/ds", "bucket 'no-such-bucket-xyz' does not exist (or these credentials cannot see it)"),
    ("gs://some-bucket/ds", "install gcsfs"),
    (f"s3://{BUCKET}/not-a-dataset", None),
])
def test_an_unusable_folder_is_one_line(s3, fs, tmp_path, capsys, command, url, message):
    fs.pipe_file(f"{BUCKET}/not-a-dataset/notes.txt", b"hello")
    args = {"verify": [url], "preview": [url, "--out", str(tmp_path / "p.png")],
            "regenerate": [url, "0", "--out", str(tmp_path / "r.png")]}[command]
    assert cli_main([command, *args]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    if message is None:
        message = ("holds no parquet shards" if command == "preview"
                   else f"s3://{BUCKET}/not-a-dataset is not a synthgen dataset folder (no synthgen_manifest.json)")
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "create it first" not in err[0]  # reading, not building
    assert not list(tmp_path.iterdir())  # no PNG
