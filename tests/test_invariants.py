"""The invariants a silent change would corrupt datasets or results with, pinned by value.

Each test here was written against a hand-made mutant (a plausible one-line bug in synthgen/) that
the rest of the suite let through: an image seed derived from its arguments in another order, a
pixel-changing field missing from the settings hash, ... Each asserts the exact behaviour or number,
so the mutant it was written for fails it.
"""

from __future__ import annotations

import pytest


# --------------------------------------------------------------------------------------------------
# seeds: a stored row's seed must be the one the recipe derives, in every version
# --------------------------------------------------------------------------------------------------
def test_image_seed_values_are_pinned():
    from synthgen.generate.seeds import image_seed

    # a changed derivation (argument order, a dropped part, another hash) would make a resumed or
    # extended build mix two seed streams in one dataset: the derivation is a stored format
    assert image_seed(0, 0) == image_seed(0, 0, 0) == 3091099107611615592
    assert image_seed(0, 1, 0) == 6723912861983325384
    assert image_seed(0, 0, 1) == 2583896214185309805
    assert (image_seed(7, 3, 2), image_seed(7, 2, 3)) == (1984861071747048987, 3998192361735178762)
    seeds = {image_seed(s, i, a) for s in range(3) for i in range(20) for a in range(4)}
    assert len(seeds) == 3 * 20 * 4 and all(0 <= x < 2**63 for x in seeds)


# --------------------------------------------------------------------------------------------------
# settings hash: every field that changes pixels changes it; nothing else does
# --------------------------------------------------------------------------------------------------
_RECIPE = {
    "name": "x",
    "count": 4,
    "prompts": {"kind": "wordnet", "classes": "cifar10"},
    "generator": {"model": "builtin:tiny-sd", "height": 64, "width": 64, "dtype": "float32"},
    "output": {"image_format": "png"},
}

# (section, field, another value): each changes an image's pixels or stored bytes
_PIXEL_CHANGES = [
    ("generator", "model", "builtin:other"),
    ("generator", "revision", "abc123"),
    ("generator", "scheduler", "euler"),
    ("generator", "steps", 7),
    ("generator", "guidance_scale", 3.0),
    ("generator", "negative_prompt", "blurry"),
    ("generator", "height", 72),
    ("generator", "width", 72),
    ("generator", "dtype", "float16"),
    ("generator", "step_cache_interval", 2),
    ("output", "image_size", 32),
    ("output", "resize_filter", "lanczos"),
    ("output", "image_format", "jpeg"),
]


def _recipe(section=None, key=None, value=None, **output):
    from synthgen.recipe import recipe_from_dict

    data = {**_RECIPE, "generator": dict(_RECIPE["generator"]), "output": {**_RECIPE["output"], **output}}
    if section:
        data[section][key] = value
    return recipe_from_dict(data)


@pytest.mark.parametrize("section, key, value", _PIXEL_CHANGES, ids=[f"{s}.{k}" for s, k, _ in _PIXEL_CHANGES])
def test_each_pixel_setting_changes_the_settings_hash(section, key, value):
    base, other = _recipe(), _recipe(section, key, value)
    assert other.settings_hash() != base.settings_hash()
    assert other.recipe_hash() != base.recipe_hash()


def test_jpeg_quality_counts_for_jpeg_only():
    png, png_q = _recipe(), _recipe(jpeg_quality=50)
    assert png.settings_hash() == png_q.settings_hash()  # lossless: the quality is unused
    assert png.generation_settings()["jpeg_quality"] is None
    jpeg, jpeg_q = _recipe(image_format="jpeg"), _recipe(image_format="jpeg", jpeg_quality=50)
    assert jpeg.settings_hash() != jpeg_q.settings_hash()
    assert jpeg_q.generation_settings()["jpeg_quality"] == 50


# --------------------------------------------------------------------------------------------------
# local writes: a reader sees the old file or the new one, never a part
# --------------------------------------------------------------------------------------------------
def test_write_atomically_never_exposes_a_partial_file(tmp_path):
    from synthgen.dataset.storage import write_atomically

    path = tmp_path / "shard.parquet"
    path.write_bytes(b"old")
    during = []

    def write(tmp):
        tmp.write_bytes(b"new, half")
        during.append(path.read_bytes())  # what a reader sees meanwhile

    write_atomically(path, write)
    assert during == [b"old"] and path.read_bytes() == b"new, half"

    def fail(tmp):
        tmp.write_bytes(b"part")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(path, fail)
    assert path.read_bytes() == b"new, half"  # the whole earlier file, not the part
    assert [p.name for p in tmp_path.iterdir()] == ["shard.parquet"]  # and no temp file


# --------------------------------------------------------------------------------------------------
# shard plan: every row in exactly one shard, the last shard and a --limit prefix cut exactly
# --------------------------------------------------------------------------------------------------
def test_shard_plan_covers_every_row_once_with_a_short_last_shard():
    from synthgen.dataset.plan import ShardPlan

    plan = ShardPlan(10, 4)
    assert plan.num_shards == 3 and plan.to_dict()["num_shards"] == 3
    assert [(s.start, s.stop, len(s)) for s in plan.shards()] == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert [s.name for s in plan.shards()] == [f"train-0000{i}-of-00003" for i in range(3)]
    for total, per in [(1, 1), (7, 7), (8, 7), (12, 4), (13, 4), (1000, 999)]:
        rows = [i for s in ShardPlan(total, per).shards() for i in range(s.start, s.stop)]
        assert rows == list(range(total)), (total, per)
    with pytest.raises(IndexError):
        plan.shard(3)


def test_a_limit_prefix_cuts_its_last_shard_at_the_limit():
    from synthgen.dataset.plan import ShardPlan

    plan = ShardPlan(10, 4)
    assert [(s.start, s.stop) for s in plan.prefix(5)] == [(0, 4), (4, 5)]
    assert [(s.start, s.stop) for s in plan.prefix(8)] == [(0, 4), (4, 8)]
    assert [(s.start, s.stop) for s in plan.prefix(1)] == [(0, 1)]
    assert plan.prefix(5)[-1].filename == plan.shard(1).filename  # under its full-plan name
    assert plan.prefix(10) == plan.prefix(None) == plan.prefix(11) == plan.shards()


# --------------------------------------------------------------------------------------------------
# Keras callbacks: min_delta is absolute in both modes, for both callbacks
# --------------------------------------------------------------------------------------------------
def _epochs(callback, values, key):
    for epoch, value in enumerate(values, 1):
        if callback.on_epoch_end(epoch, {key: value}):
            return epoch
    return len(values)


def test_min_delta_is_absolute_in_min_and_max_mode():
    import torch

    from synthgen.train.callbacks import EarlyStopping, ReduceLROnPlateau

    # losses near 2 falling by 0.015 an epoch: each step beats min_delta 0.01 absolutely, though not
    # by 1% of the value (a relative min_delta would see a plateau after epoch 2)
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    plateau = ReduceLROnPlateau(opt, "val_loss", "min", factor=0.5, patience=1, min_delta=0.01)
    assert _epochs(plateau, [2.0, 1.985, 1.97, 1.955], "val_loss") == 4 and plateau.cuts == []
    plateau = ReduceLROnPlateau(opt, "val_loss", "min", factor=0.5, patience=1, min_delta=0.01)
    _epochs(plateau, [2.0, 1.995], "val_loss")  # within min_delta: a plateau
    assert plateau.cuts == [2] and opt.param_groups[0]["lr"] == 0.5
    stop = EarlyStopping("val_loss", "min", patience=2, min_delta=0.01)
    assert _epochs(stop, [2.0, 1.985, 1.97, 1.955], "val_loss") == 4
    assert stop.best_epoch == 4 and stop.stopped_epoch is None
    # accuracies near 0.5 within 0.01 of the first: none beats it by min_delta 0.01 absolutely (0.508
    # beats it by 1% of the value): patience 2 stops after epoch 3 with epoch 1 the best
    stop = EarlyStopping("val_acc", "max", patience=2, min_delta=0.01)
    assert _epochs(stop, [0.5, 0.508, 0.505, 0.509], "val_acc") == 3
    assert (stop.best_epoch, stop.stopped_epoch, stop.best) == (1, 3, 0.5)


# --------------------------------------------------------------------------------------------------
# CAS: the default protocol is Lomurno et al.'s split -- 40k real fit, the next 10k validate every run
# --------------------------------------------------------------------------------------------------
def test_default_cas_protocol_fits_40k_validates_on_the_next_10k_and_x1_is_40k():
    import torch

    from synthgen.train.cas import load_cas_protocol, load_real_splits
    from synthgen.train.data import ImageTensorDataset

    p, info = load_cas_protocol(None)
    assert info["file"].endswith("cas-lomurno.yaml")
    assert (p.real_fit, p.real_val, p.validation, p.scale_unit) == (40000, 10000, "real", None)
    assert (p.epochs, p.batch_size, p.lr, p.label_smoothing, p.normalization) == (100, 256, 1e-3, 0.1, "unit")
    assert (p.plateau.factor, p.plateau.patience, p.plateau.min_lr, p.plateau.min_delta) == (0.1, 10, 1e-5, 1e-4)
    assert (p.early_stopping.patience, p.early_stopping.min_delta, p.early_stopping.restore_best) == (25, 0.0, True)

    names = [f"c{i}" for i in range(10)]
    n = 50000  # CIFAR-10's training split, as 1x1 images whose label is their row's last digit
    train = ImageTensorDataset(torch.zeros(n, 3, 1, 1, dtype=torch.uint8), torch.arange(n) % 10, class_names=names)
    test = ImageTensorDataset(torch.zeros(10, 3, 1, 1, dtype=torch.uint8), torch.arange(10), class_names=names)
    train.images[:, 0, 0, 0] = (torch.arange(n) // 10 % 256).to(torch.uint8)  # rows tell apart
    splits = load_real_splits((train, test), p)
    assert (len(splits.fit), len(splits.val), splits.scale_base) == (40000, 10000, 40000)
    assert torch.equal(splits.fit.images, train.images[:40000]) and torch.equal(splits.val.images, train.images[40000:])
    assert splits.test is None


# --------------------------------------------------------------------------------------------------
# prompts: {h} is the first hypernym (@); an instance hypernym (@i) only when there is none
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/wordnet/data.noun").is_file(),
                    reason="no local WordNet: apt-get install wordnet-base")
def test_hypernym_prefers_a_hypernym_over_an_earlier_instance_hypernym():
    from synthgen.prompts.tables import build_class_table

    # Alabama and Logrono list an instance hypernym (@i) before their hypernym (@); Orion and the
    # Enlightenment list the hypernym first; tench has hypernyms only
    table = build_class_table(["n09053185", "n09026499", "n09380117", "n08472590", "n01440764"])
    assert [r.hypernym for r in table] == ["South", "Spain", "diffuse nebula", "reform movement", "cyprinid"]


# --------------------------------------------------------------------------------------------------
# class-conditioning tuning: a trial reports every epoch (pruning) and scores its best epoch
# --------------------------------------------------------------------------------------------------
def test_a_trial_reports_every_epoch_and_scores_its_best_validation_epoch(monkeypatch):
    """The training loop's gradient steps are replaced by a scripted validation curve (0.30, 0.55,
    0.40) that the real callbacks, the real CAS bookkeeping and a real Optuna trial see."""
    import optuna
    import torch

    from synthgen.classcond.trials import score_images
    from synthgen.train import cas
    from synthgen.train.callbacks import run_epoch_callbacks
    from synthgen.train.classify import TrainResult
    from synthgen.train.data import ImageTensorDataset

    def scripted(model, train, val, config, *, callbacks=(), **kwargs):
        history = []
        for epoch, acc in enumerate([0.30, 0.55, 0.40], 1):
            history.append({"epoch": epoch, "train_loss": 1.0, "val_acc": acc})
            if run_epoch_callbacks(callbacks, epoch, history[-1]):
                break
        for cb in callbacks:
            cb.on_train_end()
        return TrainResult(model=model, history=history, epochs_run=len(history))

    monkeypatch.setattr(cas, "train_classifier", scripted)
    images = ImageTensorDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                                class_names=["a", "b"])
    protocol = cas.load_cas_protocol(None, ["model=resnet20", "epochs=3"])[0]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    score = score_images(images, images, protocol, seed=0, trial=trial)
    study.tell(trial, score.value)
    assert score.value == 0.55 and score.metrics["best_epoch"] == 2 and score.pruned_at is None
    assert study.trials[0].intermediate_values == {1: 0.30, 2: 0.55, 3: 0.40}


# --------------------------------------------------------------------------------------------------
# mixtures: rows per source (floor of the fraction, at least one), labels by name, groups apart
# --------------------------------------------------------------------------------------------------
def _parquet_source(path, names, n, first):
    """``n`` 8x8 images whose red value is their row's id (first, first+1, ...), labels cycling
    through ``names``, caption groups of two rows."""
    import datasets
    import numpy as np
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8, 3), first + i, np.uint8)) for i in range(n)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names),
                               "group": datasets.Value("int64")})
    data = {"image": images, "label": [i % len(names) for i in range(n)], "group": [i // 2 for i in range(n)]}
    datasets.Dataset.from_dict(data, features=feats).to_parquet(str(path))
    return path


def test_mixture_rows_labels_and_groups_per_source(tmp_path):
    from synthgen.train.config import SourceSpec
    from synthgen.train.sources import load_mixture

    a = _parquet_source(tmp_path / "mixture-a-7.parquet", ["cat", "dog"], 7, first=0)
    b = _parquet_source(tmp_path / "mixture-b-30.parquet", ["dog", "bird"], 30, first=100)
    specs = [SourceSpec(source=str(a), fraction=0.5),  # 3.5 rows: 3
             SourceSpec(source=str(b), fraction=0.05),  # 1.5 rows: 1
             SourceSpec(source=str(b), fraction=0.01),  # 0.3 rows: still 1
             SourceSpec(source=str(b), size=4),
             SourceSpec(source=str(a))]  # every row, groups from 0
    ds, rows = load_mixture(specs, image_size=None, group_column="group", seed=0)
    assert [r["rows_used"] for r in rows] == [3, 1, 1, 4, 7] and [r["rows_available"] for r in rows] == [7, 30, 30, 30, 7]
    assert len(ds) == 16 and ds.class_names == ["cat", "dog", "bird"]  # the first source's, then new names
    row_ids = ds.images[:, 0, 0, 0].tolist()
    for j, row in enumerate(row_ids):  # every row keeps its own class name
        names, i = (["cat", "dog"], row) if row < 100 else (["dog", "bird"], row - 100)
        assert ds.class_names[int(ds.labels[j])] == names[i % 2], (j, row)
    parts = [ds.groups[:3], ds.groups[3:4], ds.groups[4:5], ds.groups[5:9], ds.groups[9:]]
    for k, part in enumerate(parts):  # caption groups never merge across sources
        for other in parts[k + 1:]:
            assert not set(part.tolist()) & set(other.tolist())


# --------------------------------------------------------------------------------------------------
# Hub: a remote file counts as ours only with our bytes (same size is not enough)
# --------------------------------------------------------------------------------------------------
def test_a_remote_file_counts_as_ours_only_with_our_bytes_not_our_size(tmp_path):
    import hashlib

    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils.sha import git_hash

    from synthgen.hub.publish import index_files, same_content

    ours, theirs = b"shard bytes, version 2", b"shard bytes, version 1"
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.parquet").write_bytes(ours)
    local = index_files(tmp_path)["data/train.parquet"]

    def lfs_entry(data):
        return RepoFile(path="data/train.parquet", size=len(data), oid=git_hash(b"pointer"),
                        lfs={"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130})

    def git_entry(data):
        return RepoFile(path="data/train.parquet", size=len(data), oid=git_hash(data))

    assert same_content(lfs_entry(ours), local) and same_content(git_entry(ours), local)
    assert not same_content(lfs_entry(theirs), local) and not same_content(git_entry(theirs), local)
    assert not same_content(lfs_entry(ours + b"!"), local)
    # the sha256 a manifest already knows is trusted as the file's LFS id (no second read)
    known = index_files(tmp_path, {"data/train.parquet": hashlib.sha256(theirs).hexdigest()})["data/train.parquet"]
    assert same_content(lfs_entry(theirs), known) and not same_content(lfs_entry(ours), known)
