"""Class-conditioned SD, stages 1 and 3, on the real tiny pipeline and real CIFAR-10 images (CPU).

The run trains on the first 200 images of CIFAR-10's training split at 32 px (8x8 latents in the
tiny model). The encoder stage uses lr 1e-2 (with the paper's 1e-4, the loss through the tiny
random-weight UNet moved by under 0.01% in 3 epochs); everything else is the stage's real code path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from synthgen.errors import SynthgenError

CIFAR = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"
pytestmark = [
    pytest.mark.skipif(not CIFAR.is_dir(), reason=f"real CIFAR-10 not found at {CIFAR}"),
    pytest.mark.usefixtures("one_torch_thread"),
]

IMAGES = 200
ENCODER = dict(resolution=32, epochs=4, batch_size=32, lr=1e-2)


def train_encoder(run_dir, **kw):
    from synthgen.classcond import train_class_encoder

    args = dict(split="train", limit=IMAGES, config=ENCODER)
    args.update(kw)
    return train_class_encoder(run_dir, "builtin:tiny-sd", str(CIFAR), **args)


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, tiny_pipeline_path):
    run_dir = tmp_path_factory.mktemp("classcond") / "run"
    epochs = []
    result = train_encoder(run_dir, on_epoch_end=lambda info: epochs.append(info))
    return run_dir, result, epochs


def fixed_draw_losses(run_dir, result):
    """The noise-prediction loss with fixed draws (same noise, timesteps, latents) for the initial
    encoder and after each epoch."""
    from synthgen.classcond import ClassEncoder, denoising_loss
    from synthgen.classcond.base import load_base_components
    from synthgen.classcond.config import EncoderStageConfig
    from synthgen.classcond.latents import read_latents
    from synthgen.classcond.train_encoder import initial_encoder

    base = load_base_components("builtin:tiny-sd")
    latents = read_latents(run_dir / "latents.safetensors")
    encoders = [initial_encoder(base.unet, 10, EncoderStageConfig(**ENCODER))]
    encoders += [ClassEncoder.from_pretrained(result.checkpoints[e]) for e in sorted(result.checkpoints)]
    return [
        denoising_loss(base.unet, base.noise_scheduler, latents, lambda y: enc(F.one_hot(y, 10).float()), seed=0, repeats=2)
        for enc in encoders
    ]


def test_encoder_loss_falls_on_cifar10(encoder_run):
    run_dir, result, _ = encoder_run
    losses = fixed_draw_losses(run_dir, result)
    # Measured (torch 2.14, CPU): 1.1117, 1.0996, 1.0878, 1.0803, 1.0786: every epoch lowers it, by
    # 3.0% in all.
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.985 * losses[0], losses


def test_stage1_writes_latents_and_a_checkpoint_per_epoch(encoder_run):
    import json

    from synthgen.classcond.checkpoints import list_epochs

    run_dir, result, infos = encoder_run
    assert list_epochs(run_dir / "encoder") == [1, 2, 3, 4] and sorted(result.checkpoints) == [1, 2, 3, 4]
    assert [i.epoch for i in infos] == [1, 2, 3, 4] and all(i.checkpoint.is_dir() for i in infos)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["class_names"][:2] == ["airplane", "automobile"] and info["resolution"] == 32
    assert info["dataset"]["rows"] == IMAGES and info["base_revision"].startswith("sha256:")
    cached = load_file(run_dir / "latents.safetensors")
    assert cached["moments"].shape == (IMAGES, 8, 8, 8)  # mean + log-variance of 4 channels, 32 px / 4
    from synthgen.train.data import load_image_dataset

    assert torch.equal(cached["labels"], load_image_dataset(str(CIFAR), "train", limit=IMAGES).labels)
    for epoch in (1, 4):
        folder = result.checkpoints[epoch]
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["epoch"] == epoch and state["global_step"] == epoch * 7  # ceil(200 / 32) steps
        assert state["settings"]["config"]["lr"] == ENCODER["lr"]
        assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    # the moments of the optimizer are kept for the newest epoch only (the one a resume reads)
    assert (result.checkpoints[4] / "optimizer.safetensors").is_file()
    assert not (result.checkpoints[3] / "optimizer.safetensors").exists()
    assert state["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine decay ends at zero


def test_finished_stage_returns_at_once_and_other_settings_are_refused(encoder_run):
    run_dir, result, _ = encoder_run
    again = train_encoder(run_dir)
    assert again.resumed_from == 4 and again.losses == result.losses
    before = sorted(p.name for p in (run_dir / "encoder").iterdir())
    with pytest.raises(SynthgenError, match=r"encoder was trained with config.lr=\S+ \(now 0.001\); resume with the same settings"):
        train_encoder(run_dir, config={**ENCODER, "lr": 1e-3})
    with pytest.raises(SynthgenError, match="holds a run for another dataset"):
        train_encoder(run_dir, limit=100)
    assert sorted(p.name for p in (run_dir / "encoder").iterdir()) == before


KILLED_RUN = """
import os, sys, time, torch
torch.set_num_threads(1)
from synthgen.classcond import train_class_encoder
marker = sys.argv[2]
def hang(epoch, step, loss):
    if epoch == 2 and step == 3:  # mid-epoch 2: epoch 1 is checkpointed, epoch 2 is not
        open(marker, "w").close()
        time.sleep(600)
train_class_encoder(sys.argv[1], "builtin:tiny-sd", {cifar!r}, split="train", limit={images},
                    config={config!r}, on_step_end=hang)
"""


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, encoder_run):
    _, uninterrupted, _ = encoder_run
    run_dir, marker = tmp_path / "run", tmp_path / "killed-here"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(KILLED_RUN.format(cifar=str(CIFAR), images=IMAGES, config=ENCODER)))
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(marker)], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the training never reached epoch 2"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (run_dir / "encoder").iterdir()) == ["epoch-0001"]
    (run_dir / "encoder" / ".epoch-0002.tmp999").mkdir()  # what a kill during a checkpoint write leaves

    resumed = train_encoder(run_dir)
    assert resumed.resumed_from == 1 and sorted(resumed.checkpoints) == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "encoder").iterdir()) == [f"epoch-000{i}" for i in range(1, 5)]
    # Shuffles and draws depend on (seed, epoch) only, so resuming reproduces the uninterrupted run.
    a = load_file(resumed.checkpoints[4] / "diffusion_pytorch_model.safetensors")
    b = load_file(uninterrupted.checkpoints[4] / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == pytest.approx(uninterrupted.losses, rel=1e-6)


def test_dataset_without_labels_is_one_line_and_writes_nothing(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (8, 8), (10 * i, 200, 30)) for i in range(4)]
    unlabelled = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    unlabelled.to_parquet(tmp_path / "unlabelled.parquet")
    run_dir = tmp_path / "run"
    from synthgen.classcond import train_class_encoder

    with pytest.raises(SynthgenError, match="no label column") as err:
        train_class_encoder(run_dir, "builtin:tiny-sd", str(tmp_path / "unlabelled.parquet"), config=ENCODER)
    assert "\n" not in str(err.value) and not run_dir.exists()


def test_base_model_without_cross_attention_is_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

    from synthgen.classcond import train_class_encoder
    from synthgen.classcond.base import load_base_components

    small = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    unconditional = tmp_path / "ddpm"
    DDPMPipeline(unet=UNet2DModel(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, **small),
                 scheduler=DDPMScheduler()).save_pretrained(unconditional)
    with pytest.raises(SynthgenError, match=r"UNet2DModel\) has no cross-attention"):
        train_class_encoder(tmp_path / "run", str(unconditional), str(CIFAR), limit=IMAGES, config=ENCODER)
    assert not (tmp_path / "run").exists()

    plain = UNet2DConditionModel(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                 mid_block_type=None, cross_attention_dim=32, **small)
    from synthgen.classcond import ClassEncoder

    with pytest.raises(SynthgenError, match=r"UNet2DConditionModel\) has no cross-attention"):
        ClassEncoder.for_unet(plain, 10)
    with pytest.raises(SynthgenError, match="no 'unet' component|not a diffusers pipeline folder"):
        load_base_components(str(tmp_path))


def test_encoder_epoch_that_does_not_exist(encoder_run):
    from synthgen.classcond import finetune_unet, load_run_pipeline

    run_dir, _, _ = encoder_run
    with pytest.raises(SynthgenError, match=r"encoder epoch 9 does not exist .*\(finished epochs: 1-4\)"):
        finetune_unet(run_dir, encoder_epoch=9)
    with pytest.raises(SynthgenError, match=r"encoder epoch 0 does not exist"):
        load_run_pipeline(run_dir, encoder_epoch=0)
    with pytest.raises(SynthgenError, match=r"no UNet checkpoints"):
        load_run_pipeline(run_dir, unet_epoch=1)
    assert not (run_dir / "unet").exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_stage3_finetunes_the_unet_with_a_checkpoint_per_epoch(tmp_path, encoder_run, method):
    import json
    import shutil

    import numpy as np

    from synthgen.classcond import finetune_unet, load_run_pipeline

    run_dir = tmp_path / "run"
    shutil.copytree(encoder_run[0], run_dir)
    config = dict(epochs=2, batch_size=16, lr=1e-3, method=method, lora_rank=4)
    result = finetune_unet(run_dir, encoder_epoch=2, config=config)
    assert sorted(result.checkpoints) == [1, 2] and result.resumed_from == 0
    newest = result.checkpoints[2]
    files = sorted(p.name for p in newest.iterdir())
    weights = "adapter_model.safetensors" if method == "lora" else "diffusion_pytorch_model.safetensors"
    assert weights in files and "optimizer.safetensors" in files
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["settings"]["encoder_epoch"] == 2 and state["global_step"] == 2 * 13  # ceil(200 / 16)
    size = sum(p.stat().st_size for p in result.checkpoints[1].iterdir())
    assert size < 200_000 if method == "lora" else size > 3_000_000  # tiny UNet: 0.97M parameters

    assert finetune_unet(run_dir, encoder_epoch=2, config=config).resumed_from == 2  # done: nothing to do
    with pytest.raises(SynthgenError, match=r"trained with encoder_epoch=2 \(now 3\)"):
        finetune_unet(run_dir, encoder_epoch=3, config=config)
    with pytest.raises(SynthgenError, match="fine-tuned with encoder epoch 2, not 1"):
        load_run_pipeline(run_dir, encoder_epoch=1, unet_epoch=2)

    tuned = load_run_pipeline(run_dir, unet_epoch=2)
    plain = load_run_pipeline(run_dir, encoder_epoch=2)
    assert tuned.config.training["encoder_epoch"] == 2 and tuned.config.training["unet_epoch"] == 2
    images = []
    for pipe in (tuned, plain):
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
        images.append(pipe([0, 5], num_inference_steps=3, guidance_scale=2.0, generator=gens, output_type="np").images)
    assert np.abs(images[0] - images[1]).max() > 1e-4  # the fine-tuned UNet changed the pixels


def test_fresh_lora_runs_with_one_seed_give_the_same_adapters(tmp_path, encoder_run):
    import shutil

    from safetensors.torch import load_file

    from synthgen.classcond import finetune_unet

    config = dict(epochs=1, batch_size=16, lr=1e-3, method="lora", lora_rank=4)
    adapters = []
    for name, global_seed in (("a", 0), ("b", 999)):  # whatever drew from torch's global generator before
        run_dir = tmp_path / name
        shutil.copytree(encoder_run[0], run_dir)
        torch.manual_seed(global_seed)
        finetune_unet(run_dir, encoder_epoch=2, config=config)
        adapters.append(load_file(run_dir / "unet/epoch-0001/adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_training_target_follows_the_base_model_prediction_type():
    from diffusers import DDPMScheduler

    from synthgen.classcond.loop import noise_target

    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([1, 500, 999])
    assert torch.equal(noise_target(DDPMScheduler(), x0, noise, t), noise)  # SD 1.x, SD 2 base
    v = DDPMScheduler(prediction_type="v_prediction")  # SD 2.x 768 px
    alpha = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(noise_target(v, x0, noise, t), alpha * noise - sigma * x0, atol=1e-6)
    assert torch.equal(noise_target(DDPMScheduler(prediction_type="sample"), x0, noise, t), x0)


DDP_RUN = """
import json, sys, torch
torch.set_num_threads(1)
from synthgen.classcond import train_class_encoder
result = train_class_encoder(sys.argv[1], "builtin:tiny-sd", {cifar!r}, split="train", limit=64,
                             config=dict(resolution=32, epochs=1, batch_size=32, lr=1e-2, cpu=True))
# one write per line: two ranks share the pipe, and separate writes of one print may interleave
sys.stdout.write("RESULT " + json.dumps([result.num_processes, result.losses]) + "\\n")
sys.stdout.flush()
"""


@pytest.mark.slow
def test_two_processes_split_the_batch_and_write_one_checkpoint(tmp_path, tiny_pipeline_path):
    """accelerate's multi-process path (on GPUs: several GPUs) with two CPU processes (gloo)."""
    import json

    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_RUN.format(cifar=str(CIFAR))))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line.split("RESULT", 1)[1]) for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2 and results[0] == results[1]  # both ranks report the all-reduced loss
    assert results[0][0] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "encoder").iterdir()) == ["epoch-0001"]
    from synthgen.classcond.checkpoints import read_state

    state = read_state(tmp_path / "run" / "encoder" / "epoch-0001")
    assert state["num_processes"] == 2 and state["global_step"] == 2  # 64 images, global batch 32
