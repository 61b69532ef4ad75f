"""Pre-training demos (rotation, SimCLR, StableRep) and evaluation (linear probe, k-NN, fine-tuning)
on a CIFAR-10 subset, on the CPU; plus recipe validation and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from synthgen.errors import RecipeError, SynthgenError
from synthgen.train.config import (
    list_train_recipes,
    load_eval_config,
    load_pretrain_config,
    load_train_recipe,
    resolve_source,
)

CIFAR10 = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"
needs_cifar = pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 parquet folder not found at {CIFAR10}")
SRC = f"dataset.source={CIFAR10}"


# --------------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------------
def test_every_bundled_training_recipe_validates():
    names = list_train_recipes()
    for required in (
        "rotation-vit", "rotation-vit-demo", "stablerep-vit", "stablerep-vit-demo", "simclr", "simclr-demo",
        "linear-probe-cifar10", "knn-cifar10", "finetune-cifar10",
    ):  # fmt: skip
        assert required in names
    for name in names:
        data, _ = load_train_recipe(name)
        if data.get("kind") == "cas":
            from synthgen.train.cas import load_cas_protocol

            cfg = load_cas_protocol(name)[0]
        elif data.get("kind") == "classcond":  # tested in test_classcond_*.py
            from synthgen.classcond.recipe import load_classcond_recipe

            cfg = load_classcond_recipe(name)
        else:
            cfg = load_pretrain_config(name) if "objective" in data else load_eval_config(name)
        assert cfg.name == name
    rot = load_pretrain_config("rotation-vit")
    assert (rot.optimizer.name, rot.optimizer.lr, rot.objective.batch_size, rot.schedule.epochs) == ("adam", 1e-4, 80, 90)
    sr = load_pretrain_config("stablerep-vit")
    assert sr.objective.kind == "stablerep" and sr.objective.temperature == 0.1 and sr.objective.images_per_group == 6
    assert (sr.optimizer.name, sr.optimizer.weight_decay, tuple(sr.optimizer.betas)) == ("adamw", 0.1, (0.9, 0.98))
    assert sr.model.name == "vit_base" and sr.model.kwargs["patch_size"] == 16
    assert load_pretrain_config("simclr").objective.kind == "simclr"


@pytest.mark.parametrize(
    "loader,recipe,override,key",
    [
        (load_pretrain_config, "rotation-vit-demo", "optimizer.lrr=3", "optimizer.lrr"),
        (load_pretrain_config, "simclr-demo", "objective.temprature=0.2", "objective.temprature"),
        (load_pretrain_config, "rotation-vit-demo", "schedule.epochs=0", "schedule.epochs"),
        (load_pretrain_config, "rotation-vit-demo", "bogus=1", "bogus"),
        (load_eval_config, "knn-cifar10", "knn.kk=5", "knn.kk"),
        (load_eval_config, "linear-probe-cifar10", "protocol=svm", "protocol"),
    ],
)
def test_bad_keys_give_one_error_naming_the_key(loader, recipe, override, key):
    with pytest.raises(RecipeError) as info:
        loader(recipe, [override])
    msg = str(info.value)
    assert "\n" not in msg and f"{key}:" in msg
    assert "rotation." not in msg and "simclr." not in msg  # no discriminator tags in the key


def test_wrong_recipe_kind_and_missing_dataset_path(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="synthgen evaluate"):
        load_pretrain_config("knn-cifar10")
    with pytest.raises(RecipeError, match="synthgen pretrain"):
        load_eval_config("rotation-vit")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SynthgenError, match="resolved against the current directory"):
        resolve_source("../nowhere/cifar10")
    (tmp_path / "data").mkdir()
    assert resolve_source("data") == str((tmp_path / "data").resolve())
    assert resolve_source("org/name") == "org/name"
    assert resolve_source("s3://bucket/in1k-sd") == "s3://bucket/in1k-sd"  # load_image_dataset reads it


def test_cli_bad_key_is_one_error_line(capsys):
    from synthgen.cli import main
    import synthgen.cli.pretrain_cmds  # noqa: F401

    assert main(["pretrain", "rotation-vit-demo", "--set", "optimizer.betaz=[0.9, 0.9]"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "optimizer.betaz" in err[0]
    assert main(["evaluate"]) == 2  # nothing to evaluate: a usage error, as a missing argument is
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--dataset" in err[0]


# --------------------------------------------------------------------------------------------------
# pre-training
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rotation_run(tmp_path_factory):
    """The rotation demo (64 images, 40 steps), run as 20 steps + a resumed 20."""
    if not CIFAR10.is_dir():
        pytest.skip(f"CIFAR-10 parquet folder not found at {CIFAR10}")
    from synthgen.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("rotation")
    half = pretrain(load_pretrain_config("rotation-vit-demo", [SRC, "schedule.max_steps=20"]), out, progress=False)
    assert half.metrics["step"] == 20 and half.resumed_from_step is None
    full = pretrain(load_pretrain_config("rotation-vit-demo", [SRC]), out, progress=False)
    return out, half, full


@needs_cifar
def test_rotation_demo_lowers_loss_resumes_and_checkpoints(rotation_run):
    from synthgen.train.evaluate import load_backbone
    from synthgen.train.pretrain import pretrain

    out, half, full = rotation_run
    assert full.resumed_from_step == 20 and full.metrics["step"] == full.metrics["total_steps"] == 40
    hist = full.metrics["history"]
    assert [h["step"] for h in hist] == [1, 10, 20, 30, 40]  # the resumed run continued the history
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.1, hist  # starts near ln 4 = 1.386
    assert hist[-1]["acc"] > 0.4  # rotation accuracy over the last 10 steps (chance 0.25)
    for name in ("checkpoint.json", "model.safetensors", "optimizer.safetensors", "metrics.json", "config.yaml"):
        assert (out / name).is_file()
    assert not list(out.glob("*.pt"))  # no pickles
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["final_loss"] == hist[-1]["loss"] and "torch" in metrics["versions"]
    state = json.loads((out / "checkpoint.json").read_text())
    assert state["config"]["objective"]["kind"] == "rotation" and state["step"] == 40
    backbone, info = load_backbone(out)
    assert info["image_size"] == 32 and len(info["normalization"]["mean"]) == 3
    with torch.no_grad():
        assert backbone.forward_features_pooled(torch.zeros(2, 3, 32, 32)).shape == (2, backbone.num_features)
    # a finished run is not repeated; another config into the same folder is refused
    again = pretrain(load_pretrain_config("rotation-vit-demo", [SRC]), out, progress=False)
    assert again.metrics["step"] == 40 and again.metrics["history"] == hist
    with pytest.raises(SynthgenError, match=r"different config \(differs in: optimizer.lr, schedule.epochs\); use another --out"):
        pretrain(load_pretrain_config("rotation-vit-demo", [SRC, "optimizer.lr=0.1", "schedule.epochs=3"]), out, progress=False)


@needs_cifar
@pytest.mark.parametrize("recipe", ["simclr-demo", "stablerep-vit-demo"])
def test_contrastive_demos_run_and_checkpoint(recipe, tmp_path):
    from synthgen.train.pretrain import pretrain

    cfg = load_pretrain_config(recipe, [SRC, "schedule.max_steps=3", "log_every=1", "dataset.limit=200"])
    result = pretrain(cfg, tmp_path, progress=False)
    losses = [h["loss"] for h in result.metrics["history"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "checkpoint.json").is_file() and (tmp_path / "model.safetensors").is_file()


# SimCLR (its projection head has a BatchNorm) for 2 epochs of 4 steps; log records span the cut
RESUME_SETS = [SRC, "dataset.limit=64", "objective.batch_size=16", "schedule.epochs=2", "schedule.max_steps=null",
               "log_every=3", "device=cpu"]


@pytest.fixture(scope="module")
def simclr_uninterrupted(tmp_path_factory):
    if not CIFAR10.is_dir():
        pytest.skip(f"CIFAR-10 parquet folder not found at {CIFAR10}")
    from synthgen.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("simclr-full")
    pretrain(load_pretrain_config("simclr-demo", RESUME_SETS), out, progress=False)
    return out


@needs_cifar
@pytest.mark.parametrize("how,call,saved_step", [("raise", 3, 2), ("sigint", 6, 6)])
def test_interrupted_mid_epoch_then_resumed_matches_uninterrupted(simclr_uninterrupted, tmp_path, monkeypatch, how, call, saved_step):
    """Interrupted during a step mid-epoch, then resumed: parameters, BatchNorm running statistics,
    optimizer state and logged losses are bit-identical to the uninterrupted run's. ``raise``: a
    KeyboardInterrupt raised inside the step after its forward pass (the step is dropped, its BatchNorm
    update undone); ``sigint``: a real Ctrl-C during the step (held until the step is done)."""
    import os
    import signal

    from synthgen.train.checkpoint import load_checkpoint
    from synthgen.train.pretrain import pretrain
    from synthgen.train.runtime import Runtime

    real_step, calls = Runtime.step, []

    def interrupting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Runtime, "step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        pretrain(load_pretrain_config("simclr-demo", RESUME_SETS), tmp_path, progress=False)
    assert load_checkpoint(tmp_path)["step"] == saved_step  # mid-epoch: 4 steps per epoch
    monkeypatch.setattr(Runtime, "step", real_step)
    resumed = pretrain(load_pretrain_config("simclr-demo", RESUME_SETS), tmp_path, progress=False)
    assert resumed.resumed_from_step == saved_step

    full, cut = load_checkpoint(simclr_uninterrupted), load_checkpoint(tmp_path)
    a, b = full.model_state(), cut.model_state()
    assert a.keys() == b.keys() and any(k.endswith("running_mean") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    oa, ob = full.optimizer_state()["state"], cut.optimizer_state()["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    assert (cut["step"], cut["history"], cut["epochs_log"]) == (full["step"], full["history"], full["epochs_log"])
    assert [e["steps"] for e in cut["epochs_log"]] == [4, 4]


@needs_cifar
@pytest.mark.parametrize("nan_call,checkpoint_step", [(4, None), (6, 4)])
def test_a_non_finite_loss_stops_the_run_before_any_checkpoint_holds_it(tmp_path, monkeypatch, nan_call, checkpoint_step):
    """Step losses stay on the device between reads (every ``log_every`` steps and at each epoch's
    end); a non-finite one is still one error naming its step, and the checkpoint written at an
    epoch's end never holds the weights after it. 4 steps an epoch, log_every 3, a checkpoint each
    epoch: NaN at the 4th step -> found at the epoch's end, before its checkpoint; at the 6th -> found
    at the step-6 read, the epoch-1 checkpoint (step 4) untouched."""
    import synthgen.train.pretrain as pretrain_module
    from synthgen.train.checkpoint import has_checkpoint, load_checkpoint

    real_loss, calls = pretrain_module.objective_loss, []

    def poisoned(*args, **kwargs):
        loss, extra = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == nan_call else loss), extra

    monkeypatch.setattr(pretrain_module, "objective_loss", poisoned)
    with pytest.raises(SynthgenError, match=rf"^loss became nan at step {nan_call - 1}; lower optimizer.lr$"):
        pretrain_module.pretrain(load_pretrain_config("simclr-demo", RESUME_SETS + ["checkpoint_every=1"]), tmp_path,
                                 progress=False)
    if checkpoint_step is None:
        assert not has_checkpoint(tmp_path)
    else:
        state = load_checkpoint(tmp_path)
        assert state["step"] == checkpoint_step
        assert all(torch.isfinite(t).all() for t in state.model_state().values())


@needs_cifar
def test_the_pretraining_loop_reads_device_values_only_at_log_points(tmp_path, monkeypatch):
    """On a GPU each read of a device value (``bool``, ``float``, ``item``, ``tolist``) waits for every
    queued kernel. The loop reads its losses once per log record and epoch end, not once per step:
    8 steps (2 epochs of 4), log_every 3 -> reads after steps 1, 3, 4 (epoch end), 6 and 8."""
    import sys

    import synthgen.train.pretrain as pretrain_module

    reads: list[str] = []
    for name in ("__bool__", "__float__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == pretrain_module.__file__:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    result = pretrain_module.pretrain(load_pretrain_config("simclr-demo", RESUME_SETS), tmp_path, progress=False)
    assert result.metrics["step"] == 8 and [h["step"] for h in result.metrics["history"]] == [1, 3, 6, 8]
    assert reads == ["tolist"] * 5


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
EVAL_SUBSET = [SRC, "dataset.train_limit=400", "dataset.test_limit=200", "device=cpu"]


@needs_cifar
def test_linear_probe_and_knn_on_the_checkpoint(rotation_run):
    from synthgen.train.evaluate import evaluate

    out = str(rotation_run[0])
    lin = evaluate(
        load_eval_config("linear-probe-cifar10", EVAL_SUBSET + [f"checkpoint={out}", "linear.epochs=15"]), progress=False
    )
    # the feature pass reports each batch (the CLI's progress bar), in images
    from synthgen.train.evaluate import extract_dataset_features
    from synthgen.train.runtime import Runtime

    done = []
    backbone = load_backbone_for_test(out)
    feats = extract_dataset_features(backbone, torch.zeros(10, 3, 32, 32, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3,
                                     Runtime.create("cpu"), batch_size=4, on_batch=done.append)
    assert done == [4, 4, 2] and feats.shape[0] == 10
    knn = evaluate(load_eval_config("knn-cifar10", EVAL_SUBSET + [f"checkpoint={out}", "knn.k=[5, 20]"]), progress=False)
    for report in (lin, knn):
        assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
        assert report["num_classes"] == 10 and report["datasets"]["sizes"] == {"train": 400, "fit": 360, "val": 40, "test": 200}
        assert report["normalization"]["kind"] == "checkpoint"
        assert report["backbone"]["pretrain"]["objective"] == "rotation"
        assert report["datasets"]["test"]["split"] == "test" and "torch" in report["versions"]
        json.dumps(report)
    assert 1 <= lin["result"]["epoch"] <= 15 and lin["result"]["weight_decay"] in lin["config"]["linear"]["weight_decays"]
    assert knn["result"]["selected_k"] in (5, 20) and set(knn["result"]["per_k"]) == {"5", "20"}


@needs_cifar
def test_knn_on_raw_pixels_beats_chance():
    """Real signal: pixel-space k-NN on 1,000 CIFAR-10 images scores well above 10% (about 30%)."""
    from synthgen.train.evaluate import evaluate

    cfg = load_eval_config(
        "knn-cifar10",
        [SRC, "checkpoint=null", "model={name: pixels}", "dataset.train_limit=1000", "dataset.test_limit=500",
         "knn.k=[20]", "device=cpu"],
    )  # fmt: skip
    report = evaluate(cfg, progress=False)
    assert report["top1"] > 0.2, report["top1"]
    assert report["top5"] > 0.6


def test_knn_scores_weighted_vote():
    from synthgen.train.evaluate import knn_scores, topk_accuracy

    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    q = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    votes = knn_scores(train, labels, q, k=2, num_classes=3, temperature=0.1)
    assert votes.argmax(1).tolist() == [0, 1]
    import torch.nn.functional as F

    s = F.normalize(q, dim=1) @ F.normalize(train, dim=1).t()
    assert votes[0, 0].item() == pytest.approx((s[0, 0] / 0.1).exp().item() + (s[0, 1] / 0.1).exp().item(), rel=1e-5)
    assert votes[0, 2].item() == 0.0  # not among the 2 nearest
    acc = topk_accuracy(votes, torch.tensor([0, 2]), num_classes=3)
    assert acc == {"top1": 0.5}  # no top-5 with fewer than 5 classes


@needs_cifar
def test_finetune_and_cli_report(rotation_run, tmp_path):
    from synthgen.cli import main
    import synthgen.cli.pretrain_cmds  # noqa: F401

    out = rotation_run[0]
    report_path = tmp_path / "ft.json"
    argv = ["evaluate", "finetune-cifar10", "--checkpoint", str(out), "--dataset", str(CIFAR10), "--out", str(report_path), "-q"]
    for item in ["dataset.train_limit=200", "dataset.test_limit=100", "finetune.epochs=2", "finetune.batch_size=32",
                 "finetune.warmup_steps=0", "device=cpu"]:  # fmt: skip
        argv += ["--set", item]
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["protocol"] == "finetune" and 0.0 <= report["top1"] <= 1.0 and report["top5"] is not None
    assert report["result"]["epoch"] in (1, 2) and len(report["result"]["history"]) == 2
    assert report["config"]["finetune"]["label_smoothing"] == 0.1 and report["seed"] == 0
    # no recipe: --dataset + --model
    report2 = tmp_path / "knn.json"
    argv = ["evaluate", "--dataset", str(CIFAR10), "--model", "pixels", "--protocol", "knn", "--out", str(report2), "-q",
            "--set", "dataset.train_limit=100", "--set", "dataset.test_limit=50", "--set", "knn.k=[5]"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(report2.read_text())["protocol"] == "knn"


# --------------------------------------------------------------------------------------------------
# checkpoint safety and bad input
# --------------------------------------------------------------------------------------------------
class _Boom:
    """Unpickling this calls os.system: a crafted checkpoint that would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _run_cli(argv, capsys):
    from synthgen.cli import main
    import synthgen.cli.pretrain_cmds  # noqa: F401

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_evaluate_refuses_a_checkpoint_and_a_model_together(tmp_path, capsys):
    """--model would silently replace --checkpoint: the report would score a random network."""
    argv = ["evaluate", "knn-cifar10", "--checkpoint", str(tmp_path), "--model", "resnet20", "--out", str(tmp_path / "r.json"),
            "-q", "--set", "dataset.train_limit=20", "--set", "dataset.test_limit=10", "--set", "knn.k=[5]"]
    rc, _, err = _run_cli(argv, capsys)
    assert rc == 2 and "give --checkpoint or --model, not both" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
    # in a recipe or --set too: the checkpoint would win and the model setting be ignored
    with pytest.raises(RecipeError, match="give either checkpoint or model, not both"):
        load_eval_config("knn-cifar10", ["model={name: resnet20}"])


def test_evaluate_refuses_a_folder_as_out_before_evaluating(tmp_path, capsys, monkeypatch):
    import synthgen.train.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: pytest.fail("evaluation started"))
    argv = ["evaluate", "--dataset", str(tmp_path), "--model", "pixels", "--out", str(tmp_path)]
    rc, _, err = _run_cli(argv, capsys)
    assert rc == 1 and err.startswith(f"error: --out {tmp_path} is a folder; give a file path") and "Traceback" not in err


@needs_cifar
def test_crafted_pickle_checkpoint_never_runs(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(pickle.dumps({"kind": "synthgen-pretrain", "x": _Boom(marker)}))
    # evaluate --checkpoint on the file and on its folder; pretrain --out on the folder
    for ckpt in (folder / "checkpoint.pt", folder):
        rc, _, err = _run_cli(["evaluate", "--checkpoint", str(ckpt), "--dataset", str(CIFAR10), "-q",
                               "--set", "dataset.train_limit=20", "--set", "dataset.test_limit=10"], capsys)
        assert rc == 1 and err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err, err
    rc, _, err = _run_cli(["pretrain", "rotation-vit-demo", "--set", SRC, "--set", "schedule.max_steps=1", "--out", str(folder), "-q"], capsys)
    # the pickle is no checkpoint (only checkpoint.json + safetensors are), and a new run does not write beside it
    assert rc == 1 and "holds other files (checkpoint.pt) and no checkpoint" in err, err
    assert not marker.exists()


@needs_cifar
def test_garbage_and_foreign_checkpoints_are_one_line(rotation_run, tmp_path, capsys):
    import shutil

    base = ["--dataset", str(CIFAR10), "-q", "--set", "dataset.train_limit=20", "--set", "dataset.test_limit=10"]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "checkpoint.json").write_bytes(b"\x80\x04garbage\x00")
    rc, _, err = _run_cli(["evaluate", "--checkpoint", str(garbage), *base], capsys)
    assert rc == 1 and "not a readable checkpoint" in err and "Traceback" not in err and err.count("\n") == 1
    # a checkpoint of another model: the recipe's model spec swapped for a wider ViT
    other = tmp_path / "other"
    shutil.copytree(rotation_run[0], other)
    doc = json.loads((other / "checkpoint.json").read_text())
    doc["model"]["kwargs"]["embed_dim"] = 128
    (other / "checkpoint.json").write_text(json.dumps(doc))
    rc, _, err = _run_cli(["evaluate", "--checkpoint", str(other), *base], capsys)
    assert rc == 1 and "holds the weights of another model" in err and err.count("\n") == 1, err
    # tensors that do not belong to the JSON (a partial or mixed checkpoint)
    (other / "model.safetensors").write_bytes((other / "optimizer.safetensors").read_bytes())
    rc, _, err = _run_cli(["evaluate", "--checkpoint", str(other), *base], capsys)
    assert rc == 1 and "sha256 differs" in err


def load_backbone_for_test(out):
    from synthgen.train.evaluate import load_backbone

    return load_backbone(out)[0]


@needs_cifar
def test_a_new_run_never_writes_among_other_files(tmp_path, capsys):
    """--out that holds other things (a dataset folder, a source tree) and no checkpoint is refused
    before any work; what an interrupted first checkpoint leaves behind is not in the way."""
    from synthgen.train.pretrain import pretrain

    dataset = tmp_path / "outputs" / "demo"
    (dataset / "data").mkdir(parents=True)
    (dataset / "synthgen_manifest.json").write_text("{}")
    rc, _, err = _run_cli(["pretrain", "rotation-vit-demo", "--set", SRC, "--out", str(dataset)], capsys)
    assert rc == 1 and err.strip() == (f"error: {dataset} holds other files (data, synthgen_manifest.json) and no "
                                       "checkpoint; choose an empty or new --out")
    assert sorted(p.name for p in dataset.iterdir()) == ["data", "synthgen_manifest.json"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    rc, _, err = _run_cli(["pretrain", "rotation-vit-demo", "--set", SRC, "--out", str(a_file)], capsys)
    assert rc == 1 and err.strip() == f"error: --out {a_file} is a file, not a folder"
    crashed = tmp_path / "crashed"  # killed while writing its first checkpoint: no checkpoint.json yet
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    (crashed / "optimizer.safetensors.tmp123").write_bytes(b"partial")
    result = pretrain(load_pretrain_config("rotation-vit-demo", [SRC, "schedule.max_steps=2"]), crashed, progress=False)
    assert result.metrics["step"] == 2 and (crashed / "checkpoint.json").is_file()


@needs_cifar
def test_the_progress_bar_goes_to_stderr_and_the_results_to_stdout(tmp_path):
    """Redirected stdout holds the result lines only (the bar, when shown, is on stderr)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "synthgen", "pretrain", "rotation-vit-demo", "--set", SRC,
                           "--set", "schedule.max_steps=2", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"checkpoint: {out}" and "━" not in proc.stdout
    assert "pretrain rotation-vit-demo (rotation)" in proc.stderr


@needs_cifar
def test_ctrl_c_keeps_the_last_checkpoint_and_says_so(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "synthgen", "pretrain", "rotation-vit-demo", "--set", SRC, "--set",
                             "schedule.epochs=100000", "--out", str(out), "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.json").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("interrupted: the last checkpoint is kept; run the same command again "
                                            "to resume from it")
    assert json.loads((out / "checkpoint.json").read_text())["step"] > 0


def test_pretrain_with_a_missing_dataset_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = _run_cli(["pretrain", "rotation-vit-demo", "--set", f"dataset.source={tmp_path / 'nowhere'}", "--out", str(out)], capsys)
    assert rc == 1 and "not found" in err and not out.exists()


def test_a_dataset_without_a_test_split_names_the_setting_that_picks_one(tmp_path, cifar_shards, capsys):
    """A `synthgen build` folder has one split, train: the error says how to evaluate on another."""
    folder = cifar_shards(tmp_path / "train-only", [60])
    argv = ["evaluate", "--dataset", str(folder), "--model", "pixels", "--protocol", "knn", "--device", "cpu",
            "--out", str(tmp_path / "report.json"), "-q"]
    rc, _, err = _run_cli(argv, capsys)
    assert rc == 1 and err.splitlines() == [
        f"error: {folder} has no split 'test'; available: train; name another with --set dataset.test_split=<split>"]
    assert not (tmp_path / "report.json").exists()
    rc, out, _ = _run_cli([*argv, "--set", "dataset.test_split=train", "--set", "knn.k=[5]"], capsys)
    assert rc == 0 and "on 60 test images" in out


def test_pretrain_on_a_missing_split_names_the_setting_that_picks_one(tmp_path, cifar_shards, capsys):
    """Pre-training reads dataset.split (decoded or streamed) or each mixture source's split: a missing
    one is one line that says which setting picks another, and nothing is written."""
    folder = cifar_shards(tmp_path / "train-only", [60])
    base = ["pretrain", "rotation-vit-demo", "--set", f"dataset.source={folder}", "--set", "dataset.split=validation",
            "--set", "schedule.max_steps=1", "-q"]
    missing = f"error: {folder} has no split 'validation'; available: train"
    for extra in ([], ["--set", "dataset.stream=true"]):
        out = tmp_path / f"run{len(extra)}"
        rc, _, err = _run_cli([*base, *extra, "--out", str(out)], capsys)
        assert rc == 1 and err.splitlines() == [f"{missing}; name another with --set dataset.split=<split>"], err
        assert not out.exists() or not any(out.iterdir())
    sources = f"dataset.sources=[{{source: {CIFAR10}, size: 10}}, {{source: {folder}, split: validation}}]"
    rc, _, err = _run_cli(["pretrain", "rotation-vit-demo", "--set", "dataset.source=null", "--set", "dataset.limit=null",
                           "--set", sources, "--set", "schedule.max_steps=1", "-q", "--out", str(tmp_path / "mix")], capsys)
    assert rc == 1 and err.splitlines() == [f"{missing}; set `split` of dataset.sources[1] in the recipe"], err


def _string_label_copy(root: Path, n_train: int, n_test: int, rename: dict | None = None) -> tuple[Path, Path]:
    """Two Hub-layout copies of the first CIFAR-10 rows, the test split without airplanes: one with
    the ClassLabel column, one with the class NAMES as plain strings (``rename`` changes some test names)."""
    import datasets

    src = CIFAR10 / "data"
    tr = datasets.load_dataset("parquet", data_files=str(src / "train-00000-of-00002.parquet"), split="train").select(range(n_train))
    te = datasets.load_dataset("parquet", data_files=str(src / "test-00000-of-00001.parquet"), split="train").select(range(n_test))
    te = te.filter(lambda r: r["label"] != 0)  # no 'airplane' (class 0) in test
    names = tr.features["label"].names

    def as_strings(d, rename):
        d = d.cast_column("label", datasets.Value("int64"))
        return d.map(lambda r: {"name": rename.get(names[r["label"]], names[r["label"]])}).remove_columns("label").rename_column("name", "label")

    out = []
    for kind, conv in (("classlabel", lambda d, _: d), ("strings", as_strings)):
        folder = root / kind
        (folder / "data").mkdir(parents=True)
        conv(tr, {}).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
        conv(te, rename or {}).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
        out.append(folder)
    return out[0], out[1]


@needs_cifar
def test_string_labels_of_the_test_split_map_onto_the_train_split_by_name(tmp_path):
    """String labels are numbered per split; with no airplane in the test split its ids would shift by
    one (top-1 about 8%). Matched by name, pixel k-NN scores exactly what the ClassLabel copy does."""
    from synthgen.train.evaluate import evaluate

    classlabel, strings = _string_label_copy(tmp_path, 1000, 500)
    args = ["checkpoint=null", "model={name: pixels}", "knn.k=[20]", "device=cpu"]
    ref = evaluate(load_eval_config("knn-cifar10", [f"dataset.source={classlabel}", *args]), progress=False)
    got = evaluate(load_eval_config("knn-cifar10", [f"dataset.source={strings}", *args]), progress=False)
    assert ref["datasets"]["sizes"]["test"] == got["datasets"]["sizes"]["test"] < 500
    assert ref["top1"] > 0.2
    assert got["top1"] == ref["top1"] and got["top5"] == ref["top5"]


@needs_cifar
def test_a_test_class_name_the_train_split_lacks_is_one_error(tmp_path):
    from synthgen.train.evaluate import evaluate

    _, strings = _string_label_copy(tmp_path, 200, 100, rename={"truck": "lorry"})
    cfg = load_eval_config("knn-cifar10", [f"dataset.source={strings}", "checkpoint=null", "model={name: pixels}",
                                           "knn.k=[5]", "device=cpu"])
    with pytest.raises(SynthgenError, match=r"1 test split 'test' label name\(s\) not in the train split 'train': 'lorry'"):
        evaluate(cfg, progress=False)
