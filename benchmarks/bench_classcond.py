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

* ``flops`` -- FLOPs of one image through each network at the paper's sizes (``torch.utils.flop_counter``,
  batch 1): the SD 1.5 UNet at 128 px (16x16 latents, 100 class tokens), the VAE encoder and decoder
  at 128 px, the CAS classifier (``resnet20_w64``) at 32 px;
* ``tuning_trial`` -- one real Optuna trial (TPE sampler, Hyperband pruner, the pruning callback)
  as stages 2 and 4 run it (``synthgen.classcond.trials``): ``--trial-images`` label-balanced images
  of the class-conditioned pipeline through the engine's generator (DDIM, ``--trial-steps`` steps,
  guidance 2: two UNet passes per step), stored at 32 px, then the CAS classifier of the tuning
  protocol trained on them for ``--trial-epochs`` epochs, validated every epoch on ``--trial-val``
  images. The validation images are random pixels (timing does not depend on content; no dataset
  is needed on the GPU machine). Reported: the trial's wall time, seconds per image and per
  image-step of generation, per UNet call, per classifier epoch.

From the FLOP counts, :func:`project_h100` projects the whole four-stage pipeline at the paper's
settings on one H100 (bf16): network FLOPs at an assumed fraction of ~790 TFLOP/s (measured CPU
rates do not transfer to a GPU), the CAS classifier's time per image-epoch from the H100 runs
measured for issue 3 (85-161 s for a full CAS run on 50,000 images). Every assumption is in the
JSON next to the figures.

Usage: python benchmarks/bench_classcond.py [--device cpu|cuda] [--batch N] [--steps N]
       [--only flops,vae_encode,stage1,tuning_trial] [--mixed-precision auto|no|bf16|fp16]
       [--trial-images N] [--trial-steps N] [--trial-epochs N] [--trial-val N] [--output PATH]
CPU default: batch 2, 4 steps (1 warm-up), fp32; trial of 4 images, 5 steps, 2 epochs, 200 val.
CUDA default: batch 64 (the paper's), 12 steps, bf16; trial of 1024 images, 25 steps, 10 epochs,
10,000 val (the protocol's real held-out size). Writes benchmarks/results/classcond-<device>.json.
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

from synthgen.generate.sd15 import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG  # noqa: E402
from synthgen.provenance import environment, write_json  # noqa: E402

RESOLUTION = 128  # Lomurno et al.'s training resolution
NUM_CLASSES = 10
CIFAR10_IMAGES, PAPER_EPOCHS = 50_000, 50
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


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
    vae = AutoencoderKL(**VAE_CONFIG).requires_grad_(False).eval()
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
    unet = UNet2DConditionModel(**UNET_CONFIG).requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
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


def measure_flops(args, device) -> dict:
    """FLOPs (multiply-adds count 2) of one image through each network, on the CPU in float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from synthgen.train.models import create_model

    def flops(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    side = RESOLUTION // 8
    classifier = create_model("resnet20_w64", NUM_CLASSES, image_size=32).eval()
    return {
        "unet_forward_128px": flops(lambda: unet(torch.randn(1, 4, side, side), 10, encoder_hidden_states=torch.randn(1, 100, 768))),
        "vae_encode_128px": flops(lambda: vae.encode(torch.randn(1, 3, RESOLUTION, RESOLUTION))),
        "vae_decode_128px": flops(lambda: vae.decode(torch.randn(1, 4, side, side))),
        "classifier_forward_32px": flops(lambda: classifier(torch.randn(1, 3, 32, 32))),
        "note": "per image, batch 1; the UNet with 100 class tokens of width 768",
    }


def measure_tuning_trial(args, device) -> dict:
    """One Optuna trial of stage 2 with SD 1.5's architecture (random weights) at 128 px."""
    import optuna
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from synthgen.classcond import ClassConditionedPipeline, ClassEncoder
    from synthgen.classcond.trials import generate_class_images, score_images
    from synthgen.generate.decode import LatentDecoder
    from synthgen.generate.pipeline import prepare_pipeline
    from synthgen.recipe import GeneratorConfig, OutputConfig
    from synthgen.train.cas import load_cas_protocol
    from synthgen.train.data import ImageTensorDataset
    from synthgen.train.runtime import Runtime

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    pipe = ClassConditionedPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), unet=unet, scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        class_encoder=ClassEncoder.for_unet(unet, NUM_CLASSES), class_names=CIFAR10_NAMES, resolution=RESOLUTION,
    )
    cfg = GeneratorConfig(model="sd15-architecture-random-weights", scheduler="ddim", steps=args.trial_steps,
                          guidance_scale=2.0, height=RESOLUTION, width=RESOLUTION, batch_size=args.trial_batch,
                          device=device.type, dtype="auto", compile=args.compile, fuse_qkv=False)
    loaded = prepare_pipeline(pipe, cfg, revision="random")
    if device.type == "cuda":
        # vae_decode_chunk auto measures one decode once per model and size, resetting the peak
        # counter: do it before this trial's peak is measured, not inside its first batch
        latent = (loaded.pipe.vae.config.latent_channels, RESOLUTION // 8, RESOLUTION // 8)
        LatentDecoder(loaded.pipe, loaded.device, cfg.vae_decode_chunk).chunk_size(
            torch.zeros(2, *latent, dtype=loaded.dtype, device=loaded.device))
        torch.cuda.reset_peak_memory_stats(device)
    calls: list[float] = []
    started: list[float] = []

    def before(module, inputs):
        sync(device)
        started.append(time.perf_counter())

    def after(module, inputs, output):
        sync(device)
        calls.append(time.perf_counter() - started.pop())

    hooks = [loaded.pipe.unet.register_forward_pre_hook(before), loaded.pipe.unet.register_forward_hook(after)]
    # the tuning protocol (their hyp_opt.py callbacks), epochs reduced
    protocol, _ = load_cas_protocol("cas-lomurno", ["plateau.patience=25", "early_stopping.patience=50",
                                                    f"epochs={args.trial_epochs}"])
    g = torch.Generator().manual_seed(0)
    val = ImageTensorDataset(images=torch.randint(0, 256, (args.trial_val, 3, 32, 32), dtype=torch.uint8, generator=g),
                             labels=torch.arange(args.trial_val) % NUM_CLASSES, class_names=CIFAR10_NAMES,
                             source={"id": "random-pixels", "split": "val"})
    runtime = Runtime.create(device.type, amp=protocol.amp, compile=protocol.compile)
    timing: dict = {}

    def objective(trial):
        steps = trial.suggest_int("steps", 5, 50)
        trial.suggest_float("guidance", 0.0, 7.5)
        t0 = time.perf_counter()
        syn = generate_class_images(loaded, cfg.model_copy(update={"steps": steps}), OutputConfig(image_size=32),
                                    CIFAR10_NAMES, args.trial_images, seed=0)
        sync(device)
        timing["generation_s"] = time.perf_counter() - t0
        score = score_images(syn, val, protocol, seed=0, runtime=runtime, trial=trial)
        timing["classifier_s"] = score.train_s
        timing["epochs"] = len(score.history)
        timing["epoch_s"] = [round(row["epoch_s"], 3) for row in score.history]
        if score.pruned_at is not None:
            raise optuna.TrialPruned()
        return score.value

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.HyperbandPruner(max_resource=args.trial_epochs))
    study.enqueue_trial({"steps": args.trial_steps, "guidance": 2.0})
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=1)
    wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    n, steps = args.trial_images, args.trial_steps
    unet_s = sum(calls)
    return {
        "images": n,
        "steps": steps,
        "guidance": 2.0,
        "generation_batch": args.trial_batch,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "compiled": loaded.compiled_modules,
        "unet_calls": len(calls),
        "unet_call_s_median": statistics.median(calls),
        "unet_s_per_image_step": unet_s / (n * steps),
        "generation_s": timing["generation_s"],
        "generation_s_per_image": timing["generation_s"] / n,
        "generation_s_per_image_step": timing["generation_s"] / (n * steps),
        "decode_and_rest_s": timing["generation_s"] - unet_s,
        "classifier": protocol.model,
        "classifier_val_images": args.trial_val,
        "classifier_epochs": timing["epochs"],
        "classifier_s": timing["classifier_s"],
        "classifier_epoch_s": timing["epoch_s"],
        "trial_wall_s": wall,
        "trial_state": study.trials[0].state.name,
        "projected_paper_trial_generation_s": timing["generation_s"] / n * 4000,
        **peak_memory_gib(device),
    }


# --------------------------------------------------------------------------------------------------
# the projection of the whole pipeline onto one H100
H100_BF16_FLOPS = 790e12  # dense bf16 matmul rate reached on an H100 (benchmarks/device/NOTES.md)
ASSUMED_UTILISATION = {"low": 0.2, "mid": 0.3, "high": 0.4}  # of that rate, for SD 1.5 at 128 px (16x16 latents)
# The CAS classifier on the H100 (issue 3, benchmarks/device/NOTES.md): a full CAS run on 50,000 images
# per epoch took 161 s eager (65 epochs) and 85 s with CUDA graphs (58 epochs, ~25 s of it compiling).
CAS_S_PER_IMAGE_EPOCH = {"graphs": (85.0 - 25.0) / (58 * 50_000), "eager": 161.0 / (65 * 50_000)}
CAS_COMPILE_S = 25.0
PAPER = {
    "real_images": 50_000, "encoder_epochs": 50, "unet_epochs": 10, "trial_images": 4000, "val_images": 10_000,
    "encoder_trials": 50, "unet_trials": 40, "classifier_epochs_max": 100, "scales": 10, "scale_unit": 40_000,
    # steps a trial runs: TPE draws from [5, 50] (mean 27.5) in stage 2, from [5, best] in stage 4
    "stage2_mean_steps": 27.5, "assumed_best_steps": 25, "stage4_mean_steps": 15.0,
}


def project_h100(flops: dict, utilisation: float, cas_key: str) -> dict:
    """Seconds per stage at the paper's settings; every trial runs all its classifier epochs (no
    pruning, no early stop: an upper bound) and guidance needs two UNet passes per step."""
    p, rate = PAPER, H100_BF16_FLOPS * utilisation
    f_unet, f_dec, f_enc = flops["unet_forward_128px"], flops["vae_decode_128px"], flops["vae_encode_128px"]
    cas = CAS_S_PER_IMAGE_EPOCH[cas_key]
    compile_s = CAS_COMPILE_S if cas_key == "graphs" else 0.0

    def generation(images: float, steps: float) -> float:
        return images * (2 * steps * f_unet + f_dec) / rate

    def classifier(fit_images: float) -> float:
        return p["classifier_epochs_max"] * (fit_images + p["val_images"]) * cas + compile_s

    trial2 = generation(p["trial_images"], p["stage2_mean_steps"]) + classifier(p["trial_images"])
    trial4 = generation(p["trial_images"], p["stage4_mean_steps"]) + classifier(p["trial_images"])
    unit = p["scale_unit"]
    stages = {
        "latents (VAE encode once)": p["real_images"] * f_enc / rate,
        # the UNet is frozen: its backward computes input gradients only, about one more forward
        "1 class encoder": p["encoder_epochs"] * p["real_images"] * 2 * f_unet / rate,
        "2 tuning (encoder)": p["encoder_trials"] * trial2,
        # full fine-tuning: forward, and a backward with weight gradients (about two forwards)
        "3 UNet fine-tuning": p["unet_epochs"] * p["real_images"] * 3 * f_unet / rate,
        "4 tuning (UNet)": p["unet_trials"] * trial4,
        "final: generate x1..x10": generation(p["scales"] * unit, p["assumed_best_steps"]),
        "final: CAS x1..x10 + real baseline": sum(classifier(k * unit) for k in range(1, p["scales"] + 1)) + classifier(unit),
    }
    return {"stages_s": stages, "total_s": sum(stages.values()), "trial_s": {"stage2": trial2, "stage4": trial4}}


def projection(flops: dict, measured_utilisation: float | None = None) -> dict:
    """The projection for each assumed utilisation (and, from a GPU run, the UNet's measured one)."""
    cases = {}
    utilisations = dict(ASSUMED_UTILISATION)
    if measured_utilisation is not None:
        utilisations["measured"] = measured_utilisation
    for name, u in utilisations.items():
        for key in CAS_S_PER_IMAGE_EPOCH:
            label = f"utilisation {u:.0%}{' (measured UNet rate)' if name == 'measured' else ''}, classifier {key}"
            cases[label] = project_h100(flops, u, key)
    return {
        "assumptions": {
            "h100_bf16_flops": H100_BF16_FLOPS,
            "utilisation_of_that": ASSUMED_UTILISATION,
            "cas_s_per_image_epoch": CAS_S_PER_IMAGE_EPOCH,
            "cas_compile_s": CAS_COMPILE_S,
            "paper_settings": PAPER,
            "upper_bound": "no trial pruned, every classifier runs all 100 epochs (early stopping and Hyperband cut this)",
            "two_unet_passes_per_step": True,
        },
        "cases": cases,
    }


# name -> function(args, device) -> dict
MEASUREMENTS = {"flops": measure_flops, "vae_encode": measure_vae_encode, "stage1": measure_stage1,
                "tuning_trial": measure_tuning_trial}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="stage-1 batch (default: 2 on CPU, 64 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: 4 on CPU, 12 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--encode-images", type=int, default=None, help="images through the VAE (default 16 CPU, 1024 CUDA)")
    parser.add_argument("--encode-batch", type=int, default=None, help="VAE batch (default 8 CPU, 128 CUDA)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--trial-images", type=int, default=None, help="images one trial generates (default 4 CPU, 1024 CUDA)")
    parser.add_argument("--trial-steps", type=int, default=None, help="inference steps (default 5 CPU, 25 CUDA)")
    parser.add_argument("--trial-batch", type=int, default=None, help="generation batch (default 2 CPU, 64 CUDA)")
    parser.add_argument("--trial-epochs", type=int, default=None, help="classifier epochs (default 2 CPU, 10 CUDA)")
    parser.add_argument("--trial-val", type=int, default=None, help="validation images (default 200 CPU, 10000 CUDA)")
    parser.add_argument("--compile", default="false", choices=["auto", "true", "false"],
                        help="torch.compile the UNet and VAE decoder for the trial (default false: minutes of compiling)")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated: " + ", ".join(MEASUREMENTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    defaults = dict(batch=64 if cuda else 2, steps=12 if cuda else 4, warmup=3 if cuda else 1,
                    encode_images=1024 if cuda else 16, encode_batch=128 if cuda else 8,
                    trial_images=1024 if cuda else 4, trial_steps=25 if cuda else 5, trial_batch=64 if cuda else 2,
                    trial_epochs=10 if cuda else 2, trial_val=10_000 if cuda else 200)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.compile = {"true": True, "false": False}.get(args.compile, args.compile)
    device = torch.device(args.device)

    results = {}
    for name in [n for n in args.only.split(",") if n]:
        if name not in MEASUREMENTS:
            sys.exit(f"unknown measurement {name!r}; choose from {', '.join(MEASUREMENTS)}")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        results[name] = MEASUREMENTS[name](args, device)
        print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in results[name].items()
                                      if k not in ("step_s_all", "classifier_epoch_s")), flush=True)

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
    if "tuning_trial" in results:
        r = results["tuning_trial"]
        print(f"| one tuning trial, {r['images']} images x {r['steps']} steps at 128 px + {r['classifier']} "
              f"{r['classifier_epochs']} epochs on {r['classifier_val_images']} val | {r['dtype']} | {r['trial_wall_s']:.1f} s: "
              f"generation {r['generation_s']:.1f} s ({r['generation_s_per_image_step']:.3f} s per image-step, UNet "
              f"{r['unet_s_per_image_step']:.3f}), classifier {r['classifier_s']:.1f} s |")
    payload = {"benchmark": "bench_classcond", "settings": vars(args), "environment": env, "results": results}
    measured = None
    if "flops" in results and "tuning_trial" in results:
        r = results["tuning_trial"]
        rate = 2 * r["images"] * r["steps"] * results["flops"]["unet_forward_128px"] / (r["unet_s_per_image_step"] * r["images"] * r["steps"])
        r["achieved_unet_flops_per_s"] = rate
        print(f"UNet at 128 px reached {rate / 1e12:.3f} TFLOP/s here")
        if cuda:
            measured = rate / H100_BF16_FLOPS
    if "flops" in results:
        payload["h100_projection"] = proj = projection(results["flops"], measured)
        print("\nprojected whole pipeline on one H100 at the paper's settings (upper bound, see assumptions):")
        for case, value in proj["cases"].items():
            print(f"  {case}: {value['total_s'] / 3600:.1f} h (trial {value['trial_s']['stage2']:.0f} s)")
        mid = proj["cases"]["utilisation 30%, classifier graphs"]
        for stage, seconds in mid["stages_s"].items():
            print(f"    {stage}: {seconds / 60:.1f} min")
    out = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"classcond-{args.device}.json"
    write_json(out, payload)
    print(f"wrote {out}")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
