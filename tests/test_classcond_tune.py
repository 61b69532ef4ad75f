"""Stages 2 and 4 (Optuna) on the real tiny pipeline, real CIFAR-10 images and real on-disk storage.

A stage-1 run of the tiny recipe (200 CIFAR-10 images at 32 px, 2 encoder epochs) is tuned with
40-image trials and the 0.27M ResNet-20 validated on 100 real held-out training images.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from synthgen.errors import SynthgenError

CIFAR = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"
pytestmark = [
    pytest.mark.skipif(not CIFAR.is_dir(), reason=f"real CIFAR-10 not found at {CIFAR}"),
    pytest.mark.usefixtures("one_torch_thread"),
]
# The tiny recipe's classifier runs 3 epochs; a reduction factor of 4 makes Hyperband one bracket
# with one rung, at epoch 1.
TINY = [f"dataset.source={CIFAR}", "tuning.pruner.reduction_factor=4"]
# A rung at epoch 4 of 3: nothing is ever pruned.
NO_PRUNING = ["tuning.pruner.min_resource=4", "tuning.pruner.max_resource=4"]


def recipe(*overrides):
    from synthgen.classcond.recipe import load_classcond_recipe

    return load_classcond_recipe("classcond-tiny", [*TINY, *overrides])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_pipeline_path):
    from synthgen.classcond.run import train_stage

    run_dir = tmp_path_factory.mktemp("tune") / "run"
    train_stage(run_dir, recipe(), device="cpu")
    return run_dir


def fresh_run(stage1, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(stage1, run_dir)
    return run_dir


class TestSplit:
    """A real test split no tuning code may touch: any attribute read fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"tuning read the real test split ({name})")


@pytest.fixture
def test_split_tripwire(monkeypatch):
    """Every dataset load synthgen makes goes through _load_hf_split: asking it for a test split fails."""
    import synthgen.train.data as data

    real = data._load_hf_split

    def guarded(source, split, revision, *args, **kwargs):
        assert split != "test", f"tuning asked for the test split of {source}"
        return real(source, split, revision, *args, **kwargs)

    monkeypatch.setattr(data, "_load_hf_split", guarded)


def sh_prunes(values_before: list[float], value: float, bootstrap: int, eta: int) -> bool:
    """Optuna's successive-halving rule at a rung, for a maximised objective."""
    competing = sorted([*values_before, value])
    if len(competing) <= bootstrap:
        return True
    k = max(len(competing) // eta - 1, 0)
    return value < competing[-(k + 1)]


def test_pruning_must_happen_and_the_test_split_is_never_read(stage1, tmp_path, test_split_tripwire):
    import optuna

    from synthgen.classcond.tune import tune_stage
    from synthgen.train.data import load_image_dataset

    run_dir = fresh_run(stage1, tmp_path)
    train = load_image_dataset(str(CIFAR), "train", limit=200, require_labels=True)
    # bootstrap_count 1: the first trial to reach the rung is pruned there, whatever it scores
    r = recipe("tuning.pruner.bootstrap_count=1")
    seen = []
    result = tune_stage(run_dir, r, "encoder", real=(train, TestSplit()), trials=4, device="cpu", on_trial=seen.append)
    assert result.finished == 4 and result.ran == 4 and len(seen) == 4

    study = optuna.load_study(study_name="classcond-encoder", storage=f"sqlite:///{run_dir}/tune-encoder/study.db")
    trials = study.get_trials()
    assert trials[0].params == {"steps": 6, "guidance": 2.0, "encoder_epoch": 2}  # the enqueued defaults
    assert trials[0].state.name == "PRUNED" and list(trials[0].intermediate_values) == [1]
    assert trials[0].user_attrs["epochs_run"] == 1  # the classifier stopped: 1 epoch of 3
    for i, t in enumerate(trials):  # every decision is successive halving on the reported accuracies
        before = [u.intermediate_values[1] for u in trials[:i]]
        assert (t.state.name == "PRUNED") == sh_prunes(before, t.intermediate_values[1], bootstrap=1, eta=4), i
        if t.state.name == "COMPLETE":
            assert sorted(t.intermediate_values) == [1, 2, 3] and t.value == max(t.intermediate_values.values())
            assert t.user_attrs["epochs_run"] == 3
    assert result.pruned == sum(t.state.name == "PRUNED" for t in trials) >= 1

    folder = run_dir / "tune-encoder"
    history = json.loads((folder / "history.json").read_text())
    assert [row["state"] for row in history["trials"]] == [t.state.name for t in trials]
    assert history["trials"][0]["pruned_at"] == 1
    importances = json.loads((folder / "importances.json").read_text())
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert importances["trials"] == len(complete) and importances["importances"] is None  # too few to say
    assert "too few finished trials" in importances["reason"]
    assert (folder / "history.png").stat().st_size > 1000 and (folder / "importances.png").stat().st_size > 1000
    if complete:
        best = json.loads((folder / "best.json").read_text())
        winner = max(complete, key=lambda t: t.value)
        assert best["params"] == winner.params and best["value"] == winner.value and best["trial"] == winner.number
    else:
        assert not (folder / "best.json").exists()


def test_study_folder_of_another_recipe_is_refused_and_left_alone(stage1, tmp_path):
    from synthgen.classcond.tune import tune_stage

    run_dir = fresh_run(stage1, tmp_path)
    tune_stage(run_dir, recipe(), "encoder", trials=1, device="cpu")
    folder = run_dir / "tune-encoder"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(SynthgenError, match=r"holds a study for another recipe \(images: 40, not 41\)") as err:
        tune_stage(run_dir, recipe("tuning.images=41"), "encoder", trials=1, device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(SynthgenError, match=r"another recipe \(storage: sqlite, not journal\)"):
        tune_stage(run_dir, recipe("tuning.storage=journal"), "encoder", trials=1, device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    # more trials of the same recipe extend the study; another process on a SQLite study is refused
    from synthgen.classcond.study import StudyFolder

    with StudyFolder(folder, "sqlite").exclusive():
        with pytest.raises(SynthgenError, match="being tuned by another process"):
            tune_stage(run_dir, recipe(), "encoder", trials=2, device="cpu")
    assert tune_stage(run_dir, recipe(), "encoder", trials=2, device="cpu").ran == 1


def test_a_trial_stopped_by_ctrl_c_is_retried_on_the_next_start(stage1, tmp_path):
    from synthgen.classcond.tune import tune_stage
    from synthgen.train.callbacks import LambdaCallback

    def interrupt(epoch, metrics):
        raise KeyboardInterrupt

    run_dir = fresh_run(stage1, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tune_stage(run_dir, recipe(*NO_PRUNING), "encoder", trials=1, device="cpu",
                   trial_callbacks=lambda trial: [LambdaCallback(interrupt)])
    result = tune_stage(run_dir, recipe(*NO_PRUNING), "encoder", trials=1, device="cpu")
    assert result.retried == [0] and result.finished == 1 and result.ran == 1
    best = json.loads((run_dir / "tune-encoder" / "best.json").read_text())
    assert best["trial"] == 1 and best["params"] == {"steps": 6, "guidance": 2.0, "encoder_epoch": 2}  # the defaults again
    assert tune_stage(run_dir, recipe(*NO_PRUNING), "encoder", trials=1, device="cpu").retried == []  # retried once only


KILLED = """
import sys, time, torch
torch.set_num_threads(1)
from synthgen.classcond.recipe import load_classcond_recipe
from synthgen.classcond.tune import tune_stage
from synthgen.train.callbacks import LambdaCallback
recipe = load_classcond_recipe("classcond-tiny", {overrides!r})

def hang(trial):
    def stop_here(epoch, metrics):
        if trial.number == 1 and epoch == 2:  # trial 1 has reported epochs 1 and 2
            open(sys.argv[2], "w").close()
            time.sleep(600)
    return [LambdaCallback(stop_here)]

tune_stage(sys.argv[1], recipe, "encoder", trials=3, device="cpu", trial_callbacks=hang)
"""


def test_kill_9_mid_trial_then_resume_keeps_finished_trials_and_retries_the_killed_one(stage1, tmp_path):
    import optuna

    from synthgen.classcond.tune import tune_stage

    run_dir, marker = fresh_run(stage1, tmp_path), tmp_path / "killed-here"
    overrides = [*TINY, *NO_PRUNING, "tuning.storage=journal"]  # the storage for several processes
    script = tmp_path / "tune.py"
    script.write_text(textwrap.dedent(KILLED.format(overrides=overrides)))
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(marker)], stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "tuning never reached trial 1"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def load():
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(str(run_dir / "tune-encoder" / "study.journal")))
        return optuna.load_study(study_name="classcond-encoder", storage=storage).get_trials()

    killed = load()
    assert [t.state.name for t in killed] == ["COMPLETE", "RUNNING"]
    assert sorted(killed[1].intermediate_values) == [1, 2]

    from synthgen.classcond.recipe import load_classcond_recipe

    result = tune_stage(run_dir, load_classcond_recipe("classcond-tiny", overrides), "encoder", trials=3, device="cpu")
    assert result.retried == [1] and result.finished == 3 and result.ran == 2
    trials = load()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].value == killed[0].value and trials[0].params == killed[0].params  # kept, not rerun
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == killed[1].params
    assert sorted(retry.intermediate_values) == [1, 2, 3]  # run again from the start
    assert retry.user_attrs["worker"] != killed[1].user_attrs["worker"]
    assert not list((run_dir / "tune-encoder" / ".workers").iterdir())  # no worker left registered


TOGETHER = """
import pathlib, sys, time, torch
torch.set_num_threads(1)
from synthgen.classcond.recipe import load_classcond_recipe
from synthgen.classcond.tune import tune_stage
from synthgen.train.callbacks import LambdaCallback
recipe = load_classcond_recipe("classcond-tiny", {overrides!r})
me, other = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])

def meet(trial):  # each process's first trial waits until the other is in a trial too
    def wait(epoch, metrics):
        me.touch()
        deadline = time.time() + 280  # the other process may still be importing on a loaded machine
        while not other.exists() and time.time() < deadline:
            time.sleep(0.05)
    return [LambdaCallback(wait)]

result = tune_stage(sys.argv[1], recipe, "encoder", trials=4, device="cpu", trial_callbacks=meet)
print("RAN", result.ran, flush=True)
"""


@pytest.mark.slow
def test_two_processes_tune_one_journal_study(stage1, tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    run_dir = fresh_run(stage1, tmp_path)
    overrides = [*TINY, *NO_PRUNING, "tuning.storage=journal"]
    script = tmp_path / "together.py"
    script.write_text(textwrap.dedent(TOGETHER.format(overrides=overrides)))
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [subprocess.Popen([sys.executable, str(script), str(run_dir), str(x), str(y)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for x, y in ((a, b), (b, a))]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    ran = [int(o[0].split("RAN", 1)[1]) for o in outs]
    storage = JournalStorage(JournalFileBackend(str(run_dir / "tune-encoder" / "study.journal")))
    trials = optuna.load_study(study_name="classcond-encoder", storage=storage).get_trials()
    assert all(r >= 1 for r in ran) and sum(ran) == len(trials)
    assert 4 <= len(trials) <= 5  # both may start a trial when 3 are finished and none is running
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert [t.number for t in trials if "fixed_params" in t.system_attrs] == [0]  # the defaults, enqueued once
    assert json.loads((run_dir / "tune-encoder" / "best.json").read_text())["finished"] >= 4


def test_run_stops_in_one_line_when_tuning_has_no_best(stage1, tmp_path):
    """Every trial pruned (bootstrap_count 1, one trial): stage 2 has no parameters to hand on, and the
    run says so instead of failing on a missing key."""
    from synthgen.classcond.run import run_classcond
    from synthgen.train.data import load_image_dataset

    run_dir = fresh_run(stage1, tmp_path)
    train = load_image_dataset(str(CIFAR), "train", limit=200, require_labels=True)
    r = recipe("tuning.pruner.bootstrap_count=1", "tuning.encoder_trials=1")
    with pytest.raises(SynthgenError, match=r"stage 2 \(tune-encoder\): 1 trials finished \(1 pruned\), no best yet: "
                                            r"every finished trial was pruned"):
        run_classcond(run_dir, r, real=(train, TestSplit()), device="cpu")
    assert not (run_dir / "tune-encoder" / "best.json").exists() and not (run_dir / "unet").exists()


def test_fanova_without_scikit_learn_is_refused_up_front_and_the_report_still_written(tmp_path, monkeypatch):
    """scikit-learn is no dependency (the ``fanova`` extra): without it, tuning with
    ``importance: fanova`` stops in one line before any trial, and a report of a finished study
    says why it has no importances instead of failing; PED-ANOVA (the default) needs nothing."""
    import optuna

    from synthgen.classcond.report import check_importance_evaluator, param_importances, write_study_report

    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError, installed or not
    with pytest.raises(SynthgenError, match=r"^tuning.importance: fanova needs scikit-learn \(pip install scikit-learn"):
        check_importance_evaluator("fanova")
    check_importance_evaluator("ped-anova")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/study.db", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("guidance", 1, 9) - 0.1 * t.suggest_int("steps", 5, 50), n_trials=8)
    report = write_study_report(study, tmp_path, "fanova")
    saved = json.loads((tmp_path / "importances.json").read_text())
    assert saved == report["importances"] and saved["importances"] is None and saved["trials"] == 8
    assert "pip install scikit-learn" in saved["reason"]
    assert (tmp_path / "importances.png").stat().st_size > 1000
    ped = param_importances(study, "ped-anova")["importances"]
    assert set(ped) == {"guidance", "steps"} and sum(ped.values()) == pytest.approx(1.0)


def test_final_dataset_of_other_settings_is_refused_with_advice_for_this_command(stage1, tmp_path):
    """The final stage on a run folder whose dataset/ was built with other settings (stage 4 tuned
    again) says how to redo it in a run folder (not build's --overwrite/--out, which `classcond run`
    lacks), and leaves tuned.json describing the dataset that is there."""
    from synthgen.classcond.final import final_stage, save_tuned_pipeline, tuned_settings
    from synthgen.classcond.generation import final_dataset_recipe
    from synthgen.classcond.run import finetune_stage
    from synthgen.dataset.build import build_dataset
    from synthgen.train.data import load_image_dataset

    run_dir = fresh_run(stage1, tmp_path)
    r = recipe("unet.epochs=1")
    finetune_stage(run_dir, r, encoder_epoch=2, device="cpu")
    for stage, params in (("encoder", {"encoder_epoch": 2}), ("unet", {"encoder_epoch": 2, "unet_epoch": 1})):
        best = {"params": {"steps": 3, "guidance": 2.0, **params}, "value": 0.5, "trial": 0}
        (run_dir / f"tune-{stage}").mkdir()
        (run_dir / f"tune-{stage}" / "best.json").write_text(json.dumps(best))
    info = json.loads((run_dir / "run.json").read_text())
    pipeline = save_tuned_pipeline(run_dir, tuned_settings(run_dir))
    old = final_dataset_recipe(r, pipeline_dir=pipeline, steps=2, guidance=2.0, count=200, class_names=info["class_names"],
                               resolution=32, stored_size=32, device="cpu")
    build_dataset(old, run_dir / "dataset", limit=1, progress=False)  # an earlier final dataset: 2 steps
    train = load_image_dataset(str(CIFAR), "train", limit=200, require_labels=True)
    with pytest.raises(SynthgenError, match=r"holds recipe 'classcond-tiny-tuned' with other settings \(differs in: "
                                            r"generator.steps\); remove dataset/ and cas/ from the run folder") as exc:
        final_stage(run_dir, r, real=(train, TestSplit()), device="cpu", progress=False)
    assert "--overwrite" not in str(exc.value) and not (run_dir / "tuned.json").exists()
