"""Class-conditioned Stable Diffusion: stage-1 training speed and memory with the SD 1.5 architecture.

Stable Diffusion 1.5's UNet (859.5M parameters) and VAE (83.7M) are built from their published
configs (embedded below) with random weights, so nothing is downloaded; speed does not depend on
the weights. Measured, with synthgen's own code paths:

* ``vae_encode`` -- the one-time latent caching of stage 1 (``synthgen.classcond.latents.encode_images``):
  images/s of 128 px images through the SD 1.5 VAE encoder (fp32, as the stage runs it);
* ``stage1`` -- stage-1 training (``synthgen.classcond.loop.run_stage`` with the encoder task of
  ``train_class_encoder``): one epoch of ``--steps`` optimizer steps on cached latents of 128 px
  images, the UNet frozen, the class encoder (10 classes: 38.4M parameters) trained; the time per
  step (median of the steps after the first ``--warmup``), images/s, the checkpoint write, and the
  peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS).

Phase 2 adds ``tuning_trial`` (one Optuna trial: generate N images, train the CAS classifier) to
``MEASUREMENTS`` and the projected whole-pipeline time on one H100 from these figures.

Usage: python benchmarks/bench_classcond.py [--device cpu|cuda] [--batch N] [--steps N]
       [--only stage1,vae_encode] [--mixed-precision auto|no|bf16|fp16] [--output PATH]
CPU default: batch 2, 4 steps (1 warm-up), fp32. CUDA default: batch 64 (the paper's), 12 steps, bf16.
Writes benchmarks/results/classcond-<device>.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synthgen.provenance import environment, write_json  # noqa: E402

# stable-diffusion-v1-5: unet/config.json, vae/config.json, scheduler/scheduler_config.json
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
RESOLUTION = 128  # Lomurno et al.'s training resolution
NUM_CLASSES = 10
CIFAR10_IMAGES, PAPER_EPOCHS = 50_000, 50


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_cuda_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def measure_vae_encode(args, device) -> dict:
    from diffusers import AutoencoderKL

    from synthgen.classcond.latents import encode_images

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE).requires_grad_(False).eval()
    images = torch.randint(0, 256, (args.encode_images, 3, 32, 32), dtype=torch.uint8)  # CIFAR-sized, resized to 128
    encode_images(vae, images[: args.encode_batch], RESOLUTION, args.encode_batch, device)  # warm-up
    sync(device)
    start = time.perf_counter()
    moments = encode_images(vae, images, RESOLUTION, args.encode_batch, device)
    sync(device)
    seconds = time.perf_counter() - start
    assert moments.shape == (args.encode_images, 8, RESOLUTION // 8, RESOLUTION // 8)
    return {
        "vae_parameters": count(vae),
        "images": args.encode_images,
        "batch": args.encode_batch,
        "seconds": seconds,
        "images_per_s": args.encode_images / seconds,
        "projected_cifar10_train_s": CIFAR10_IMAGES / (args.encode_images / seconds),
    }


def measure_stage1(args, device) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from synthgen.classcond.checkpoints import load_module_weights
    from synthgen.classcond.config import EncoderStageConfig
    from synthgen.classcond.latents import LatentSet
    from synthgen.classcond.loop import DenoisingTask, run_stage
    from synthgen.classcond.train_encoder import initial_encoder

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    config = EncoderStageConfig(
        batch_size=args.batch, epochs=1, resolution=RESOLUTION, mixed_precision=args.mixed_precision,
        cpu=device.type == "cpu",
    )
    encoder = initial_encoder(unet, NUM_CLASSES, config)
    n = args.batch * args.steps
    side = RESOLUTION // 8
    latents = LatentSet(torch.randn(n, 8, side, side), torch.arange(n) % NUM_CLASSES, 0.18215)
    task = DenoisingTask(
        name="encoder",
        trainable=encoder,
        unet=unet,
        condition=lambda model, labels: model(F.one_hot(labels, NUM_CLASSES).float()),
        save_weights=lambda model, folder: model.save_pretrained(folder, safe_serialization=True),
        load_weights=load_module_weights,
        settings={"stage": "encoder", "config": config.resume_key()},
    )
    stamps: list[float] = []
    infos: list = []

    def on_step_end(epoch, step, loss):
        sync(device)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_stage(task, config, latents, noise_scheduler, Path(tmp) / "encoder", on_step_end=on_step_end,
                           on_epoch_end=lambda info: infos.append(info))
        total = time.perf_counter() - start
        checkpoint_bytes = sum(p.stat().st_size for p in result.checkpoints[1].iterdir())
    steps = [b - a for a, b in zip(stamps, stamps[1:])][max(0, args.warmup - 1):]
    step_s = statistics.median(steps)
    epoch = infos[0]
    return {
        "unet_parameters": count(unet),
        "encoder_parameters": count(encoder),
        "batch": args.batch,
        "steps": args.steps,
        "timed_steps": len(steps),
        "mixed_precision": result.mixed_precision,
        "step_s_median": step_s,
        "step_s_all": steps,
        "images_per_s": args.batch / step_s,
        "loss": epoch.loss,
        "epoch_s": epoch.seconds,
        "checkpoint_write_s": total - epoch.seconds,
        "checkpoint_mib": checkpoint_bytes / 2**20,
        "projected_paper_stage1_s": PAPER_EPOCHS * CIFAR10_IMAGES / (args.batch / step_s),
        **peak_memory_gib(device),
    }


# name -> function(args, device) -> dict; phase 2 adds "tuning_trial" (one Optuna trial's wall time).
MEASUREMENTS = {"vae_encode": measure_vae_encode, "stage1": measure_stage1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="stage-1 batch (default: 2 on CPU, 64 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: 4 on CPU, 12 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--encode-images", type=int, default=None, help="images through the VAE (default 16 CPU, 1024 CUDA)")
    parser.add_argument("--encode-batch", type=int, default=None, help="VAE batch (default 8 CPU, 128 CUDA)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated: " + ", ".join(MEASUREMENTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    defaults = dict(batch=64 if cuda else 2, steps=12 if cuda else 4, warmup=3 if cuda else 1,
                    encode_images=1024 if cuda else 16, encode_batch=128 if cuda else 8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    results = {}
    for name in [n for n in args.only.split(",") if n]:
        if name not in MEASUREMENTS:
            sys.exit(f"unknown measurement {name!r}; choose from {', '.join(MEASUREMENTS)}")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        results[name] = MEASUREMENTS[name](args, device)
        print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in results[name].items() if k != "step_s_all"), flush=True)

    env = environment(device)
    print()
    print(f"device: {env['device_name']} ({args.device}), torch threads {env['torch_threads']}")
    if "vae_encode" in results:
        r = results["vae_encode"]
        print(f"| VAE encode 128 px (latent caching) | batch {r['batch']} | {r['images_per_s']:.2f} images/s |")
    if "stage1" in results:
        r = results["stage1"]
        mem = r.get("peak_cuda_allocated_gib", r.get("peak_rss_gib"))
        print(f"| stage 1 step, SD 1.5 UNet frozen, 128 px | batch {r['batch']}, {r['mixed_precision']} | "
              f"{r['step_s_median']:.3f} s/step, {r['images_per_s']:.2f} images/s, peak {mem:.1f} GiB |")
    out = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"classcond-{args.device}.json"
    write_json(out, {"benchmark": "bench_classcond", "settings": vars(args), "environment": env, "results": results})
    print(f"wrote {out}")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
