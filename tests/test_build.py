"""`synthgen build`: the dataset folder, reproducibility from rows, resume after kill -9, bad input."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from synthgen.cli import main as cli_main
from synthgen.dataset import read_manifest, regenerate_row

REPO = Path(__file__).resolve().parents[1]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# A small version of the demo recipe: same tiny pipeline and prompts, fewer and faster images.
SMALL = {
    "name": "small",
    "seed": 7,
    "count": 24,
    "prompts": {
        "kind": "wordnet",
        "classes": "cifar10",
        "templates": ["{c}", "{c}, {h}", "{c}, {h} inside {b}"],
    },
    "generator": {
        "model": "builtin:tiny-sd",
        "scheduler": "ddim",
        "steps": 4,
        "guidance_scale": 2.0,
        "height": 64,
        "width": 64,
        "dtype": "float32",
        "batch_size": 4,
        "device": "cpu",
    },
    "output": {"images_per_shard": 8, "image_size": 32, "image_format": "png"},
}


def changed(base: dict, **changes) -> dict:
    """A deep copy of recipe data ``base`` with dotted keys set: ``changed(SMALL, **{"generator.steps": 2})``."""
    data = json.loads(json.dumps(base))
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return data


def write_recipe(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump(changed(SMALL, **changes)))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "synthgen", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def pixels(image_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))


def load_rows(folder: Path):
    from datasets import load_dataset

    # A cache beside the folder: the shared HF cache may hold another run's rows for the same path.
    return load_dataset(str(folder), split="train", cache_dir=str(folder.parent / f".hf-cache-{folder.name}"))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, tiny_pipeline_path) -> Path:
    tmp = tmp_path_factory.mktemp("small")
    recipe = write_recipe(tmp / "small.yaml")
    out = tmp / "ds"
    assert cli_main(["build", str(recipe), "--out", str(out), "--quiet"]) == 0
    return out


def test_built_folder_loads_with_load_dataset(small_dataset):
    ds = load_rows(small_dataset)
    assert ds.num_rows == 24
    assert type(ds.features["image"]).__name__ == "Image"
    assert ds.features["label"].names == CIFAR10_NAMES
    for column in ("index", "prompt", "label", "group", "seed", "retries", "settings_hash", "meta"):
        assert column in ds.column_names
    assert sorted(ds["index"]) == list(range(24))
    # Interleaved classes: any prefix is balanced, and each label's name is in its prompt's meta.
    assert ds["label"][:10] == list(range(10))
    image = ds[0]["image"]
    assert image.size == (32, 32)
    manifest = read_manifest(small_dataset)
    assert manifest["rows"] == 24 and manifest["plan"]["num_shards"] == 3
    assert set(ds["settings_hash"]) == {manifest["settings_hash"]}
    assert (small_dataset / "README.md").read_text().startswith("---\n")
    assert sorted(p.name for p in (small_dataset / "data").iterdir()) == [
        f"train-{i:05d}-of-00003.parquet" for i in range(3)
    ]


@pytest.mark.parametrize("index", [0, 13, 23])
def test_row_regenerates_to_same_pixels(small_dataset, index):
    from synthgen.dataset import read_row

    row = read_row(small_dataset, index)
    regenerated = np.asarray(regenerate_row(small_dataset, index).convert("RGB"))
    assert np.array_equal(regenerated, pixels(row["image"]["bytes"]))


def test_a_negative_or_too_large_index_is_one_line_and_writes_nothing(small_dataset, tmp_path, capsys):
    """`regenerate DIR -1`: click read -1 as an unknown option ("No such option: -1"); it is a bad INDEX."""
    out = tmp_path / "r.png"
    for index in ("-1", "-12"):
        assert cli_main(["regenerate", str(small_dataset), index, "--out", str(out)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: Invalid value for 'index': {index} is negative: row indices start at 0 (see 'synthgen regenerate --help')"]
    assert cli_main(["regenerate", "--out", str(out), str(small_dataset), "--", "-1"]) == 2
    assert "Input should be greater than or equal to 0" in capsys.readouterr().err
    assert cli_main(["regenerate", str(small_dataset), "24", "--out", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == ["error: index 24 out of range: the dataset has 24 rows, indices 0..23"]
    assert not out.exists()


def test_a_row_made_without_compile_is_regenerated_without_it(tmp_path, tiny_pipeline_path, capsys):
    """Regression: regeneration loaded the recipe's compile setting whatever the build did, so on a
    GPU one image of a folder built eagerly (on a CPU, where compile is ignored) paid torch.compile's
    minutes for kernels the build never ran. A row made compiled is regenerated compiled (its help
    says so); here the build did not compile, and neither does the regeneration."""
    import warnings

    recipe = write_recipe(tmp_path / "r.yaml", **{"count": 4, "output.images_per_shard": 4, "generator.compile": True})
    with pytest.warns(UserWarning, match="compile is ignored on cpu"):
        assert cli_main(["build", str(recipe), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    assert read_manifest(tmp_path / "ds")["shards"][0]["model"]["compiled"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe's compile: true would warn here on a CPU (and compile on a GPU)
        image = regenerate_row(tmp_path / "ds", 2)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(load_rows(tmp_path / "ds")[2]["image"].convert("RGB")))
    capsys.readouterr()
    assert cli_main(["regenerate", "--help"]) == 0
    assert "compiled again, as the build did" in " ".join(capsys.readouterr().out.split())


def test_pixels_do_not_depend_on_shard_batch_or_process(small_dataset, tmp_path):
    """Same recipe with other shard sizes and batch sizes, built by two worker processes."""
    recipe = write_recipe(tmp_path / "r.yaml", **{"output.images_per_shard": 5, "generator.batch_size": 3})
    out = tmp_path / "ds"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "synthgen", "build", str(recipe), "--out", str(out), "-q",
             "--num-workers", "2", "--worker-index", str(k)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k in range(2)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    # The worker that finishes last writes the manifest and exits 0; one that finds its share done
    # while the other's shards are still unbuilt says which and exits 3 (never 0 "partial").
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 3]), errors
    for p, err in zip(procs, errors):
        if p.returncode == 3:
            assert "shard(s) left (train-" in err and len(err.strip().splitlines()) == 1
    a = {r["index"]: r for r in load_rows(small_dataset).with_format(None)}
    b = {r["index"]: r for r in load_rows(out).with_format(None)}
    assert sorted(a) == sorted(b) == list(range(24))
    worst = 0
    for i in a:
        assert a[i]["prompt"] == b[i]["prompt"] and a[i]["seed"] == b[i]["seed"]
        pa, pb = np.asarray(a[i]["image"].convert("RGB"), int), np.asarray(b[i]["image"].convert("RGB"), int)
        worst = max(worst, int(np.abs(pa - pb).max()))
    # Batched CPU kernels may round differently with another batch size; documented bound: 2 levels.
    assert worst <= 2, worst


def test_kill_9_then_resume(tmp_path, tiny_pipeline_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        count=30,
        **{"output.images_per_shard": 3, "generator.batch_size": 1, "generator.steps": 8},
    )
    out = tmp_path / "ds"
    args = [sys.executable, "-m", "synthgen", "build", str(recipe), "--out", str(out), "-q"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = out / ".synthgen" / "done"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(markers.glob("*.json"))
    assert 2 <= len(finished) < 10, "the build must be killed in the middle"
    kept = {}
    for marker in finished:
        shard = out / json.loads(marker.read_text())["file"]
        kept[shard] = (shard.stat().st_ino, shard.stat().st_mtime_ns)

    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{len(finished)} already done" in again.stdout.replace("\n", " ")

    ds = load_rows(out)
    assert ds.num_rows == 30
    assert sorted(ds["index"]) == list(range(30))
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    for shard, stamp in kept.items():  # finished shards were not regenerated
        assert (shard.stat().st_ino, shard.stat().st_mtime_ns) == stamp


def test_clean_up_spares_temp_files_of_a_shard_another_process_is_writing(tmp_path):
    """Regression: a second worker starting on a shared folder deleted the first one's temp files."""
    from synthgen.dataset.folder import plan_build, prepare_folder
    from synthgen.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"))
    build = plan_build(recipe, tmp_path / "ds")
    writer = build.writer()
    prepare_folder(build, writer)
    busy, dead = build.plan.shards()[:2]
    (tmp_path / "ds" / "data").mkdir()
    (tmp_path / "ds" / ".synthgen" / "done").mkdir()
    busy_files = [tmp_path / "ds" / "data" / f".tmp-{busy.name}.parquet.111",
                  tmp_path / "ds" / ".synthgen" / "done" / f".tmp-{busy.name}.json.111"]
    dead_files = [tmp_path / "ds" / "data" / f".tmp-{dead.name}.parquet.222",
                  tmp_path / "ds" / ".synthgen" / "done" / f".tmp-{dead.name}.json.222",
                  tmp_path / "ds" / ".synthgen" / ".tmp-plan.json.333",
                  tmp_path / "ds" / ".tmp-README.md.333"]
    for path in busy_files + dead_files:
        path.write_bytes(b"partial")
    # flock locks belong to the open file, so this claim excludes the clean-up's own claim.
    with build.store.claim(busy.name) as held:
        assert held
        prepare_folder(plan_build(recipe, tmp_path / "ds"), writer)
    assert all(p.exists() for p in busy_files)
    assert not any(p.exists() for p in dead_files)
    prepare_folder(plan_build(recipe, tmp_path / "ds"), writer)  # lock released: a dead writer's
    assert not any(p.exists() for p in busy_files)


def test_worker_starting_while_another_writes_its_plan(tmp_path):
    """A folder holding only the state directory (a plan being written) is a new build, and the
    plan is re-checked under the folder lock: another recipe's plan appearing meanwhile is refused."""
    from synthgen.dataset.folder import plan_build, prepare_folder
    from synthgen.errors import OutputFolderError
    from synthgen.recipe import load_recipe

    out = tmp_path / "ds"
    (out / ".synthgen").mkdir(parents=True)
    mine = plan_build(load_recipe(write_recipe(tmp_path / "a.yaml")), out)
    assert mine.state == "new"
    other = plan_build(load_recipe(write_recipe(tmp_path / "b.yaml", seed=8)), out)
    prepare_folder(other, other.writer())
    with pytest.raises(OutputFolderError, match="seed"):
        prepare_folder(mine, mine.writer())


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "ds"
    result = run_cli("build", "demo", "--out", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "200" in result.stdout and "dry run" in result.stdout
    assert not out.exists()


def test_rerun_of_finished_build_skips_everything(small_dataset):
    from synthgen.dataset import build_dataset
    from synthgen.recipe import load_recipe

    recipe = load_recipe(small_dataset.parent / "small.yaml")
    result = build_dataset(recipe, small_dataset, progress=False)
    assert (result.shards_written, result.shards_skipped, result.complete) == (0, 3, True)
    assert load_rows(small_dataset).num_rows == 24


def _bad(tmp_path: Path, case: str) -> tuple[list[str], Path, dict]:
    out = tmp_path / "out"
    env: dict = {}
    recipe = tmp_path / "bad.yaml"
    if case == "malformed-yaml":
        recipe.write_text("name: x\ncount: [1, 2\n")
    elif case == "unknown-key":
        write_recipe(recipe, **{"generator.guidance": 2})
    elif case == "negative-count":
        write_recipe(recipe, count=-5)
    elif case == "missing-captions":
        data = dict(SMALL, prompts={"kind": "captions", "source": str(tmp_path / "nope.tsv")})
        recipe.write_text(yaml.safe_dump(data))
    elif case == "unknown-model-offline":
        write_recipe(recipe, **{"generator.model": "no-such-org/no-such-model-xyz"})
        env = {"HF_HUB_OFFLINE": "1"}
    elif case == "missing-recipe":
        recipe = tmp_path / "absent.yaml"
    return [str(recipe), "--out", str(out)], out, env


@pytest.mark.parametrize(
    "case",
    ["malformed-yaml", "unknown-key", "negative-count", "missing-captions", "unknown-model-offline", "missing-recipe"],
)
def test_bad_input_is_one_clear_line(tmp_path, case, tiny_pipeline_path):
    args, out, env = _bad(tmp_path, case)
    result = run_cli("build", *args, "-q", env=env, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists(), "a failed build must leave no folder behind"
    if case == "unknown-key":
        assert "generator.guidance: unknown key (did you mean guidance_scale?)" in lines[0]
    if case == "negative-count":
        assert "count" in lines[0]


def test_folder_of_another_recipe_is_refused(small_dataset, tmp_path):
    other = write_recipe(tmp_path / "other.yaml", **{"generator.guidance_scale": 5.0})
    listing = sorted(str(p) for p in small_dataset.rglob("*"))
    result = run_cli("build", str(other), "--out", str(small_dataset), "-q")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "generator.guidance_scale" in lines[0] and "--overwrite" in lines[0]
    assert sorted(str(p) for p in small_dataset.rglob("*")) == listing


def test_non_synthgen_folder_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_cli("build", "demo", "--out", str(out), "--overwrite", "-q")
    assert result.returncode != 0 and "no synthgen build" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_a_changed_recipe(tmp_path, tiny_pipeline_path):
    out = tmp_path / "ds"
    first = write_recipe(tmp_path / "a.yaml", count=4, **{"output.images_per_shard": 4})
    second = write_recipe(tmp_path / "b.yaml", count=6, **{"output.images_per_shard": 3})
    assert cli_main(["build", str(first), "--out", str(out), "-q"]) == 0
    assert cli_main(["build", str(second), "--out", str(out), "-q", "--overwrite"]) == 0
    ds = load_rows(out)
    assert ds.num_rows == 6
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"train-{i:05d}-of-00002.parquet" for i in range(2)]


def test_preview_writes_a_grid(small_dataset, tmp_path):
    out = tmp_path / "grid.png"
    assert cli_main(["preview", str(small_dataset), "--out", str(out), "-n", "6", "--columns", "3", "--cell", "64"]) == 0
    grid = Image.open(out)
    assert grid.size[0] == 3 * 64 and grid.size[1] > 2 * 64


def test_preview_says_a_damaged_shard_is_damaged(small_dataset, tmp_path, capsys):
    """A broken image and a foreign parquet in a shard's place: one line pointing to verify (not a
    "file-system error", not a KeyError traceback), and no PNG."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds"
    shutil.copytree(small_dataset, folder)
    shard = sorted((folder / "data").iterdir())[0]
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": images[1]["bytes"][:40], "path": None}
    pq.write_table(table.set_column(0, "image", pa.array(images, type=table.schema.field("image").type)), shard)
    out = tmp_path / "p.png"
    assert cli_main(["preview", str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {folder}: row 1's image does not decode; run `synthgen verify {folder}`"
    pq.write_table(pa.table({"a": [1]}), shard)
    assert cli_main(["preview", str(folder), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {folder}/data/{shard.name} is not a shard of a synthgen dataset "
                                               f"(no image and index columns); run `synthgen verify {folder}`")
    assert not out.exists()


def test_preview_and_verify_say_what_a_folder_is(small_dataset, tmp_path, capsys):
    """A build that has not finished a shard, and a shard file given for its folder: one line each."""
    started = tmp_path / "started"
    (started / ".synthgen").mkdir(parents=True)
    (started / ".synthgen" / "plan.json").write_text("{}")
    assert cli_main(["preview", str(started), "--out", str(tmp_path / "p.png")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {started} is an unfinished build (no synthgen_manifest.json "
                                               "yet): run the same build command to finish it")
    shard = next((small_dataset / "data").iterdir())
    assert cli_main(["verify", str(shard)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {shard} is a file, not a synthgen dataset folder"
    assert not (tmp_path / "p.png").exists()


def test_verify_shows_a_progress_bar_on_a_terminal_only(small_dataset):
    """On a terminal (a pseudo-terminal here) stderr shows the rows checked; piped, it stays empty."""
    from terminal import run_with_a_terminal_stderr

    proc, shown = run_with_a_terminal_stderr([sys.executable, "-m", "synthgen", "verify", str(small_dataset)])
    assert proc.returncode == 0 and b"ok; 24 rows" in proc.stdout
    assert b"verify " in shown and b"24/24" in shown
    piped = run_cli("verify", str(small_dataset))
    assert piped.returncode == 0 and piped.stderr == ""


def test_builtin_recipes_validate_and_sample():
    from synthgen.prompts import build_sampler
    from synthgen.recipe import list_recipes, load_recipe

    names = list_recipes()
    assert {"demo", "imagenet-sd", "imagenet100-sd", "stablerep-cc3m", "combinatorial"} <= set(names)
    expected_counts = {"imagenet-sd": 1_200_000, "imagenet100-sd": 130_000, "combinatorial": 1_000_000}
    for name in names:
        recipe = load_recipe(name)
        sampler = build_sampler(recipe)
        assert len(sampler) == recipe.count
        last = sampler[recipe.count - 1]
        assert last.prompt or last.class_id is not None  # class-conditioned recipes have class ids, no text
        if name in expected_counts:
            assert recipe.count == expected_counts[name]


def test_set_override():
    from synthgen.recipe import load_recipe

    recipe = load_recipe("demo", ["generator.guidance_scale=3.5", "output.image_format=jpeg"])
    assert recipe.generator.guidance_scale == 3.5 and recipe.output.image_format == "jpeg"
    assert recipe.settings_hash() != load_recipe("demo").settings_hash()


@pytest.mark.parametrize("key, hint", [
    ("generator.step", " (did you mean steps?)"),
    ("prompts.clases", " (did you mean classes?)"),  # through the prompts union, to the wordnet member's fields
    ("prompts.images_per_captions", ""),  # close to a key of the captions member only: not for a wordnet recipe
    ("output.zzz", ""),
])
def test_an_unknown_key_names_the_known_keys_close_to_it(key, hint):
    from synthgen.errors import RecipeError
    from synthgen.recipe import recipe_from_dict

    with pytest.raises(RecipeError) as info:
        recipe_from_dict(changed(SMALL, **{key: 1}))
    assert str(info.value).endswith(f"{key}: unknown key{hint}"), str(info.value)


def test_a_finished_progress_bar_shows_the_whole_runs_rate(monkeypatch, capsys):
    """4 images after 2 s, 1 more after 8 s: 5 images in 10 s is 0.50 img/s (rich's last window
    would say 1 image in 8 s, 0.12 img/s)."""
    import rich.console

    from synthgen.dataset.job import progress_bar

    now = [0.0]
    monkeypatch.setattr(rich.console, "monotonic", lambda: now[0])
    with progress_bar(True, "demo", 5) as bar:
        now[0] = 2.0
        bar.advance(4)
        now[0] = 10.0
        bar.advance(1)
    shown = capsys.readouterr().err
    assert "5/5 0.50 img/s" in shown, shown
