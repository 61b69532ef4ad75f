"""Resume, extend and trust: --limit prefixes, settings that may change on resume, checked shards,
provenance rebuilt from markers, a changed model refused, and workers that never end "partial"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synthgen.cli import main as cli_main
from synthgen.errors import OutputFolderError, SynthgenError
from test_build import changed

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "seed": 3,
    "count": 12,
    # {d}: WordNet definitions make some prompts longer than CLIP's 77 tokens
    "prompts": {"kind": "wordnet", "classes": "cifar10", "templates": ["{c}", "{c}, {d}"]},
    "generator": {
        "model": "builtin:tiny-sd",
        "scheduler": "ddim",
        "steps": 2,
        "guidance_scale": 2.0,
        "height": 32,
        "width": 32,
        "dtype": "float32",
        "batch_size": 4,
        "device": "cpu",
    },
    "output": {"images_per_shard": 4, "image_format": "png"},
}


def tiny(**changes):
    from synthgen.recipe import recipe_from_dict

    return recipe_from_dict(changed(TINY, **changes))


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_path):
    from synthgen.generate import load_pipeline

    return load_pipeline(tiny().generator)


def build(recipe, out, loaded=None, **kw):
    from synthgen.dataset import build_dataset

    return build_dataset(recipe, out, progress=False, loaded_pipeline=loaded, **kw)


def rows(folder: Path) -> dict[int, dict]:
    """Every row of every shard file, by index, straight from parquet (all columns)."""
    out = {}
    for path in sorted((folder / "data").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            out[row["index"]] = row
    return out


def snapshot(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def complete(tmp_path_factory, loaded) -> Path:
    out = tmp_path_factory.mktemp("complete") / "ds"
    result = build(tiny(), out, loaded)
    assert result.dataset_complete and result.shards_written == 3
    return out


@pytest.fixture
def copy_of(complete, tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(complete, out)
    return out


# --------------------------------------------------------------------------------------------------
# --limit builds a prefix of the plan; a later build extends it
# --------------------------------------------------------------------------------------------------
def test_limit_then_full_build_keeps_the_prefix_and_accepts_runtime_changes(tmp_path, loaded, complete):
    out = tmp_path / "ds"
    first = build(tiny(), out, loaded, limit=6)
    assert (first.complete, first.dataset_complete, first.rows_target, first.rows_planned) == (True, False, 6, 12)
    # shard files are named for the full plan; the shard 6 falls in is cut short at 6
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet"]
    assert first.manifest["rows"] == 6 and first.manifest["complete"] is False
    prefix = rows(out)
    assert sorted(prefix) == list(range(6))
    shard0 = (out / "data/train-00000-of-00003.parquet").stat().st_ino

    # batch size and device do not change the dataset: the resume accepts them
    second = build(tiny(**{"generator.batch_size": 3, "generator.device": "auto"}), out, loaded)
    assert second.dataset_complete and (second.shards_written, second.shards_skipped) == (2, 1)
    full = rows(out)
    assert sorted(full) == list(range(12))
    assert all(full[i] == prefix[i] for i in range(6))  # the first rows' bytes, every column
    assert (out / "data/train-00000-of-00003.parquet").stat().st_ino == shard0  # not rewritten
    assert second.manifest["rows"] == 12 and second.manifest["complete"] is True
    # the same rows as an uninterrupted build (same prompts, seeds, settings hash)
    reference = rows(complete)
    for i in range(12):
        for column in ("prompt", "seed", "label", "settings_hash", "meta"):
            assert full[i][column] == reference[i][column]
    from synthgen.dataset import verify_dataset

    assert verify_dataset(out).ok


def test_a_smaller_limit_never_leaves_made_shards_out_of_the_manifest(copy_of, loaded):
    from synthgen.dataset import verify_dataset

    before = snapshot(copy_of)
    again = build(tiny(), copy_of, loaded, limit=5)  # a complete folder: nothing to make, nothing to shrink
    assert (again.shards_written, again.dataset_complete, again.manifest["rows"]) == (0, True, 12)
    assert snapshot(copy_of) == before and verify_dataset(copy_of).ok

    # shards made past the limit by an interrupted full build: the limit reaches them, and the gap is made
    (copy_of / "synthgen_manifest.json").unlink()
    (copy_of / "data/train-00001-of-00003.parquet").unlink()
    (copy_of / ".synthgen/done/train-00001-of-00003.json").unlink()
    result = build(tiny(), copy_of, loaded, limit=2)
    assert (result.shards_written, result.rows_target, result.manifest["rows"]) == (1, 12, 12)
    assert sorted(rows(copy_of)) == list(range(12)) and verify_dataset(copy_of).ok


@pytest.mark.slow
def test_demo_limit_40_then_demo_gives_the_full_200_rows(tmp_path, tiny_pipeline_path):
    """The issue's case with the real demo recipe through the CLI: 200 rows, the first 40 untouched."""
    out = tmp_path / "demo"
    assert cli_main(["build", "demo", "--limit", "40", "--out", str(out), "-q"]) == 0
    prefix = rows(out)
    assert sorted(prefix) == list(range(40))
    assert cli_main(["build", "demo", "--out", str(out), "-q", "--set", "generator.batch_size=10"]) == 0
    full = rows(out)
    assert sorted(full) == list(range(200))
    assert all(full[i] == prefix[i] for i in range(40))


def test_a_change_that_changes_images_is_refused_naming_the_key(tmp_path, loaded, capsys):
    out = tmp_path / "ds"
    build(tiny(), out, loaded, limit=4)
    before = snapshot(out)
    with pytest.raises(OutputFolderError, match=r"differs in: generator\.guidance_scale\)"):
        build(tiny(**{"generator.guidance_scale": 3.0}), out, loaded)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(changed(TINY, **{"generator.guidance_scale": 3.0})))
    assert cli_main(["build", str(recipe), "--out", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generator.guidance_scale" in err[0]
    assert snapshot(out) == before


def test_runtime_fields_stay_out_of_the_hashes_and_new_fields_count():
    from pydantic import create_model

    from synthgen.recipe import GeneratorConfig

    base = tiny()
    for key, value in [("generator.batch_size", 9), ("generator.device", "auto"), ("generator.max_retries", 0),
                       ("generator.vae_decode_chunk", 2), ("generator.prompt_cache", 0),
                       ("generator.attention_slicing", True), ("description", "x")]:
        other = tiny(**{key: value})
        assert other.recipe_hash() == base.recipe_hash() and other.settings_hash() == base.settings_hash(), key
    for key, value in [("generator.steps", 3), ("generator.guidance_scale", 1.5), ("generator.dtype", "bfloat16"),
                       ("generator.height", 40), ("generator.scheduler", "euler"), ("output.image_format", "jpeg"),
                       ("generator.compile", False), ("generator.channels_last", False), ("generator.fuse_qkv", False)]:
        other = tiny(**{key: value})
        assert other.settings_hash() != base.settings_hash(), key
    # layout changes the dataset (plan), not the pixels
    other = tiny(**{"output.images_per_shard": 5})
    assert other.recipe_hash() != base.recipe_hash() and other.settings_hash() == base.settings_hash()
    # the resolved model revision and dtype are part of the settings hash
    model = {"model_revision": "sha256:aaa", "dtype": "float32"}
    assert base.settings_hash(model) != base.settings_hash({**model, "model_revision": "sha256:bbb"})
    assert base.settings_hash(model) != base.settings_hash({**model, "dtype": "float16"})
    # a field another change adds to GeneratorConfig counts as changing pixels unless marked RUNTIME
    Extended = create_model("Extended", __base__=GeneratorConfig, vae_chunk=(int, 1))
    assert "vae_chunk" in Extended(model="m").pixel_settings()


# --------------------------------------------------------------------------------------------------
# finished shards are checked, not trusted
# --------------------------------------------------------------------------------------------------
def _garble(path: Path, offset: int, length: int = 16) -> None:
    data = bytearray(path.read_bytes())
    start = offset if offset >= 0 else len(data) + offset
    data[start:start + length] = bytes(b ^ 0xFF for b in data[start:start + length])
    path.write_bytes(bytes(data))  # same size


def _swap(folder: Path) -> None:
    """Copy shard 0 over shard 1 and edit shard 1's marker to match the copied file."""
    src, dst = folder / "data/train-00000-of-00003.parquet", folder / "data/train-00001-of-00003.parquet"
    shutil.copyfile(src, dst)
    marker_path = folder / ".synthgen/done/train-00001-of-00003.json"
    marker = json.loads(marker_path.read_text())
    source = json.loads((folder / ".synthgen/done/train-00000-of-00003.json").read_text())
    marker.update(bytes=source["bytes"], sha256=source["sha256"])
    marker_path.write_text(json.dumps(marker))


CORRUPTIONS = {
    "same-size-garble": lambda f: _garble(f / "data/train-00001-of-00003.parquet", 2000),
    "garbled-footer": lambda f: _garble(f / "data/train-00001-of-00003.parquet", -12, 8),
    "shard-copied-over-another": _swap,
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_damaged_shard_is_found_and_rebuilt(copy_of, complete, loaded, case):
    from synthgen.dataset import verify_dataset

    from synthgen.dataset import read_row

    original = (complete / "data/train-00001-of-00003.parquet").read_bytes()
    CORRUPTIONS[case](copy_of)
    report = verify_dataset(copy_of)
    assert not report.ok and any("train-00001" in p for p in report.problems), report.problems
    # a same-size change is found by the checksum, whatever else finds it (an image may still decode)
    same_size = case != "shard-copied-over-another"
    first = "sha256 differs from the" if same_size else "bytes, the manifest says"
    assert report.problems[0].startswith("data/train-00001-of-00003.parquet: ") and first in report.problems[0], report.problems
    why = "sha256 differs from its marker" if same_size else "size [0-9]+ bytes, marker says"
    with pytest.raises(SynthgenError, match=rf"train-00001-of-00003.parquet is damaged \({why}"):
        read_row(copy_of, 5)  # a row is never served from a damaged shard
    result = build(tiny(), copy_of, loaded)
    assert list(result.rebuilt) == ["train-00001-of-00003"] and result.shards_written == 1
    assert result.dataset_complete
    assert (copy_of / "data/train-00001-of-00003.parquet").read_bytes() == original  # deterministic redo
    assert verify_dataset(copy_of).ok


def test_shards_another_rank_owns_are_checked_cheaply_by_marker_and_size(copy_of):
    from synthgen.dataset.folder import plan_build

    (copy_of / "data/train-00001-of-00003.parquet").unlink()
    with open(copy_of / "data/train-00002-of-00003.parquet", "ab") as f:
        f.write(b"\0")  # one byte more than its marker says
    build = plan_build(tiny(), copy_of, verify=lambda spec: spec.index == 0)  # rank 0 of 3 owns shard 0
    assert build.done == [0]
    assert build.damaged == {f"train-0000{i}-of-00003": "file missing or not the size its marker says" for i in (1, 2)}


def test_a_marker_is_written_only_once_its_shard_file_is_whole(tmp_path, loaded, monkeypatch):
    """The marker is the completion record: when it appears, the file it describes is already there
    with its bytes (a kill between the two leaves a shard to redo, never a marker without its file)."""
    import hashlib

    from synthgen.dataset.storage import LocalStore
    from synthgen.dataset.writer import MARKERS

    seen = []
    write_text = LocalStore.write_text

    def watch(self, rel, text):
        if rel.startswith(f"{MARKERS}/"):
            marker = json.loads(text)
            path = self.path(marker["file"])
            seen.append(path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == marker["sha256"])
        return write_text(self, rel, text)

    monkeypatch.setattr(LocalStore, "write_text", watch)
    assert build(tiny(**{"count": 8}), tmp_path / "ds", loaded).shards_written == 2
    assert seen == [True, True]


def test_a_stray_shard_file_is_refused(copy_of, loaded, capsys):
    from synthgen.dataset import verify_dataset

    shutil.copyfile(copy_of / "data/train-00000-of-00003.parquet", copy_of / "data/train-00003-of-00004.parquet")
    report = verify_dataset(copy_of)
    assert any("train-00003-of-00004" in p and "extra rows" in p for p in report.problems)
    with pytest.raises(OutputFolderError, match="train-00003-of-00004.parquet .* is not a shard of this build's plan"):
        build(tiny(), copy_of, loaded)
    assert cli_main(["verify", str(copy_of)]) == 1
    captured = capsys.readouterr()
    assert "1 problem(s)" in captured.out and "train-00003-of-00004" in captured.err
    (copy_of / "data/notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"notes.txt and 1 more in .*/data are not shards of this build's plan"):
        build(tiny(), copy_of, loaded)
    report = verify_dataset(copy_of)
    assert "data/notes.txt: not a shard of this dataset (data/ holds shards only)" in report.problems


def test_verify_passes_a_good_folder_and_decodes_images(complete, capsys):
    assert cli_main(["verify", str(complete)]) == 0
    assert "ok; 12 rows in 3 shard(s), 12 images decoded" in capsys.readouterr().out


def test_verify_finds_an_image_that_does_not_decode(copy_of, tmp_path):
    """A shard whose parquet is sound but holds a broken PNG (re-written with a valid checksum)."""
    import pyarrow as pa

    from synthgen.dataset import verify_dataset
    from synthgen.dataset.writer import file_sha256

    path = copy_of / "data/train-00002-of-00003.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": images[1]["bytes"][:40], "path": None}
    table = table.set_column(0, "image", pa.array(images, type=table.schema.field("image").type))
    pq.write_table(table, path)
    manifest_path = copy_of / "synthgen_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][2].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    manifest_path.write_text(json.dumps(manifest))
    report = verify_dataset(copy_of)
    assert report.problems == ["data/train-00002-of-00003.parquet: 1 image(s) do not decode (rows 9)"]


def test_verify_reports_a_foreign_parquet_in_a_shards_place(copy_of, capsys):
    """Another parquet file (without the dataset's columns) under a shard's name is a problem line,
    not a traceback."""
    import pyarrow as pa

    pq.write_table(pa.table({"a": [1, 2]}), copy_of / "data/train-00001-of-00003.parquet")
    assert cli_main(["verify", str(copy_of)]) == 1
    err = capsys.readouterr().err
    assert "data/train-00001-of-00003.parquet: not a shard of this dataset (no column image, index," in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# provenance lives in every marker
# --------------------------------------------------------------------------------------------------
def test_a_lost_manifest_is_rebuilt_with_the_full_model_record(copy_of, complete):
    """A crash between the last shard and the manifest (or a deleted manifest): the resume writes a
    manifest as complete as an uninterrupted build's, without loading the model."""
    reference = json.loads((complete / "synthgen_manifest.json").read_text())
    (copy_of / "synthgen_manifest.json").unlink()
    (copy_of / "README.md").unlink()
    result = build(tiny(), copy_of, loaded=None)  # nothing to generate: no model is loaded
    model = result.manifest["model"]
    assert model == reference["model"]
    assert model["model_revision"].startswith("sha256:") and model["scheduler"] == "ddim"
    assert model["device"] == "cpu" and model["dtype"] == "float32" and "torch" in model["versions"]
    assert result.manifest["settings_hash"] == reference["settings_hash"]
    assert model["model_revision"] in (copy_of / "README.md").read_text()
    markers = [json.loads(p.read_text()) for p in sorted((copy_of / ".synthgen/done").glob("*.json"))]
    assert all("host" not in m and os.uname().nodename not in json.dumps(m) for m in markers)


def test_a_run_killed_while_writing_the_manifest_leaves_no_temp_file(copy_of):
    """Regression (crash campaign): with no shard left to make, the resume wrote the manifest but
    kept the killed run's temp manifest."""
    (copy_of / "synthgen_manifest.json").unlink()
    stray = copy_of / ".tmp-synthgen_manifest.json.99999"
    stray.write_text("{")
    result = build(tiny(), copy_of, loaded=None)
    assert result.dataset_complete and not stray.exists()


def test_a_finished_build_run_again_writes_nothing(copy_of):
    before = snapshot(copy_of)
    result = build(tiny(), copy_of, loaded=None)
    assert result.dataset_complete and result.shards_written == 0
    assert snapshot(copy_of) == before


def test_a_model_that_changed_between_crash_and_resume_is_refused(tmp_path, tiny_pipeline_path):
    """A local model's weights change after part of a build: the resume refuses to mix the two
    models (the fingerprint is in the settings hash), and so does regenerating a row."""
    from safetensors.torch import load_file, save_file

    from synthgen.dataset import regenerate_row

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_path, model)  # carries the builtin's fingerprint file: not trusted
    recipe = tiny(**{"generator.model": str(model)})
    out = tmp_path / "ds"
    first = build(recipe, out, limit=4)
    assert first.manifest["model"]["model_revision"].startswith("sha256:")
    weights = next((model / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights)
    with pytest.raises(OutputFolderError, match="model_revision: 'sha256:"):
        build(recipe, out)
    with pytest.raises(SynthgenError, match="cannot be reproduced"):
        regenerate_row(out, 1)

    # --overwrite, which the message offers, starts again with the new model: every row made by it
    again = build(recipe, out, overwrite=True)
    assert (again.dataset_complete, again.shards_written) == (True, 3)
    assert again.manifest["model"]["model_revision"] != first.manifest["model"]["model_revision"]
    assert {row["settings_hash"] for row in rows(out).values()} == {again.manifest["settings_hash"]}
    assert regenerate_row(out, 1).size == (32, 32)  # the changed model reproduces rows again

    # a finished folder too (it returned the old dataset as complete, having loaded nothing)
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights)
    third = build(recipe, out, overwrite=True)
    assert (third.dataset_complete, third.shards_written) == (True, 3)
    assert third.manifest["settings_hash"] != again.manifest["settings_hash"]
    assert {row["settings_hash"] for row in rows(out).values()} == {third.manifest["settings_hash"]}


def test_pickle_weights_load_only_when_allowed(tmp_path, tiny_pipeline_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from synthgen.generate import load_pipeline
    from synthgen.generate.pipeline import ALLOW_PICKLE_ENV

    folder = tmp_path / "bin-model"
    StableDiffusionPipeline.from_pretrained(tiny_pipeline_path).save_pretrained(folder, safe_serialization=False)
    # diffusers writes the UNet and VAE as pickle .bin files here (transformers keeps safetensors)
    assert not list((folder / "unet").glob("*.safetensors")) and list((folder / "unet").glob("*.bin"))
    cfg = tiny(**{"generator.model": str(folder)}).generator
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(SynthgenError, match=f"no safetensors weights.*{ALLOW_PICKLE_ENV}=1"):
        load_pipeline(cfg)
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    assert load_pipeline(cfg).pipe is not None


# --------------------------------------------------------------------------------------------------
# workers: an unfinished dataset is never a success
# --------------------------------------------------------------------------------------------------
def test_a_worker_waits_for_a_locked_shard_and_takes_it_over_when_its_holder_dies(tmp_path, loaded):
    """Regression: a worker skipped shards another worker held, and when that one died exited 0
    with the dataset unfinished."""
    out = tmp_path / "ds"
    locks = out / ".synthgen" / "locks"
    locks.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(locks / 'train-00001-of-00003.lock')!r}, 'a+')\n"
         "fcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    killer = threading.Timer(3.0, holder.kill)
    killer.start()
    try:
        started = time.monotonic()
        result = build(tiny(), out, loaded)
    finally:
        killer.cancel()
        holder.kill()
        holder.wait()
    assert time.monotonic() - started >= 2.5  # it waited for the holder
    assert result.dataset_complete and result.shards_written == 3 and not result.left


def test_a_static_worker_with_other_shares_unbuilt_exits_3_naming_them(tmp_path, tiny_pipeline_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(TINY))
    out = tmp_path / "ds"
    rc = cli_main(["build", str(recipe), "--out", str(out), "-q", "--num-workers", "3", "--worker-index", "0"])
    captured = capsys.readouterr()
    assert rc == 3
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "2 shard(s) left (train-00001-of-00003, train-00002-of-00003)" in err[0]
    assert err[0].endswith("the same command without --num-workers/--worker-index"), err[0]
    assert "partial" in captured.out
    # --executor local would be ignored beside a static share: refused in one line
    rc = cli_main(["build", str(recipe), "--out", str(out), "-q", "--num-workers", "3", "--worker-index", "0",
                   "--executor", "local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "drop --executor local" in err[0], err
    rc = cli_main(["build", str(recipe), "--out", str(out), "-q"])  # what the hint says
    assert rc == 0 and "complete" in capsys.readouterr().out


def test_a_share_only_rank_under_torchrun_exits_0_so_torchrun_does_not_stop_the_others(
        tmp_path, tiny_pipeline_path, capsys, monkeypatch):
    """torchrun sends SIGTERM to every rank when one exits non-zero: exit 3 would kill the ranks still
    making their shares."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(TINY))
    for key, value in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "none"}.items():
        monkeypatch.setenv(key, value)
    rc = cli_main(["build", str(recipe), "--out", str(tmp_path / "ds"), "-q", "--share-only"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and len(err) == 1, err
    assert err[0].startswith("note: 2 shard(s) left (train-00001-of-00003, train-00002-of-00003) to the other ranks")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # srun, a Slurm array: exit 3 says it
    assert cli_main(["build", str(recipe), "--out", str(tmp_path / "ds"), "-q", "--share-only"]) == 3


# --------------------------------------------------------------------------------------------------
# smaller items
# --------------------------------------------------------------------------------------------------
def test_an_edited_plan_file_says_what_is_wrong(copy_of, loaded):
    plan_path = copy_of / ".synthgen" / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["plan"]["per_shard"] = 5
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(OutputFolderError, match=r"plan file .synthgen/plan.json was edited"):
        build(tiny(), copy_of, loaded)
    plan["plan"]["per_shard"] = 4
    plan["recipe"]["seed"] = 4
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(OutputFolderError, match=r"differs in: seed\)"):
        build(tiny(), copy_of, loaded)


def test_the_progress_bar_never_ends_with_dashes(capsys):
    from synthgen.dataset.job import progress_bar

    with progress_bar(True, "x", 8) as bar:
        bar.skip(4)  # a shard another process made
        bar.advance(4)
    err = capsys.readouterr().err
    assert "--" not in err and "4/4" in err and "img/s" in err
    with progress_bar(True, "y", 4) as bar:
        bar.skip(4)  # nothing generated at all
    err = capsys.readouterr().err
    assert "--" not in err and "0/0" in err


def test_long_prompts_give_one_note_in_synthgens_words(tmp_path, tiny_pipeline_path, caplog, capfd):
    from synthgen.generate import load_pipeline

    fresh = load_pipeline(tiny().generator)  # a tokenizer that has not warned yet
    with caplog.at_level("WARNING", logger="synthgen"):
        build(tiny(), tmp_path / "ds", fresh)
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("synthgen")]
    assert len(notes) == 1 and "longer than the text encoder's 77 tokens" in notes[0]
    captured = capfd.readouterr()
    assert "indexing errors" not in captured.err + captured.out
