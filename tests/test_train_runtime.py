"""The training runtime: Keras-exact epoch callbacks, DDP on two real CPU processes, mixtures,
schedules sized to the run, probe batches sized to the data, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthgen.errors import SynthgenError
from synthgen.train.callbacks import EarlyStopping, LambdaCallback, ReduceLROnPlateau, run_epoch_callbacks

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared/datasets/cifar10"
needs_cifar = pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 parquet folder not found at {CIFAR10}")

# Lomurno et al.'s CIFAR-10 x1 synthetic run (Stable-Diffusion-Dataset-Generation,
# Checkpoints/Classifiers/Exp_0001/resnet20/cifar10/40k/.../model_history.csv): val_accuracy per
# epoch. Their log: best 0.7910 at epoch 20, rate 1e-4 from epoch 31, 1e-5 from epoch 41, stopped
# after epoch 45 (EarlyStopping patience 25), best weights restored.
LOMURNO_X1_VAL_ACC = [
    0.5743, 0.5651, 0.5806, 0.6434, 0.6597, 0.6794, 0.6658, 0.6855, 0.6616, 0.5967,
    0.6509, 0.6749, 0.7131, 0.6972, 0.7082, 0.6584, 0.7135, 0.7074, 0.7715, 0.7910,
    0.7792, 0.7749, 0.7775, 0.7816, 0.7782, 0.7778, 0.7803, 0.7757, 0.7791, 0.7724,
    0.7734, 0.7717, 0.7735, 0.7711, 0.7727, 0.7723, 0.7718, 0.7741, 0.7738, 0.7692,
    0.7734, 0.7678, 0.7690, 0.7688, 0.7685,
]  # fmt: skip
LOMURNO_X1_LR = [1e-3] * 30 + [1e-4] * 10 + [1e-5] * 5


def _replay(values, callbacks, optimizer, key="val_acc"):
    lrs, last = [], 0
    for epoch, value in enumerate(values, 1):
        lrs.append(optimizer.param_groups[0]["lr"])  # the rate the epoch trained with (Keras logs it so)
        last = epoch
        if run_epoch_callbacks(callbacks, epoch, {key: value}):
            break
    for cb in callbacks:
        cb.on_train_end()
    return lrs, last


def test_plateau_and_early_stopping_reproduce_keras_epochs_of_lomurno_log():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    plateau = ReduceLROnPlateau(opt, "val_acc", "max", factor=0.1, patience=10, min_lr=1e-5, min_delta=1e-4)
    stopper = EarlyStopping("val_acc", "max", patience=25, restore_best=model)
    weights_at = {}
    marks = LambdaCallback(lambda e, m: weights_at.setdefault(e, model.weight.detach().clone()) is None)
    bump = LambdaCallback(lambda e, m: model.weight.data.add_(1.0) is None)  # weights change every epoch
    lrs, last = _replay(LOMURNO_X1_VAL_ACC + [0.99] * 10, [bump, marks, plateau, stopper], opt)
    assert last == 45 and stopper.stopped_epoch == 45 and stopper.best_epoch == 20 and stopper.best == 0.7910
    assert lrs == pytest.approx(LOMURNO_X1_LR, rel=1e-6)
    assert plateau.cuts == [30, 40]  # cut after epoch 30 (wait 10 >= patience 10): 1e-4 from epoch 31
    assert torch.equal(model.weight, weights_at[20])  # the best epoch's weights, restored
    # torch's own ReduceLROnPlateau needs patience + 1 bad epochs: 1e-4 only from epoch 32
    opt2 = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    torch_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt2, mode="max", factor=0.1, patience=10, min_lr=1e-5)
    torch_lrs = []
    for acc in LOMURNO_X1_VAL_ACC:
        torch_lrs.append(opt2.param_groups[0]["lr"])
        torch_plateau.step(acc)
    assert torch_lrs.index(pytest.approx(1e-4)) == 31  # 0-based: epoch 32


def test_min_delta_is_absolute_and_cooldown_and_min_lr():
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    # 0.10009 after 0.1 is no improvement with Keras' absolute min_delta 1e-4 (torch's relative
    # threshold 1e-4 would count it): cuts after epochs 3 and 5, then the floor min_lr holds. (A
    # cooldown of 1 is consumed by the epoch right after a cut, as in Keras.)
    plateau = ReduceLROnPlateau(opt, "val_acc", "max", factor=0.5, patience=2, min_lr=0.3, min_delta=1e-4, cooldown=1)
    lrs, _ = _replay([0.1] + [0.10009] * 9, [plateau], opt)
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3] and plateau.cuts == [3, 5]
    stop = EarlyStopping("val_loss", "min", patience=3, min_delta=0.01)
    _, last = _replay([1.0, 0.995, 0.992, 0.991, 0.993, 0.5], [stop], opt, key="val_loss")  # within 0.01: no improvement
    assert last == 4 and stop.best_epoch == 1


def test_runtime_resolves_device_precision_and_compile():
    from synthgen.train.runtime import Runtime, autocast_dtype, compile_mode

    rt = Runtime.create("cpu", amp="auto", compile="auto")
    assert rt.device.type == "cpu" and rt.amp_dtype is None and not rt.scaler.is_enabled() and rt.is_main
    assert rt.settings() == {"device": "cpu", "amp": "fp32", "compile": None, "world_size": 1}
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16 and autocast_dtype(False, torch.device("cuda")) is None
    assert compile_mode("auto", torch.device("cuda")) == "reduce-overhead" and compile_mode("auto", torch.device("cpu")) is None
    with pytest.raises(SynthgenError, match="amp must be one of"):
        Runtime.create("cpu", amp="fp8")
    with pytest.raises(SynthgenError, match="compile must be"):
        Runtime.create("cpu", compile="fastest")
    if not torch.cuda.is_available():
        with pytest.raises(SynthgenError, match="CUDA is not available"):
            Runtime.create("cuda")


def test_only_the_runtime_resolves_devices_and_only_checkpoint_writes_weights():
    """Item 1 of the issue, as a check on the source: no other training module resolves a device,
    sets autocast, compiles, or saves/loads with torch.save/torch.load."""
    train_dir = ROOT / "synthgen" / "train"
    owners = {"runtime.py"}
    for path in train_dir.glob("*.py"):
        text = path.read_text()
        if path.name not in owners:
            for needle in ("torch.cuda.is_available()", "torch.autocast(", "torch.compile(", "GradScaler(", "init_process_group"):
                assert needle not in text, f"{path.name} uses {needle}"
        if path.name != "data.py":  # data.py memory-maps its decoded-tensor cache (weights_only=True)
            assert "torch.save(" not in text and "torch.load(" not in text, path.name
        assert "weights_only=False" not in text


# ----------------------------------------------------------------------------------------------
# DDP: two real processes (gloo) against one, same global batch
# ----------------------------------------------------------------------------------------------
DDP_SETTINGS = ["schedule.max_steps=8", "log_every=1", "dataset.limit=64", "device=cpu"]


def _pretrain_cmd(out: Path, nproc: int | None) -> list[str]:
    sets = [a for kv in [f"dataset.source={CIFAR10}", *DDP_SETTINGS] for a in ("--set", kv)]
    tail = ["pretrain", "rotation-vit-demo", *sets, "--out", str(out), "-q"]
    if nproc is None:
        return [sys.executable, "-m", "synthgen", *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "synthgen", *tail]


@needs_cifar
def test_two_process_ddp_matches_one_process(tmp_path):
    """The rotation demo (ViT: no BatchNorm; no augmentation) on 1 process and under torchrun with
    2 gloo processes, global batch 16 (8 per process): the per-step loss curves agree to 1e-4
    (float summation order only)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    curves, accs = {}, {}
    for name, nproc in (("one", None), ("two", 2)):
        res = subprocess.run(_pretrain_cmd(tmp_path / name, nproc), env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        curves[name] = [h["loss"] for h in metrics["history"]]
        accs[name] = [h["acc"] for h in metrics["history"]]
        assert metrics["runtime"]["world_size"] == (1 if nproc is None else 2)
    assert len(curves["one"]) == len(curves["two"]) == 8
    assert curves["two"] == pytest.approx(curves["one"], abs=1e-4)
    assert accs["two"] == pytest.approx(accs["one"], abs=1e-6)  # averaged in the same collective as the loss
    assert curves["one"][-1] < curves["one"][0]
    # rank 0 alone wrote: one checkpoint, no stray temp files
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "checkpoint.json", "config.yaml", "metrics.json", "model.safetensors", "optimizer.safetensors"]


STREAM_SETTINGS = ["dataset.limit=null", "dataset.stream=true", "schedule.epochs=2", "device=cpu"]


def test_two_process_stream_on_uneven_shards_keeps_in_step(tmp_path, cifar_shards):
    """Streamed shards of 90, 90, 96 and 96 rows under torchrun (2 gloo processes, 2 DataLoader
    workers each, global batch 32): both processes take the planned 11 steps every epoch (each
    worker's short batch is joined, not counted), and normalise with the same statistics."""
    from synthgen.train.runtime import Runtime
    from synthgen.train.stream import StreamBatches

    src = cifar_shards(tmp_path / "uneven", [90, 90, 96, 96])
    sets = [f"dataset.source={src}", *STREAM_SETTINGS, "objective.batch_size=32", "normalization=dataset"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "synthgen", "pretrain",
           "rotation-vit-demo", *[a for kv in sets for a in ("--set", kv)], "--out", str(tmp_path / "run"), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["step"] == metrics["total_steps"] == 22 and [e["steps"] for e in metrics["epochs"]] == [11, 11]
    norm = json.loads((tmp_path / "run/checkpoint.json").read_text())["normalization"]
    mean, std = StreamBatches(str(src), "train", Runtime.create("cpu"), labels=False).channel_stats()
    assert (norm["mean"], norm["std"]) == (list(mean), list(std))


def test_streamed_schedule_ends_and_a_finished_run_is_left_alone(tmp_path, capsys, cifar_shards):
    """Two shards of 40 rows, 2 DataLoader workers, batch 16: the stream gives the 5 batches an epoch
    the schedule plans (the workers' short batches joined), so the cosine schedule ends at lr 0 and
    running the command again trains nothing and says so."""
    src = cifar_shards(tmp_path / "shards", [40, 40])
    argv = ["pretrain", "rotation-vit-demo", "--out", str(tmp_path / "run"), "-q"]
    for kv in (f"dataset.source={src}", *STREAM_SETTINGS, "schedule.warmup_steps=0", "schedule.lr_schedule=cosine", "log_every=1"):
        argv += ["--set", kv]
    rc, out, err = _cli(argv, capsys)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["step"] == metrics["total_steps"] == 10 and metrics["history"][-1]["lr"] == 0.0
    rc, out, err = _cli(argv, capsys)
    assert rc == 0 and "already done" in out and "resumed" not in out, out + err
    assert json.loads((tmp_path / "run/metrics.json").read_text())["history"] == metrics["history"]


def test_a_classifier_schedule_ends_at_lr_0_on_the_steps_a_stream_or_odd_split_gives(tmp_path, cifar_shards, one_torch_thread):
    """Regression: train_classifier planned epochs * ceil(rows / batch) steps, but a stream under DDP
    gives every process the fewest full batches any has (11 an epoch for shards of 90, 90, 96 and 96
    rows, global batch 32, not 12), and a last batch of one row is dropped (81 rows, batch 16: 5, not
    6): the cosine schedule stopped above 0. Now it ends at 0 on the steps taken."""
    from cosine_classifier import train

    uneven = cifar_shards(tmp_path / "uneven", [90, 90, 96, 96])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/cosine_classifier.py"), str(uneven), "stream", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # both processes print to one pipe, so their lines can run together: read every {...} object
    two = sorted((json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", res.stdout)), key=lambda d: d["rank"])
    assert two == [{"rank": 0, "steps": 22, "lr": 0.0}, {"rank": 1, "steps": 22, "lr": 0.0}]
    odd = str(cifar_shards(tmp_path / "odd", [40, 41]))
    for kind in ("stream", "tensor"):
        one = train(odd, kind, 16)
        assert (one["steps"], one["lr"]) == (10, 0.0), kind


# ----------------------------------------------------------------------------------------------
# mixtures, schedules, probes, bad input
# ----------------------------------------------------------------------------------------------
def _cli(argv, capsys):
    from synthgen.cli import main

    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _folder(path: Path, n: int, with_label: bool = True, offset: int = 2000) -> Path:
    """A Hub-layout folder of n real CIFAR-10 training images (the layout `synthgen build` writes)."""
    import datasets

    rows = datasets.load_dataset(str(CIFAR10), split="train").select(range(offset, offset + n))
    if not with_label:
        rows = rows.remove_columns("label")
    (path / "data").mkdir(parents=True, exist_ok=True)
    rows.to_parquet(str(path / "data/train-00000-of-00001.parquet"))
    (path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n---\n")
    return path


@needs_cifar
@pytest.mark.slow
def test_mixture_recipe_with_a_demo_build_trains_and_records_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root
    demo = tmp_path / "demo"
    rc, _, err = _cli(["build", "demo", "--limit", "16", "--out", str(demo), "-q"], capsys)
    assert rc == 0, err
    out = tmp_path / "run"
    mix = f"dataset.sources=[{{source: ../shared/datasets/cifar10, size: 48}}, {{source: {demo}, fraction: 0.5}}]"
    rc, _, err = _cli(["pretrain", "rotation-mixture-demo", "--set", mix,
                       "--set", "device=cpu", "--out", str(out), "-q"], capsys)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows_per_source"]
    assert [(r["rows_available"], r["rows_used"]) for r in rows] == [(50_000, 48), (16, 8)]
    assert rows[0]["id"] == str(CIFAR10.resolve()) and rows[1]["id"] == str(demo.resolve())
    assert metrics["images"] == 56 and metrics["step"] == 2 * (56 // 16)


@needs_cifar
def test_mixture_concatenates_and_bad_mixtures_are_one_line(tmp_path, capsys):
    from synthgen.train.config import load_pretrain_config
    from synthgen.train.sources import load_mixture

    # (unique folder names: datasets' cache has mixed up same-named local folders in one session)
    a, b = _folder(tmp_path / "mix-a-30", 30), _folder(tmp_path / "mix-b-20", 20, offset=4000)
    cfg = load_pretrain_config("rotation-mixture-demo", [f"dataset.sources=[{{source: {a}, size: 10}}, {{source: {b}, fraction: 0.5}}]"])
    ds, rows = load_mixture(cfg.dataset.sources, image_size=32, require_labels=True)
    assert len(ds) == 20 and [r["rows_used"] for r in rows] == [10, 10] and ds.class_names[:2] == ["airplane", "automobile"]
    nolabel = _folder(tmp_path / "mix-nolabel-12", 12, with_label=False)
    for sources, pattern in (
        (f"[{{source: {a}, fraction: 1.5}}]", r"dataset\.sources\.0\.fraction: .*1"),
        (f"[{{source: {a}, fraction: 0}}]", r"dataset\.sources\.0\.fraction"),
        (f"[{{source: {a}, size: 5, fraction: 0.5}}]", r"size or fraction, not both"),
        (f"[{{source: {a}, size: 31}}]", r"size 31 but .* has 30 rows"),
        (f"[{{source: {a}}}, {{source: {nolabel}}}]", r"some mixture sources have labels and some do not"),
    ):
        rc, _, err = _cli(["pretrain", "rotation-mixture-demo", "--set", f"dataset.sources={sources}",
                           "--out", str(tmp_path / "never"), "-q"], capsys)
        assert rc == 1 and err.count("\n") == 1 and err.startswith("error:"), err
        import re

        assert re.search(pattern, err), err
        assert not (tmp_path / "never").exists()


@needs_cifar
def test_a_capped_run_ends_its_schedule_and_probe_batches_fit_the_data(tmp_path):
    from synthgen.train.config import load_pretrain_config
    from synthgen.train.evaluate import probe_batch_size
    from synthgen.train.pretrain import pretrain

    cfg = load_pretrain_config("simclr-demo", [f"dataset.source={CIFAR10}", "dataset.limit=64", "objective.batch_size=16",
                                               "schedule.epochs=100", "schedule.max_steps=6", "schedule.warmup_steps=2",
                                               "schedule.lr_schedule=cosine", "log_every=1", "device=cpu"])
    lrs = [h["lr"] for h in pretrain(cfg, tmp_path, progress=False).metrics["history"]]
    peak = cfg.optimizer.lr
    # warm-up over 2 of the 6 steps run, then cosine to 0 at step 6 (not sized for 100 epochs)
    assert lrs[1] == pytest.approx(peak) and lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[2] < peak
    assert probe_batch_size(360, 1024) == 36 and probe_batch_size(45_000, 1024) == 1024


def test_stablerep_recipe_follows_the_authors_code():
    from synthgen.train.config import load_pretrain_config
    from synthgen.train.models import create_model
    from synthgen.train.pretrain import _Trainee, build_head, decay_groups

    cfg = load_pretrain_config("stablerep-vit")
    o = cfg.optimizer
    batch = cfg.objective.groups_per_batch * cfg.objective.images_per_group
    assert batch == 43 * 32 * 6 and o.resolved_lr(batch) == pytest.approx(2e-4 * 43 * 32 * 6 / 256 / 2)
    assert o.grad_clip is None and o.decay_exempt_bias_and_norm and tuple(o.betas) == (0.9, 0.98)
    assert cfg.schedule.warmup(1000) == 500 and cfg.schedule.lr_schedule == "cosine"
    backbone = create_model("vit_tiny", 0, image_size=32, depth=1, patch_size=8, embed_dim=32, num_heads=2)
    model = _Trainee(backbone, build_head(cfg.objective, 32))
    decay, exempt = decay_groups(model, 0.1, True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert exempt["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert all(names[id(p)].endswith("bias") or p.ndim < 2 for p in exempt["params"])
    assert any("norm" in names[id(p)] for p in exempt["params"]) and all(p.ndim >= 2 for p in decay["params"])


@needs_cifar
def test_unknown_protocol_field_and_source_without_labels(tmp_path, capsys):
    nolabel = _folder(tmp_path / "runtime-nolabel-12", 12, with_label=False)
    rc, _, err = _cli(["cas", str(nolabel), "--real", str(CIFAR10), "--set", "plateau.patiense=3"], capsys)
    assert rc == 1 and "plateau.patiense: unknown key (did you mean patience?)" in err and err.count("\n") == 1
    rc, _, err = _cli(["evaluate", "--dataset", str(nolabel), "--model", "pixels", "--protocol", "knn", "-q",
                       "--out", str(tmp_path / "r.json")], capsys)
    assert rc == 1 and "no label column" in err and err.count("\n") == 1, err


def test_hub_datasets_record_the_commit_they_resolved(monkeypatch):
    """A Hub id is resolved to a commit sha first (HfApi.dataset_info; the fake-Hub-server test
    covers the HTTP side), the data is loaded at exactly that commit, and the sha is recorded."""
    import datasets
    import huggingface_hub
    import numpy as np

    from synthgen.train import data

    sha = "0123456789abcdef0123456789abcdef01234567"
    calls = []

    class Info:
        def __init__(self, sha):
            self.sha = sha

    def fake_info(self, repo_id, revision=None, **kw):
        calls.append(("info", repo_id, revision))
        return Info(sha)

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    table = datasets.Dataset.from_dict({"image": [np.zeros((8, 8, 3), np.uint8)] * 2, "label": [0, 1]}, features=feats)

    def fake_load(path, *a, revision=None, **kw):
        calls.append(("load", path, revision))
        return datasets.DatasetDict({"train": table})

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", fake_info)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = data.load_image_dataset("org/name", "train", revision="v1.0.0", cache=False)
    assert ds.source["sha"] == sha and ds.source["revision"] == "v1.0.0" and ds.source["id"] == "org/name"
    assert calls == [("info", "org/name", "v1.0.0"), ("load", "org/name", sha)]


@needs_cifar
def test_cas_runs_under_torchrun_and_rank_0_alone_writes(tmp_path):
    """`synthgen cas` on two gloo processes: each trains on half of every global batch, the
    validation and test metrics are summed over both (all 63 test rows: one process scores one
    more), and one result file is written."""
    out = tmp_path / "cas.json"
    sets = ["model=resnet20", "epochs=1", "batch_size=64", "real_fit=256", "real_val=64", "limit_real_test=63", "limit_synthetic=256"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "synthgen", "cas",
           str(CIFAR10), "--real", str(CIFAR10), *[a for kv in sets for a in ("--set", kv)], "--device", "cpu", "--no-cache",
           "-q", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["runtime"]["world_size"] == 2 and res.stdout.count("results: ") == 1
    # the per-class scores are summed over both processes too: every test row of each class counted once
    from synthgen.train.data import load_image_dataset

    labels = load_image_dataset(str(CIFAR10), "test", limit=63).labels
    counts = doc["real"]["test"]["class_counts"]
    assert list(counts.values()) == torch.bincount(labels, minlength=10).tolist()
    for run in (doc["real_baseline"], doc["runs"][0]):
        assert run["n_test"] == 63 and run["epochs_run"] == 1 and 0 <= run["top1"] <= 100
        weighted = sum(run["class_top1"][n] * counts[n] for n in counts) / 63
        assert weighted == pytest.approx(run["top1"], abs=1e-3)


@needs_cifar
def test_per_class_scores_under_torchrun_match_one_process(tmp_path, one_torch_thread):
    """One seeded model scored on 63 test rows (batches of 16 split 8/8 ... 8/7) and on 1 row (the
    second process scores none) by two gloo processes: both report exactly one process's numbers."""
    from ddp_eval import score

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/ddp_eval.py"), str(CIFAR10), "63", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = sorted((json.loads(line) for line in res.stdout.splitlines() if line.startswith("[")), key=lambda d: d[0]["rank"])
    one = score(str(CIFAR10), [63, 1])
    assert sum(one[0]["class_rows"]) == 63 and sum(one[0]["class_hits"]) > 0 and sum(one[1]["class_rows"]) == 1
    assert one[0]["top1"] == sum(one[0]["class_hits"]) / 63
    assert [[d["rank"] for d in lines] for lines in two] == [[0, 0], [1, 1]]
    for lines in two:
        assert [{**d, "rank": 0} for d in lines] == one
