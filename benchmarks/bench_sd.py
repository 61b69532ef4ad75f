"""Stable Diffusion 1.5 generation speed: the plain diffusers pipeline vs synthgen's engine.

Builds SD 1.5's UNet, VAE and CLIP text encoder from their published configs with random weights
(``synthgen/generate/sd15.py``: nothing is downloaded, so the numbers are speed, never quality) and
measures, for each batch size and step count, with classifier-free guidance on (scale 7.5, DDIM):

* **plain**: ``StableDiffusionPipeline`` in float16 (float32 on a CPU) with diffusers' default
  attention processor, no compile, PIL output -- what a user would write;
* **engine**: ``prepare_pipeline`` + ``ImageGenerator.generate`` with the recipe defaults
  (``dtype/compile/channels_last/fuse_qkv: auto``, prompt-embedding cache, chunked VAE decode,
  uint8 on the device, the black/non-finite check; the same PIL images at the end).

Columns: images/s (median of ``--repeats`` calls after two warm-up calls of 2 steps), the compile
cost (first warm-up minus second), peak device memory (with what was held before the calls: every
model this process keeps), and the share of the card's limit. The limit
is FLOPs-bound: FLOPs per image are counted with ``torch.utils.flop_counter`` on the model
(SD 1.5 at 512 px: UNet 0.80 TFLOP per forward, twice per step with guidance; VAE decode 2.51;
text encoder 0.013 -- ~83 TFLOP per image at 50 steps, ~43 at 25) and divided into the card's
practical dense bf16 rate: ``PRACTICAL_SHARE`` of the vendor's spec (``PEAK_BF16_TFLOPS``; issue 10
takes ~790 TFLOP/s for an H100 SXM, 80% of its 989), or, for a card not in the table, the rate of
a large bf16 matmul measured here (recorded for every card).

Then one engine call at the largest batch split by phase (text encoder, UNet loop, VAE decode,
host); the end-to-end ``synthgen.dataset.build_dataset`` rate (4 shards of the largest batch written,
JPEG at half size by default, with the pipelined writer and then the serial one) next to the bare
engine rate for the same images, and their ratio (issue 10's goal: the pipelined build within 5%); and, for the same prompts and seeds, the pixel
effect of each optimisation (max and mean absolute difference in uint8 levels) against the plain
pipeline, against float32 and against the row before. Every stage checks the time left
(``--budget-s``), a failing measurement is recorded as a one-line error, and the JSON is rewritten
after each step, so a run cut short keeps what it measured.

The ``attention`` stage (not in the default ``--stages``) records every SDPA call of one eager UNet
forward and times those calls under each fused backend (flash, memory-efficient, cuDNN): attention's
share of the UNet's time, and whether a backend other than SDPA's own choice is faster. The
``variants`` stage (not in the default ``--stages``; it runs last) measures candidate speed-ups
that are not engine settings yet (``VARIANTS``: cuDNN autotuning, CUDA graphs, diffusers' inductor
tuning, cuDNN attention first), each alone against the engine as it is at one batch, with its
images/s, speed-up and pixel difference, so that a GPU session can choose which to make a setting.

    python benchmarks/bench_sd.py --device cuda                 # 512 px, steps 25,50, batch 32,16,8,1
    python benchmarks/bench_sd.py --device cpu --size 64 --steps 2 --batches 2,1 --pixel-batch 2
    python benchmarks/bench_sd.py --device cuda --stages table,variants --batches 8,1 --variant-batch 16
    python benchmarks/bench_sd.py --device cuda --stages attention,variants --batches 16 --variants cudnn-attention
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from synthgen.generate.generator import ImageGenerator  # noqa: E402
from synthgen.generate.pipeline import prepare_pipeline, resolve_dtype  # noqa: E402
from synthgen.generate.seeds import image_seed  # noqa: E402
from synthgen.prompts.base import PromptRecord  # noqa: E402
from synthgen.provenance import environment, write_json  # noqa: E402
from synthgen.recipe import GeneratorConfig, OutputConfig  # noqa: E402

#: dense (no sparsity) bf16 tensor-core TFLOP/s from the vendor's spec sheets, by device-name part;
#: the more specific names first
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756,
    "H100 NVL": 835,
    "H200 NVL": 835,
    "H100": 989,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989,
    "A100": 312,
}
#: what large bf16 matmuls reach of the spec in practice (issue 10: ~790 of an H100's 989)
PRACTICAL_SHARE = 0.8
GUIDANCE = 7.5
RECIPE_SEED = 0


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def master_components(arch: str, device: str) -> dict:
    """float32 components on ``device``: SD 1.5 (random weights) or synthgen's tiny pipeline."""
    if arch == "sd15":
        from synthgen.generate.sd15 import sd15_components

        return sd15_components(device, seed=0)
    from diffusers import StableDiffusionPipeline

    from synthgen.generate.tiny import builtin_model_path

    from synthgen.generate.pipeline import quiet_loading

    with quiet_loading():
        pipe = StableDiffusionPipeline.from_pretrained(builtin_model_path("tiny-sd"))
    parts = {k: v for k, v in pipe.components.items() if k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    for name in ("unet", "vae", "text_encoder"):
        parts[name].to(device)
    return parts


def count_flops(arch: str, master: dict, size: int) -> dict:
    from synthgen.generate.sd15 import model_flops, sd15_components

    return model_flops(sd15_components("meta") if arch == "sd15" else master, size, size)


def pipeline_of(master: dict, dtype, *, copy_models: bool = True):
    """A StableDiffusionPipeline with the DDIM scheduler of the master components in ``dtype``.

    The models are copies unless ``copy_models`` is False and ``dtype`` is the master's float32: a
    pipeline that shares the master's modules must only read them (no casting, no speed-ups).
    """
    from diffusers import DDIMScheduler

    from synthgen.generate.sd15 import sd15_pipeline

    copy_models = copy_models or dtype != torch.float32
    parts = {k: (copy.deepcopy(v) if copy_models and k in ("unet", "vae", "text_encoder") else v) for k, v in master.items()}
    parts["scheduler"] = DDIMScheduler.from_config(master["scheduler"].config)
    return sd15_pipeline(parts, dtype if copy_models else None)


def free() -> None:
    """Return memory of objects the caller has just dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def allocated_gib(device: str):
    """Memory held before a measurement (every model this process keeps: the float32 master, the
    plain pipeline's and the engine's copies), which the peak includes."""
    return round(torch.cuda.memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def prompts_for(n: int, offset: int) -> list[str]:
    return [f"a photo of object number {offset + i}, studio lighting" for i in range(n)]


def seeds_for(n: int, offset: int) -> list[int]:
    return [image_seed(RECIPE_SEED, offset + i) for i in range(n)]


def card_peak(device: str) -> dict:
    """The card's spec and practical bf16 rate (table) and a measured large-matmul rate."""
    if not device.startswith("cuda"):
        return {"name": environment(device)["device_name"], "spec_tflops": None, "practical_tflops": None,
                "measured_matmul_tflops": None}
    name = torch.cuda.get_device_name()
    spec = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    measured = 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12
    del a, b
    free()
    return {"name": name, "spec_tflops": spec, "practical_tflops": spec * PRACTICAL_SHARE if spec else None,
            "measured_matmul_tflops": round(measured, 1)}


# ------------------------------------------------------------------------------------------------
# the two paths
# ------------------------------------------------------------------------------------------------
class Plain:
    """What a user writes: pipe(prompts, steps, guidance, generators) -> PIL images."""

    def __init__(self, pipe, size: int) -> None:
        self.pipe, self.size = pipe, size

    def __call__(self, batch: int, steps: int, offset: int, output_type: str = "pil"):
        gens = [torch.Generator().manual_seed(s) for s in seeds_for(batch, offset)]
        return self.pipe(prompts_for(batch, offset), num_inference_steps=steps, guidance_scale=GUIDANCE,
                         height=self.size, width=self.size, generator=gens, output_type=output_type).images


class Engine:
    """synthgen's path: ImageGenerator.generate on a prepared pipeline -> PIL images."""

    def __init__(self, loaded, cfg: GeneratorConfig, output: OutputConfig | None = None) -> None:
        self.loaded, self.cfg = loaded, cfg
        self.gen = ImageGenerator(loaded, cfg, output or OutputConfig(), RECIPE_SEED)

    def __call__(self, batch: int, steps: int, offset: int):
        self.gen.cfg = self.cfg.model_copy(update={"steps": steps, "batch_size": batch})
        prompts = prompts_for(batch, offset)
        return self.gen.generate([PromptRecord(index=offset + i, prompt=p) for i, p in enumerate(prompts)])

    def pixels(self, batch: int, steps: int, offset: int) -> np.ndarray:
        self.gen.cfg = self.cfg.model_copy(update={"steps": steps, "batch_size": batch})
        return self.gen.run_pipeline(prompts_for(batch, offset), seeds_for(batch, offset))[0]


def measure(path, name: str, batch: int, steps_list: list[int], repeats: int, device: str, flops: dict,
            limit_tflops, offset: int) -> list[dict]:
    """Warm up twice (2 steps), then time ``repeats`` calls per step count."""
    from synthgen.generate.sd15 import image_flops

    warm = [timed(lambda k=k: path(batch, 2, offset + k * batch), device) for k in range(2)]
    rows = []
    for steps in steps_list:
        reset_peak(device)
        held = allocated_gib(device)
        times = [timed(lambda r=r: path(batch, steps, offset + (2 + r) * batch), device) for r in range(repeats)]
        rate = batch / statistics.median(times)
        tflop = image_flops(flops, steps) / 1e12
        limit = limit_tflops / tflop if limit_tflops else None
        rows.append({
            "path": name, "batch": batch, "steps": steps, "images_per_s": round(rate, 3),
            "seconds_per_batch": round(statistics.median(times), 3), "times": [round(t, 3) for t in times],
            "compile_and_warmup_s": round(max(0.0, warm[0] - warm[1]), 2), "first_call_s": round(warm[0], 2),
            "peak_memory_gib": peak_gib(device), "allocated_before_gib": held, "tflop_per_image": round(tflop, 2),
            "limit_images_per_s": round(limit, 2) if limit else None,
            "percent_of_limit": round(100 * rate / limit, 1) if limit else None,
        })
        print(f"{name:>7} batch {batch:>3} steps {steps:>3}: {rate:8.3f} img/s  "
              f"{'' if limit is None else f'{100 * rate / limit:5.1f}% of limit'}  "
              f"peak {peak_gib(device)} GiB (held before: {held})  warm-up {warm[0]:.1f}s/{warm[1]:.1f}s", flush=True)
    return rows


def breakdown(engine: "Engine", batch: int, steps: int, device: str, offset: int) -> dict:
    """One engine call split into text encoding, denoising (UNet loop), VAE decode and the rest (host)."""
    gen = engine.gen
    phases = {"text_encoder_s": 0.0, "denoise_s": 0.0, "vae_decode_s": 0.0}

    def timing(fn, key):
        def wrapped(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            phases[key] += time.perf_counter() - start
            return out
        return wrapped

    originals = gen.embeddings._encode, gen._denoise, gen.decoder
    gen.embeddings._encode = timing(originals[0], "text_encoder_s")
    gen._denoise = timing(originals[1], "denoise_s")
    gen.decoder = timing(originals[2], "vae_decode_s")
    try:
        total = timed(lambda: engine(batch, steps, offset), device)
    finally:
        gen.embeddings._encode, gen._denoise, gen.decoder = originals
    phases["host_s"] = total - sum(phases.values())  # generators, uint8 transfer, checks, PIL
    return {"batch": batch, "steps": steps, "total_s": round(total, 3), **{k: round(v, 3) for k, v in phases.items()}}


# ------------------------------------------------------------------------------------------------
# pixel effects
# ------------------------------------------------------------------------------------------------
def to_levels(images) -> np.ndarray:
    """Plain pipeline float output -> uint8 levels, as ``numpy_to_pil`` rounds."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.int16)


def diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(d.max()), "mean": round(float(d.mean()), 4)}


def pixel_effects(master, engine, args, device: str, base_dtype, engine_cfg: GeneratorConfig, budget: Budget,
                  rows: list, save) -> None:
    """Each optimisation on top of the row before, same prompts and seeds, against the plain pipeline.

    Appends to ``rows`` and calls ``save()`` after each.
    """
    n, steps, size = args.pixel_batch, args.pixel_steps, args.size
    ref: dict[str, np.ndarray] = {}

    def record(name: str, pixels: np.ndarray, note: str = "") -> None:
        row = {"variant": name, "vs_plain": diff(pixels, ref["plain"]) if "plain" in ref else None, "note": note}
        if "last" in ref:
            row["vs_previous"] = diff(pixels, ref["last"])
        if "fp32" in ref:
            row["vs_float32"] = diff(pixels, ref["fp32"])
        ref["last"] = pixels
        rows.append(row)
        save()
        print(f"  {name:<42} vs plain {row['vs_plain']}  vs previous {row.get('vs_previous')}", flush=True)

    def plain_pixels(dtype) -> np.ndarray:
        pipe = pipeline_of(master, dtype, copy_models=False).to(device)
        out = to_levels(Plain(pipe, size)(n, steps, 0, output_type="np"))
        del pipe
        free()
        return out

    def engine_pixels(update: dict) -> np.ndarray:
        cfg = engine_cfg.model_copy(update={"compile": False, **update})
        loaded = prepare_pipeline(pipeline_of(master, resolve_dtype(cfg.dtype, device)), cfg, revision="random")
        out = Engine(loaded, cfg).pixels(n, steps, 0)
        del loaded
        free()
        return out

    ref["fp32"] = plain_pixels(torch.float32)
    if base_dtype != torch.float32:
        ref["plain"] = plain_pixels(base_dtype)
        record(f"plain {dtype_name(base_dtype)} (the baseline)", ref["plain"])
    else:
        ref["plain"] = ref["fp32"]
        record("plain float32 (the baseline)", ref["plain"])
    engine_dtype = resolve_dtype(engine_cfg.dtype, device)
    off = {"dtype": dtype_name(base_dtype), "channels_last": False, "fuse_qkv": False, "prompt_cache": 0,
           "vae_decode_chunk": n}
    ladder = [
        ("engine, every setting off", {}, "synthgen decodes the latents, float32 before x/2+0.5, uint8 on the device"),
        ("+ prompt-embedding cache", {"prompt_cache": 1024}, ""),
        ("+ VAE decode in chunks of 1", {"vae_decode_chunk": 1}, "decode batch size: kernel choice only"),
        (f"+ {dtype_name(engine_dtype)}", {"dtype": dtype_name(engine_dtype)}, "dtype: auto"),
        ("+ channels-last", {"channels_last": True}, ""),
        ("+ fused QKV", {"fuse_qkv": True}, ""),
    ]
    settings = dict(off)
    for name, update, note in ladder:
        if name.startswith("+ ") and update.get("dtype") == off["dtype"]:
            continue  # the engine's dtype is the baseline's (CPU): nothing to add
        if budget.left() < 10:
            rows.append({"variant": name, "skipped": "time"})
            continue
        settings.update(update)
        record(name, engine_pixels(settings), note)
    uncompiled = ref["last"]
    if engine is not None and budget.left() > 10:
        record("the engine as benchmarked (+ torch.compile)", engine.pixels(n, steps, 0),
               "compiled: " + ", ".join(engine.loaded.compiled_modules))
    if budget.left() > 10:
        ref["last"] = uncompiled  # the step cache is measured without compile, on the row before
        record(f"step cache, interval {args.step_cache} (opt-in)",
               engine_pixels({**settings, "step_cache_interval": args.step_cache}),
               "DeepCache: deep UNet blocks run every Nth step; an approximation, off by default")


# ------------------------------------------------------------------------------------------------
# speed variants: candidate settings, measured against the engine as it is, in the same process
# ------------------------------------------------------------------------------------------------
VARIANTS = {
    "cudnn-benchmark": "torch.backends.cudnn.benchmark on: cuDNN times its convolution algorithms once per shape",
    "cuda-graphs": "UNet and VAE decoder compiled with mode='reduce-overhead' (CUDA graphs), batch dimension dynamic",
    "inductor-tuning": ("diffusers' torch.compile recipe: inductor conv_1x1_as_mm, coordinate-descent tuning "
                        "(all directions), no epilogue fusion"),
    "cudnn-attention": "SDPA prefers cuDNN's fused attention (then flash, then memory-efficient) while compiling and running",
}


@contextlib.contextmanager
def preferring_cudnn_attention():
    """SDPA's backend order with cuDNN first; the others stay as fallbacks for shapes cuDNN refuses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


@contextlib.contextmanager
def variant_state(name: str):
    """The process-wide switches a variant needs, restored afterwards."""
    if name == "cudnn-benchmark":
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before
    elif name == "inductor-tuning":
        import torch._inductor.config as inductor

        with inductor.patch({"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                             "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}):
            yield
    elif name == "cudnn-attention":
        import torch._functorch.config as functorch
        import torch._inductor.config as inductor

        # the compile caches' keys leave out SDPA's backend order: a cached graph would keep flash
        with preferring_cudnn_attention(), inductor.patch({"fx_graph_cache": False}), \
                functorch.patch({"enable_autograd_cache": False}):
            yield
    else:
        yield


def speed_variants(names: list[str], engine: "Engine", make_engine, engine_cfg: GeneratorConfig, batch: int,
                   steps: int, args, device: str, flops: dict, limit_tflops, offset: int, budget: "Budget",
                   rows: list, save, error) -> None:
    """The engine as it is at ``batch``/``steps``, then each variant alone on top of it: images/s and pixels.

    ``cudnn-benchmark`` reuses the compiled engine (a runtime switch); the others compile a fresh
    engine after ``torch._dynamo.reset()`` (each new module instance would otherwise count against
    Dynamo's recompile limit). Appends to ``rows`` and calls ``save()`` after each row.
    """
    n = args.pixel_batch
    base_row = measure(engine, "engine", batch, [steps], args.repeats, device, flops, limit_tflops, offset)[0]
    base_row["variant"] = "the engine as it is"
    base_pixels = engine.pixels(n, steps, 0)
    rows.append(base_row)
    save()
    for name in names:
        offset += batch * (2 + args.repeats)
        if budget.left() < 30:
            rows.append({"variant": name, "skipped": "time"})
            continue
        try:
            with variant_state(name):
                if name == "cudnn-benchmark":
                    candidate = engine
                else:
                    torch._dynamo.reset()  # the engine as it is recompiles if it runs again
                    free()
                    if name == "cuda-graphs":
                        from synthgen.generate.accel import compile_with_dynamic_batch

                        candidate = make_engine(engine_cfg.model_copy(update={"compile": False}))
                        for module in (candidate.loaded.pipe.unet, candidate.loaded.pipe.vae.decoder):
                            compile_with_dynamic_batch(module, mode="reduce-overhead")
                    else:
                        candidate = make_engine(engine_cfg)
                row = measure(candidate, f"+{name}", batch, [steps], args.repeats, device, flops, limit_tflops,
                              offset)[0]
                row.update(variant=name, what=VARIANTS[name], engine_provenance=candidate.loaded.provenance(),
                           speedup_vs_engine=round(row["images_per_s"] / base_row["images_per_s"], 3),
                           pixels_vs_engine=diff(candidate.pixels(n, steps, 0), base_pixels))
                print(f"    {name}: {row['speedup_vs_engine']}x the engine; pixels vs the engine "
                      f"{row['pixels_vs_engine']}", flush=True)
                rows.append(row)
            candidate = None
            free()
        except Exception as exc:
            error(f"variant {name}", exc)
        save()


# ------------------------------------------------------------------------------------------------
# attention: SDPA's share of a UNet forward, and each fused backend on the same calls
# ------------------------------------------------------------------------------------------------
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def attention_profile(unet, batch: int, size: int, text_dim: int, device: str, repeats: int = 3) -> dict:
    """Record every ``scaled_dot_product_attention`` call of one guided UNet forward (``2 * batch`` rows,
    eager), then time those same calls under each fused backend alone, against the forward's time.

    Attention is ~16% of SD 1.5's UNet FLOPs but runs at head dims 40-160, where fused kernels are
    least efficient; this says how much of the UNet's time it takes and whether another backend is
    faster (a candidate for the ``cudnn-attention`` variant), without a compile.
    """
    import torch.nn.functional as F

    dtype = next(unet.parameters()).dtype
    latents = torch.randn(2 * batch, unet.config.in_channels, size // 8, size // 8, device=device, dtype=dtype)
    text = torch.randn(2 * batch, 77, text_dim, device=device, dtype=dtype)
    timestep = torch.tensor(500, device=device)
    shapes: dict[tuple, int] = {}
    original = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        shape = (tuple(query.shape), tuple(key.shape))
        shapes[shape] = shapes.get(shape, 0) + 1
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = recording  # diffusers' processors look it up on F at call time
    try:
        with torch.inference_mode():
            unet(latents, timestep, text)
    finally:
        F.scaled_dot_product_attention = original
    if not shapes:
        raise RuntimeError("the UNet made no scaled_dot_product_attention call (attention processor not SDPA)")
    with torch.inference_mode():
        forward_s = statistics.median(timed(lambda: unet(latents, timestep, text), device) for _ in range(repeats))
    flop = sum(n * 4 * q[0] * q[1] * q[2] * k[2] * q[3] for (q, k), n in shapes.items())  # QK^T and AV
    tensors = [((torch.randn(q, device=device, dtype=dtype), torch.randn(k, device=device, dtype=dtype),
                 torch.randn(k[:-1] + (q[-1],), device=device, dtype=dtype)), n) for (q, k), n in shapes.items()]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    default = {}
    if device.startswith("cuda"):  # which backend SDPA picks by itself for each shape
        try:
            default = {f"{list(q)} x {list(k)}": SDPBackend(torch._fused_sdp_choice(*qkv)).name
                       for ((q, k), _), (qkv, _) in zip(shapes.items(), tensors)}
        except Exception as exc:  # a private helper: its absence must not cost the measurement
            default = {"error": f"{type(exc).__name__}: {exc}"[:200]}

    def replay():
        for (q, k, v), n in tensors:
            for _ in range(n):
                original(q, k, v)

    backends = []
    for name in SDPA_BACKENDS:
        try:
            with torch.inference_mode(), sdpa_kernel([getattr(SDPBackend, name)]):
                replay()
                seconds = statistics.median(timed(replay, device) for _ in range(repeats))
            backends.append({"backend": name, "seconds_per_forward": round(seconds, 5),
                             "tflops": round(flop / seconds / 1e12, 1),
                             "share_of_eager_forward": round(seconds / forward_s, 3)})
        except Exception as exc:  # a backend this card or these shapes do not support
            backends.append({"backend": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"})
        print(f"  attention {name}: {backends[-1]}", flush=True)
    return {"batch": batch, "unet_rows": 2 * batch, "eager_unet_forward_s": round(forward_s, 4),
            "attention_gflop_per_forward": round(flop / 1e9, 3),
            "calls": [{"query": list(q), "key": list(k), "count": n} for (q, k), n in shapes.items()],
            "default_backend": default, "backends": backends}


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------
def build_rate(engine: "Engine", cfg: GeneratorConfig, batch: int, steps: int, images: int, device: str, *,
               image_format: str, shard_images: int, writers: list[str], budget: "Budget") -> dict:
    """``synthgen.dataset.build_dataset`` end to end (plan, shards of ``shard_images`` images resized to
    half size and encoded as ``image_format``, files, markers, manifest and card) with each of
    ``writers``, next to the bare engine (``ImageGenerator.generate`` at the generated size, as the
    build's generator runs) on the same images; the build's rate over the engine's is the ratio."""
    from synthgen.dataset import build_dataset
    from synthgen.prompts import build_sampler
    from synthgen.recipe import recipe_from_dict

    output = {"images_per_shard": shard_images, "image_size": cfg.height // 2, "image_format": image_format}
    gen_cfg = cfg.model_copy(update={"batch_size": batch, "steps": steps})

    def recipe(writer: str):
        return recipe_from_dict({
            "name": "bench-sd", "seed": RECIPE_SEED, "count": images,
            "prompts": {"kind": "wordnet", "classes": "cifar10", "templates": ["{c}, {h} inside {b}"]},
            "generator": gen_cfg.model_dump(mode="json"), "output": {**output, "writer": writer},
        })

    records = [build_sampler(recipe(writers[0]))[i] for i in range(images)]
    bare = Engine(engine.loaded, gen_cfg, OutputConfig(image_size=None))
    bare.gen.generate(records[:batch])  # warm-up at this batch size (compile, allocator)
    bare_s = timed(lambda: bare.gen.generate(records), device)
    out = {"images": images, "batch": batch, "steps": steps, "output": output,
           "engine_images_per_s": round(images / bare_s, 3), "writers": {}}
    for writer in writers:
        if budget.left() < 2 * bare_s + 15:
            out["writers"][writer] = {"skipped": "time"}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "ds"
            build_s = timed(lambda: build_dataset(recipe(writer), folder, progress=False, loaded_pipeline=engine.loaded),
                            device)
            shards = len(list((folder / "data").glob("*.parquet")))
            megabytes = sum(p.stat().st_size for p in (folder / "data").glob("*.parquet")) / 2**20
        out["writers"][writer] = {"build_images_per_s": round(images / build_s, 3), "build_vs_engine": round(bare_s / build_s, 3),
                                  "shards": shards, "shard_megabytes": round(megabytes, 2)}
        print(f"  build ({writer} writer): {images / build_s:.3f} img/s = {bare_s / build_s:.3f} x the engine's "
              f"{images / bare_s:.3f} img/s ({shards} shards, {image_format})", flush=True)
    first = out["writers"].get(writers[0], {})
    out.update({k: first[k] for k in ("build_images_per_s", "build_vs_engine", "shards") if k in first})
    out["writer"] = writers[0]
    return out


# ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", choices=("sd15", "tiny"), default="sd15", help="tiny: synthgen's tiny pipeline (a smoke test)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", default="25,50")
    ap.add_argument("--batches", default="32,16,8,1", help="largest first: if time runs out, the big batches are done")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--base-dtype", default=None, help="plain pipeline dtype [float16 on CUDA, float32 elsewhere]")
    ap.add_argument("--pixel-batch", type=int, default=4)
    ap.add_argument("--pixel-steps", type=int, default=None, help="[the first of --steps]")
    ap.add_argument("--step-cache", type=int, default=3, help="interval of the opt-in step-cache row")
    ap.add_argument("--build-images", type=int, default=None, help="images of the end-to-end build [4 x largest batch]")
    ap.add_argument("--build-shard", type=int, default=None, help="images per shard of the build [the largest batch]")
    ap.add_argument("--build-format", choices=("jpeg", "png", "webp"), default="jpeg",
                    help="the build's output.image_format [jpeg, as the ImageNet-SD recipes]")
    ap.add_argument("--build-writers", default="pipelined,serial",
                    help="output.writer of each build, the first one reported as the build rate")
    ap.add_argument("--stages", default="table,pixels,build",
                    help="any of table, pixels, build, attention, variants (variants runs last: it resets torch.compile)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="candidate speed-ups measured by the variants stage: " + ", ".join(VARIANTS))
    ap.add_argument("--variant-batch", type=int, default=None, help="batch of the variants stage [the largest batch]")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new measurements after this")
    ap.add_argument("--engine-set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine GeneratorConfig override, e.g. compile=false (repeatable)")
    ap.add_argument("--prefer-cudnn-attention", action="store_true",
                    help="the whole run with the cudnn-attention variant's switches (every path, table included)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    process_switches = contextlib.ExitStack()  # held until the process ends
    if args.prefer_cudnn_attention:
        process_switches.enter_context(variant_state("cudnn-attention"))

    device = args.device
    if device.startswith("cuda") and torch.device(device).index is not None:  # set_device("cuda") raises
        torch.cuda.set_device(device)  # cuda:N: the argument-less torch.cuda calls here (sync, memory, events, name) mean this card
    steps_list = [int(s) for s in args.steps.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    args.pixel_steps = args.pixel_steps or steps_list[0]
    stages = set(args.stages.split(","))
    unknown = sorted(stages - {"table", "pixels", "build", "attention", "variants"}) + [
        v for v in args.variants.split(",") if "variants" in stages and v not in VARIANTS]
    if unknown:
        ap.error(f"unknown stage or variant {unknown}: stages are table, pixels, build, attention, variants; "
                 f"variants are {', '.join(VARIANTS)}")
    base_dtype = getattr(torch, args.base_dtype) if args.base_dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    budget = Budget(args.budget_s)
    kind = device.split(":")[0]
    if kind == "cuda":
        kind = torch.cuda.get_device_name().split()[1].lower() if len(torch.cuda.get_device_name().split()) > 1 else "cuda"
    out = args.out or ROOT / "benchmarks" / "results" / f"generate-{args.arch}-{kind}.json"

    started = time.perf_counter()
    master = master_components(args.arch, device)
    flops = count_flops(args.arch, master, args.size)
    card = card_peak(device)
    limit_tflops = card["practical_tflops"] or card["measured_matmul_tflops"]
    overrides = dict(item.split("=", 1) for item in args.engine_set)
    engine_cfg = GeneratorConfig(model=f"random:{args.arch}", scheduler="ddim", guidance_scale=GUIDANCE,
                                 height=args.size, width=args.size, device=device,
                                 **{k: yaml.safe_load(v) for k, v in overrides.items()})
    result = {
        "benchmark": "stable-diffusion-generation",
        "note": ("random-weight models with SD 1.5's architecture: speed only, never image quality"
                 if args.arch == "sd15" else "synthgen's tiny pipeline: a smoke test of the benchmark, not SD speed")
        + ("; on a CPU at a small size: proves the benchmark runs, measures nothing" if device == "cpu" else ""),
        "environment": environment(device), "card": card,
        "limit": {"tflops_used": limit_tflops, "source": "practical = 0.8 x spec dense bf16" if card["practical_tflops"]
                  else "measured bf16 matmul" if limit_tflops else None},
        "flops_per_call": {k: round(v / 1e12, 4) for k, v in flops.items()},
        "settings": {"arch": args.arch, "size": args.size, "steps": steps_list, "batches": batches, "guidance": GUIDANCE,
                     "scheduler": "ddim", "repeats": args.repeats, "plain_dtype": dtype_name(base_dtype),
                     "prefer_cudnn_attention": args.prefer_cudnn_attention,
                     "engine_config": engine_cfg.model_dump(mode="json")},
        "setup_s": round(time.perf_counter() - started, 1),
        "table": [], "pixels": [], "build": None, "attention": None, "variants": [], "skipped": [], "errors": [],
    }
    print(f"{card['name']}: limit {limit_tflops} TFLOP/s; FLOPs per call {result['flops_per_call']}; "
          f"setup {result['setup_s']}s", flush=True)

    def save() -> None:
        write_json(out, result)

    def error(where: str, exc: Exception) -> None:  # keep what was measured; say what failed in one line
        result["errors"].append(f"{where}: {type(exc).__name__}: {str(exc).strip()[:300]}")
        print(result["errors"][-1], flush=True)

    def make_engine(cfg: GeneratorConfig) -> Engine:
        loaded = prepare_pipeline(pipeline_of(master, resolve_dtype(cfg.dtype, device)), cfg, revision="random")
        result["engine_provenance"] = loaded.provenance()
        return Engine(loaded, cfg)

    plain = Plain(pipeline_of(master, base_dtype, copy_models=False).to(device), args.size)
    engine = make_engine(engine_cfg)
    save()

    if "table" in stages:
        offset = 0
        for batch in batches:
            for name in ("plain", "engine"):
                if budget.left() < 15:
                    result["skipped"].append(f"table {name} batch {batch}: time")
                    continue
                path = plain if name == "plain" else engine
                try:
                    rows = measure(path, name, batch, steps_list, args.repeats, device, flops, limit_tflops, offset)
                except Exception as exc:
                    error(f"table {name} batch {batch}", exc)
                    rows = []
                    if name == "engine" and engine.loaded.compiled:  # measure the rest uncompiled
                        torch._dynamo.reset()
                        engine_cfg = engine_cfg.model_copy(update={"compile": False})
                        result["settings"]["engine_config"] = engine_cfg.model_dump(mode="json")
                        engine = None
                        free()
                        engine = make_engine(engine_cfg)
                        try:
                            rows = measure(engine, name, batch, steps_list, args.repeats, device, flops,
                                           limit_tflops, offset)
                        except Exception as exc2:
                            error(f"table {name} batch {batch}, compile off", exc2)
                result["table"].extend(rows)
                offset += batch * (2 + args.repeats)
                save()
        if budget.left() > 30:
            try:
                result["breakdown"] = breakdown(engine, max(batches), steps_list[0], device, offset)
                print(f"engine time by phase: {result['breakdown']}", flush=True)
            except Exception as exc:
                error("breakdown", exc)
        for row in result["table"]:
            base = next((r for r in result["table"] if r["path"] == "plain" and r["batch"] == row["batch"]
                         and r["steps"] == row["steps"]), None)
            if row["path"] == "engine" and base:
                row["speedup_vs_plain"] = round(row["images_per_s"] / base["images_per_s"], 2)
        save()
    path = plain = None
    free()

    if "build" in stages and budget.left() > 20:
        try:
            images = args.build_images or 4 * max(batches)
            result["build"] = build_rate(engine, engine_cfg, max(batches), steps_list[0], images, device,
                                         image_format=args.build_format, shard_images=args.build_shard or max(batches),
                                         writers=args.build_writers.split(","), budget=budget)
            print(f"build: {result['build']}", flush=True)
        except Exception as exc:
            error("build", exc)
        save()
    elif "build" in stages:
        result["skipped"].append("build: time")
    if not engine.loaded.compiled:  # only the compiled engine is needed again (its pixel row); free its memory
        engine = None
        free()

    if "pixels" in stages and budget.left() > 20:
        print(f"pixel effects: {args.pixel_batch} images, {args.pixel_steps} steps", flush=True)
        try:
            pixel_effects(master, engine, args, device, base_dtype, engine_cfg, budget, result["pixels"], save)
        except Exception as exc:
            error("pixels", exc)
        save()
    elif "pixels" in stages:
        result["skipped"].append("pixels: time")
    if "attention" in stages and budget.left() > 20:
        batch = args.variant_batch or max(batches)
        print(f"attention: SDPA calls of one UNet forward at batch {batch}, eager, each fused backend", flush=True)
        try:
            cfg = engine_cfg.model_copy(update={"compile": False})
            loaded = prepare_pipeline(pipeline_of(master, resolve_dtype(cfg.dtype, device)), cfg, revision="random")
            result["attention"] = attention_profile(loaded.pipe.unet, batch, args.size,
                                                    master["text_encoder"].config.hidden_size, device)
            result["attention"]["engine_provenance"] = loaded.provenance()
            loaded = None
            free()
        except Exception as exc:
            error("attention", exc)
        save()
    elif "attention" in stages:
        result["skipped"].append("attention: time")
    if "variants" in stages and budget.left() > 60:
        batch = args.variant_batch or max(batches)
        print(f"speed variants: batch {batch}, {steps_list[0]} steps", flush=True)
        provenance = result["engine_provenance"]  # the table's engine; make_engine records each variant's
        try:
            speed_variants(args.variants.split(","), engine or make_engine(engine_cfg), make_engine, engine_cfg,
                           batch, steps_list[0], args, device, flops, limit_tflops, 10_000, budget,
                           result["variants"], save, error)
        except Exception as exc:
            error("variants", exc)
        result["engine_provenance"] = provenance
        engine = None
        save()
    elif "variants" in stages:
        result["skipped"].append("variants: time")
    result["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print(f"wrote {out} ({result['total_s']}s)")


if __name__ == "__main__":
    main()
