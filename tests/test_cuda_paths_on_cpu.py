"""Code paths that only a GPU takes by default, forced on the CPU so that a GPU session does not find
their faults: fp16 autocast with its gradient scaler, the compiled training forward (CUDA graphs
on a GPU) and its batch shapes, the per-batch host-to-device traffic of the training loop, and
``torchvision.io.decode_jpeg`` as the streamed loader's device decoder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

CIFAR = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"CIFAR-10 parquet folder not found at {CIFAR}")


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _images(n: int, seed: int = 0):
    from synthgen.train.data import ImageTensorDataset

    g = torch.Generator().manual_seed(seed)
    return ImageTensorDataset(images=torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                              labels=torch.arange(n) % 10, class_names=[str(i) for i in range(10)], source={"id": "random"})


class _TensorsFromPythonData(TorchDispatchMode):
    """Counts tensors built from Python numbers (``torch.tensor`` / ``as_tensor``: ``aten.lift_fresh``).
    On a GPU each such build is a blocking host-to-device copy: the CPU waits for the GPU to drain."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_training_batches_build_no_tensors_from_python_numbers_after_the_first():
    """to_float (every training and scoring batch), the CIFAR crop+flip and the contrastive views
    build their constants once; the CPU gets the same numbers as before (bit-identical)."""
    from synthgen.train.augment import ContrastiveAugment, random_crop_flip
    from synthgen.train.data import to_float

    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = ContrastiveAugment(size=12, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), blur_p=0.5)

    def one_batch(seed: int):
        f = to_float(x, (0.1, 0.2, 0.3), (0.5, 0.4, 0.3))
        return f, random_crop_flip(f, generator=torch.Generator().manual_seed(seed)), aug(x, torch.Generator().manual_seed(seed))

    one_batch(0)  # the first batch may build them
    with _TensorsFromPythonData() as built:
        outs = [one_batch(s) for s in (1, 2, 3)]
    assert built.count == 0
    f = outs[0][0]
    expected = (x.float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    assert torch.equal(f, expected)
    with torch.inference_mode():  # built first inside inference mode, the constants still serve training
        to_float(x, (0.7, 0.7, 0.7), (0.5, 0.5, 0.5))
    w = torch.ones(1, 3, 1, 1, requires_grad=True)
    (to_float(x, (0.7, 0.7, 0.7), (0.5, 0.5, 0.5)) * w).sum().backward()
    assert w.grad is not None


def test_fp16_scaler_unscales_before_clipping_and_starts_fresh_each_run():
    """amp fp16 (what a GPU without bf16 gets): the clip applies to the unscaled gradients, and each
    training run starts at the initial loss scale, so a run's result does not depend on the run
    before it in the same process (the CAS baseline before the scales, a tuning trial before the next)."""
    from synthgen.train.classify import TrainConfig, train_classifier
    from synthgen.train.runtime import Runtime

    rt = Runtime.create("cpu", amp="fp16")
    assert rt.amp_dtype == torch.float16 and rt.scaler.is_enabled()
    layer = nn.Linear(4, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    with rt.autocast():
        loss = layer(torch.ones(8, 4)).float().sum() * 0.01  # unscaled gradient norm 0.25, scaled 65536x
    rt.step(loss, opt, grad_clip=0.1)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in layer.parameters()]))
    assert abs(float(norm) - 0.1) < 1e-4  # clipped after unscaling (else 0.1 / 65536)

    cfg = TrainConfig(epochs=1, batch_size=16, grad_clip=1.0)
    torch.manual_seed(0)
    # pixels scaled by 1/0.001: fp16 gradients overflow, so the scale drops during this run
    train_classifier(_tiny_net(), _images(64), None, cfg, runtime=rt, mean=(0.5,) * 3, std=(0.001,) * 3, quiet=True)
    assert rt.scaler.get_scale() < 65536.0

    def second_run(runtime):
        torch.manual_seed(1)
        r = train_classifier(_tiny_net(), _images(64, 1), _images(32, 2), cfg, runtime=runtime, quiet=True)
        return [(h["train_loss"], h["val_loss"]) for h in r.history], runtime.scaler.get_scale()

    assert second_run(rt) == second_run(Runtime.create("cpu", amp="fp16"))


class _CountingCompile:
    """Stands in for ``torch.compile``: the "compiled" module runs eagerly and counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, module, mode=None, **kwargs):
        calls = self.calls

        def compiled(x):
            calls.append(x.shape[0])
            return module(x)

        return compiled


def test_compiled_classifier_forward_takes_full_batches_and_eager_the_short_last_one(monkeypatch):
    """A compiled graph (CUDA graphs under compile: auto on a GPU) exists per shape: full training
    batches run it, the odd-sized last batch of an epoch and scoring run the plain module."""
    from synthgen.train.classify import TrainConfig, train_classifier
    from synthgen.train.runtime import Runtime

    counting = _CountingCompile()
    monkeypatch.setattr(torch, "compile", counting)
    torch.manual_seed(0)
    r = train_classifier(_tiny_net(), _images(70), _images(40, 1), TrainConfig(epochs=2, batch_size=32),
                         runtime=Runtime.create("cpu", compile="reduce-overhead"), quiet=True)
    assert r.steps == 6 and counting.calls == [32, 32, 32, 32]  # 2 x (32 + 32 compiled + 6 eager)


@needs_cifar
@pytest.mark.parametrize("recipe,rows", [("simclr-demo", 2 * 16), ("rotation-vit-demo", 4 * 16), ("stablerep-vit-demo", None)])
def test_compiled_pretraining_forward_serves_every_step(recipe, rows, monkeypatch, tmp_path, one_torch_thread):
    """Each objective's training forward has its own batch: SimCLR two views of each image, rotation
    four rotations. The compiled module must be the one that runs it (a SimCLR forward was sent to
    the eager module every step: compile did nothing)."""
    from synthgen.train.config import load_pretrain_config
    from synthgen.train.pretrain import pretrain
    from synthgen.train.runtime import Runtime

    counting = _CountingCompile()
    monkeypatch.setattr(torch, "compile", counting)
    sets = [f"dataset.source={CIFAR}", "schedule.max_steps=2", "dataset.limit=64", "device=cpu"]
    if rows is not None:
        sets.append("objective.batch_size=16")
    cfg = load_pretrain_config(recipe, sets)
    pretrain(cfg, tmp_path, progress=False, runtime=Runtime.create("cpu", compile="default"))
    assert len(counting.calls) == 2 and (rows is None or counting.calls == [rows, rows])


def _jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@needs_cifar
def test_device_jpeg_decode_resizes_and_crops_like_the_workers(tmp_path, one_torch_thread):
    """decode: device (auto on a GPU with JPEG shards: nvJPEG there, torchvision's CPU decoder here)
    must cut non-square images as the workers' PIL path does: shorter side to image_size, centre
    square. It squashed the whole image into the square instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthgen.train.runtime import Runtime
    from synthgen.train.stream import StreamBatches

    table = pq.read_table(CIFAR / "data/train-00000-of-00002.parquet").slice(0, 4)
    bands = np.zeros((48, 144, 3), dtype=np.uint8)  # wide: red | green | blue thirds
    bands[:, :48, 0] = bands[:, 48:96, 1] = bands[:, 96:, 2] = 255
    cells = [{"bytes": _jpeg(a), "path": None} for a in (bands, bands.transpose(1, 0, 2).copy(), bands, bands[:, 24:120].copy())]
    table = table.set_column(0, table.schema.field(0), pa.array(cells, type=table.schema.field(0).type))
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data/train-00000-of-00001.parquet")

    rt = Runtime.create("cpu")
    got = {how: torch.cat([x for x, _ in StreamBatches(str(tmp_path), "train", rt, image_size=32, num_workers=0, decode=how)
                           .epoch(4, None, min_batch=1)]) for how in ("workers", "device")}
    assert got["device"].shape == got["workers"].shape == (4, 3, 32, 32)
    # the centre square of the wide image is green; of the tall one, the middle band
    assert got["workers"][0, 1].float().mean() > 240 and got["workers"][0, 0].float().mean() < 15
    diff = (got["device"].float() - got["workers"].float()).abs()
    assert diff.mean() < 4 and diff.amax(dim=(1, 2, 3)).max() < 140  # bilinear vs bicubic at the band edges


@needs_cifar
def test_fp16_pretraining_checkpoints_its_loss_scale_and_resumes_exactly(tmp_path, one_torch_thread):
    """Pre-training under fp16 autocast keeps the loss scale in the checkpoint's JSON (nothing
    pickled) and a resumed run restores it: the same losses as a run never interrupted."""
    import json

    from synthgen.train.config import load_pretrain_config
    from synthgen.train.pretrain import pretrain
    from synthgen.train.runtime import Runtime

    sets = [f"dataset.source={CIFAR}", "dataset.limit=48", "objective.batch_size=16", "schedule.epochs=2",
            "schedule.max_steps=null", "log_every=1", "device=cpu"]

    def run(folder, *extra):
        return pretrain(load_pretrain_config("simclr-demo", sets + list(extra)), folder, progress=False,
                        runtime=Runtime.create("cpu", amp="fp16"))

    full = run(tmp_path / "full")
    run(tmp_path / "cut", "schedule.max_steps=3")
    saved = json.loads((tmp_path / "cut/checkpoint.json").read_text())["scaler"]
    assert set(saved) >= {"scale", "_growth_tracker"} and saved["_growth_tracker"] >= 1
    resumed = run(tmp_path / "cut")
    assert full.metrics["runtime"]["amp"] == "float16" and resumed.metrics["runtime"]["amp"] == "float16"
    assert [h["loss"] for h in resumed.metrics["history"]] == [h["loss"] for h in full.metrics["history"]]
    final = [json.loads((tmp_path / f"{run}/checkpoint.json").read_text())["scaler"] for run in ("full", "cut")]
    assert final[0] == final[1]  # the scale and its growth count went on from where the cut run left them


def test_auto_decode_chunk_measures_once_per_model_and_image_size(monkeypatch):
    """``vae_decode_chunk: auto`` on CUDA measures one image's decode with the device's peak-memory
    counter, which it must reset: once per VAE, latent dtype and size, not once per generator (a
    tuning study makes a generator per trial; each reset would hide a benchmark's peak). The CUDA
    memory functions are the hardware edge here: faked with a counter that the eager decode moves."""
    from diffusers import AutoencoderKL

    from synthgen.generate.decode import DECODE_MEMORY_SHARE, LatentDecoder

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = type("Pipe", (), {"vae": vae})()
    memory = {"allocated": 1_000, "peak": 50_000, "resets": 0}
    forward = type(vae.decoder).forward

    def decoding(self, z, *args, **kwargs):  # one image's decode holds 300 bytes at its peak
        memory["peak"] = max(memory["peak"], memory["allocated"] + 300 * len(z))
        return forward(self, z, *args, **kwargs)

    def reset(device=None):
        memory["resets"] += 1
        memory["peak"] = memory["allocated"]

    monkeypatch.setattr(type(vae.decoder), "forward", decoding)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: memory["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: memory["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3_000, 10_000))

    latents = torch.zeros(40, 4, 4, 4)
    first = LatentDecoder(pipe, "cuda", "auto")
    assert first.chunk_size(latents) == int(DECODE_MEMORY_SHARE * 3_000 // 300) == 5
    assert LatentDecoder(pipe, "cuda", "auto").chunk_size(latents) == 5  # a second generator: no new measurement
    assert memory["resets"] == 1
    LatentDecoder(pipe, "cuda", "auto").chunk_size(torch.zeros(40, 4, 8, 8))  # another size is measured
    assert memory["resets"] == 2
    assert LatentDecoder(pipe, "cuda", 3).chunk_size(latents) == 3 and memory["resets"] == 2
