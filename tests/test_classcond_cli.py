"""`synthgen classcond ...` end to end on CPU, and bad input as one line with nothing half-written.

The whole pipeline runs with train/classcond-tiny.yaml: the tiny random-weight Stable Diffusion,
200 CIFAR-10 training images at 32 px, 2 encoder and 2 LoRA epochs, 3 + 2 trials of 40 images, the
0.27M ResNet-20 on 100 + 100 real images, and final datasets of x1 and x2 (100 images per unit).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

CIFAR = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"
pytestmark = [
    pytest.mark.skipif(not CIFAR.is_dir(), reason=f"real CIFAR-10 not found at {CIFAR}"),
    pytest.mark.usefixtures("one_torch_thread"),
]
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SOURCE = f"dataset.source={CIFAR}"


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.slow
def test_run_all_stages_then_resume_and_regenerate(tmp_path, tiny_pipeline_path, capsys):
    import datasets
    import numpy as np

    from synthgen.cli import main
    from synthgen.classcond.checkpoints import list_epochs
    from synthgen.dataset import regenerate_row

    run_dir = tmp_path / "run"
    assert main(["classcond", "run", "classcond-tiny", "--run-dir", str(run_dir), "--set", SOURCE, "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 (train)" in out and "stage 4 (tune-unet)" in out and "final: CAS top-1 x1" in out
    assert f"pipeline {run_dir / 'pipeline'}, dataset {run_dir / 'dataset'}, CAS results {run_dir / 'cas'}" in out

    # checkpoints of both training stages
    assert list_epochs(run_dir / "encoder") == [1, 2] and list_epochs(run_dir / "unet") == [1, 2]
    assert (run_dir / "unet" / "epoch-0002" / "adapter_model.safetensors").is_file()
    # the tuned settings and the plots
    tuned = json.loads((run_dir / "tuned.json").read_text())
    best2 = json.loads((run_dir / "tune-encoder" / "best.json").read_text())
    best4 = json.loads((run_dir / "tune-unet" / "best.json").read_text())
    assert tuned["encoder_epoch"] == best2["params"]["encoder_epoch"] == best4["params"]["encoder_epoch"]
    assert (tuned["steps"], tuned["guidance"], tuned["unet_epoch"]) == tuple(best4["params"][k] for k in ("steps", "guidance", "unet_epoch"))
    assert best4["search"]["steps"] == [2, best2["params"]["steps"]]  # stage 4: steps <= stage 2's best
    assert best4["search"]["guidance"] == [0.0, 2 * best2["params"]["guidance"]]  # guidance <= 2 x best
    for study in ("tune-encoder", "tune-unet"):
        for name in ("history.png", "history.json", "importances.png", "importances.json", "study.db"):
            assert (run_dir / study / name).is_file(), (study, name)
    curve = json.loads((run_dir / "cas" / "cas-vs-scale.json").read_text())
    assert curve["scales"] == [1, 2] and curve["images"] == [100, 200] and len(curve["top1"]) == 2
    gaps = curve["class_gaps"]  # x2's classes, largest real - synthetic gap first
    assert len(gaps) == 10 and [g["gap"] for g in gaps] == sorted((g["gap"] for g in gaps), reverse=True)
    assert f"final: classes furthest below the real baseline at x2: {gaps[0]['class']} " in out
    assert (run_dir / "cas" / "cas-vs-scale.png").is_file() and (run_dir / "cas" / "cas.json").is_file()
    # the tuned pipeline, loadable by its class, recording its epochs
    index = json.loads((run_dir / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionedPipeline" and index["class_names"] == NAMES
    assert (index["training"]["encoder_epoch"], index["training"]["unet_epoch"]) == (tuned["encoder_epoch"], tuned["unet_epoch"])

    # the final dataset: CIFAR-10's class names, the planned counts (the real set is balanced)
    ds = datasets.load_dataset(str(run_dir / "dataset"), split="train")
    assert ds.features["label"].names == NAMES and len(ds) == 200
    assert Counter(ds["label"]) == {c: 20 for c in range(10)}
    assert Counter(ds["label"][:100]) == {c: 10 for c in range(10)}  # scale x1 (the first unit) is balanced too
    assert ds[0]["image"].size == (32, 32) and ds[0]["prompt"] is None
    manifest = json.loads((run_dir / "dataset" / "synthgen_manifest.json").read_text())
    assert manifest["generation_settings"]["steps"] == tuned["steps"]
    assert manifest["model"]["class_conditioning"]["training"]["unet_epoch"] == tuned["unet_epoch"]
    assert np.array_equal(np.asarray(regenerate_row(run_dir / "dataset", 57)), np.asarray(ds[57]["image"]))

    # run again: every stage is complete and returns at once, nothing is redone
    before = sorted((p.relative_to(run_dir).as_posix(), p.stat().st_mtime_ns) for p in (run_dir / "dataset").rglob("*.parquet"))
    assert main(["classcond", "run", "classcond-tiny", "--run-dir", str(run_dir), "--set", SOURCE, "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 (train): encoder epochs 1-2" in out and "(already done)" in out and "0 run now" in out
    assert sorted((p.relative_to(run_dir).as_posix(), p.stat().st_mtime_ns) for p in (run_dir / "dataset").rglob("*.parquet")) == before
    # a study folder of another recipe: one line, the folder untouched
    listing = sorted(p.name for p in (run_dir / "tune-encoder").iterdir())
    assert main(["classcond", "tune", "classcond-tiny", "--run-dir", str(run_dir), "--set", SOURCE,
                 "--set", "tuning.steps=[3, 6]", "--device", "cpu"]) == 1
    assert "holds a study for another recipe (search.steps: [2, 6], not [3, 6])" in one_error_line(capsys)
    assert sorted(p.name for p in (run_dir / "tune-encoder").iterdir()) == listing


def test_dataset_without_labels(tmp_path, capsys):
    import datasets
    from PIL import Image

    from synthgen.cli import main

    images = [Image.new("RGB", (8, 8), (10 * i, 200, 30)) for i in range(4)]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).to_parquet(
        tmp_path / "unlabelled.parquet")
    capsys.readouterr()
    code = main(["classcond", "train", "classcond-tiny", "--run-dir", str(tmp_path / "run"),
                 "--set", f"dataset.source={tmp_path / 'unlabelled.parquet'}", "--device", "cpu"])
    assert code == 1 and "has no label column" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_base_model_without_cross_attention(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from synthgen.cli import main

    small = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    DDPMPipeline(unet=UNet2DModel(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, **small),
                 scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    capsys.readouterr()
    code = main(["classcond", "train", "classcond-tiny", "--run-dir", str(tmp_path / "run"), "--set", SOURCE,
                 "--set", f"base_model={tmp_path / 'ddpm'}", "--device", "cpu"])
    assert code == 1 and "has no cross-attention layers" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_quiet_train_and_finetune_print_no_epoch_lines(tmp_path, capsys, tiny_pipeline_path):
    from synthgen.cli import main

    args = ["--set", SOURCE, "--set", "encoder.epochs=1", "--set", "unet.epochs=1", "--device", "cpu"]
    assert main(["classcond", "train", "classcond-tiny", "--run-dir", str(tmp_path / "loud"), *args]) == 0
    assert "encoder epoch 1/1 loss" in capsys.readouterr().err  # the line -q leaves out
    run = ["--run-dir", str(tmp_path / "run"), *args]
    assert main(["classcond", "train", "classcond-tiny", *run, "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "stage 1 (class encoder): epochs 1-1" in out and "(trained)" in out
    assert main(["classcond", "finetune", "classcond-tiny", *run, "--encoder-epoch", "1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "stage 3 (UNet, lora): epochs 1-1" in out and "(trained)" in out


def test_missing_stages_and_epochs_are_one_line(tmp_path, capsys, tiny_pipeline_path):
    from synthgen.cli import main

    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--set", SOURCE, "--device", "cpu"]
    assert main(["classcond", "tune", "classcond-tiny", *args]) == 1
    assert "is not a class-conditioning run folder" in one_error_line(capsys)
    assert main(["classcond", "train", "classcond-tiny", *args, "--set", "encoder.epochs=1"]) == 0
    capsys.readouterr()
    assert main(["classcond", "finetune", "classcond-tiny", *args, "--encoder-epoch", "9"]) == 1
    assert "encoder epoch 9 does not exist" in one_error_line(capsys)
    assert main(["classcond", "finetune", "classcond-tiny", *args]) == 1  # no stage-2 result to take the epoch from
    assert "stage 2 (tune encoder) has no result" in one_error_line(capsys)
    assert main(["classcond", "tune", "classcond-tiny", *args]) == 1  # stage 1 has 1 of the recipe's 2 epochs
    assert "encoder training finished 1 of 2 epochs" in one_error_line(capsys)
    assert main(["classcond", "tune", "classcond-tiny", *args, "--stage", "decoder"]) == 1
    assert "stage must be one of encoder, unet" in one_error_line(capsys)
    assert main(["classcond", "run", "classcond-tiny", *args, "--set", "tuning.steps=[0, 5]"]) == 1
    assert "tuning.steps: must be [low, high] with 1 <= low <= high" in one_error_line(capsys)
    assert main(["classcond", "run", "cas-lomurno", *args]) == 1
    assert "is not a class-conditioning recipe" in one_error_line(capsys)
    for device, why in (("gpu0", "unknown device 'gpu0'"), ("cuda:1", "CUDA is not available")):
        if device == "cuda:1" and torch.cuda.is_available():
            continue
        args = ["--run-dir", str(run_dir), "--set", SOURCE, "--device", device]
        assert main(["classcond", "finetune", "classcond-tiny", *args, "--encoder-epoch", "1"]) == 1
        assert why in one_error_line(capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == ["encoder", "latents.safetensors", "run.json"]
    # a checkpoint whose weights are gone: one line naming it, no pickle fallback
    (run_dir / "encoder" / "epoch-0001" / "diffusion_pytorch_model.safetensors").unlink()
    args = ["--run-dir", str(run_dir), "--set", SOURCE, "--device", "cpu"]
    assert main(["classcond", "finetune", "classcond-tiny", *args, "--encoder-epoch", "1"]) == 1
    assert f"cannot load the class encoder checkpoint {run_dir / 'encoder' / 'epoch-0001'}" in one_error_line(capsys)


def test_gaps_line_names_only_classes_below_the_real_baseline():
    """`classcond run`'s last line: a class the synthetic classifier scores as well as (or better
    than) the real one is not 'below the real baseline', so it is not named."""
    from synthgen.classcond.run import gaps_line

    real = {"cat": 50.0, "dog": 30.0, "frog": 0.0, "ship": 10.0}
    syn = {"cat": 20.0, "dog": 25.0, "frog": 0.0, "ship": 40.0}
    cas = {"real_baseline": {"class_top1": real}, "runs": [{"scale": 1, "class_top1": real}, {"scale": 2, "class_top1": syn}]}
    assert gaps_line(cas) == "final: classes furthest below the real baseline at x2: cat 20.0% (real 50.0%), dog 25.0% (real 30.0%)"
    assert gaps_line({**cas, "runs": [{"scale": 2, "class_top1": real}]}) == ""
