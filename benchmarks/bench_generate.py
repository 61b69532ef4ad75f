"""Generation throughput: images/s of ImageGenerator for several batch sizes, and of a whole build.

Times ``ImageGenerator.generate`` (one torch.Generator per image, the pipeline call, the
black/non-finite check, the resize to the stored size) after one warm-up batch; median of
``--repeats`` timed calls per batch size. Then ``build_dataset`` end to end (``--build-images``
images in shards of ``--build-shard``, written as ``--build-format``) with the serial writer and with
the pipelined one (shards encoded and written in a background thread while the next generates),
next to the bare engine on the same images, for each torch thread count in ``--build-threads``:
the build's rate over the engine's shows what the writer costs and how much of it the pipeline
hides. The default model is ``builtin:tiny-sd``, synthgen's tiny random-weight pipeline: its
numbers measure the engine's overhead on this machine, NOT the speed of a real Stable Diffusion. On a GPU with real weights in the local cache, pass e.g.
``--model CompVis/stable-diffusion-v1-4 --size 512 --steps 50 --dtype float16``.

    python benchmarks/bench_generate.py [--model builtin:tiny-sd] [--batch-sizes 1,4,16] [--steps 10]
    python benchmarks/bench_generate.py --batch-sizes 16 --build-threads 1,2   # + serial vs pipelined builds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from synthgen.generate import ImageGenerator, load_pipeline  # noqa: E402
from synthgen.prompts.base import PromptRecord  # noqa: E402
from synthgen.provenance import environment, write_json  # noqa: E402
from synthgen.recipe import GeneratorConfig, OutputConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-sd")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="generation size (square)")
    parser.add_argument("--stored-size", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                        help="torch.compile the UNet and VAE decoder (auto: on CUDA)")
    parser.add_argument("--build-images", type=int, default=96, help="images of each end-to-end build (0: none)")
    parser.add_argument("--build-shard", type=int, default=16, help="images per shard of the builds")
    parser.add_argument("--build-format", choices=("png", "jpeg", "webp"), default="png")
    parser.add_argument("--build-steps", type=int, default=None, help="steps of the builds [--steps]")
    parser.add_argument("--build-threads", default="", help="torch thread counts to build with [the current one]")
    parser.add_argument("--build-repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    base = GeneratorConfig(
        model=args.model, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance,
        height=args.size, width=args.size, dtype=args.dtype, device=args.device,
        batch_size=max(batch_sizes), compile={"true": True, "false": False}.get(args.compile, "auto"),
    )
    output = OutputConfig(image_size=args.stored_size)
    loaded = load_pipeline(base)
    rows = []
    for batch in batch_sizes:
        cfg = base.model_copy(update={"batch_size": batch})
        generator = ImageGenerator(loaded, cfg, output, recipe_seed=0)
        records = [PromptRecord(index=i, prompt=f"a photo of object number {i}") for i in range(batch)]
        generator.generate(records)  # warm-up: kernels, allocator, compilation
        times = []
        for r in range(args.repeats):
            records = [PromptRecord(index=(r + 1) * batch + i, prompt=f"a photo of object number {i}") for i in range(batch)]
            start = time.perf_counter()
            generator.generate(records)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append({"batch_size": batch, "seconds_per_batch": round(median, 4), "images_per_s": round(batch / median, 2)})

    print(f"model {args.model} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}), "
          f"{args.size}px, {args.steps} {args.scheduler} steps, guidance {args.guidance}")
    print(f"{'batch':>6} {'s/batch':>9} {'img/s':>8}")
    for row in rows:
        print(f"{row['batch_size']:>6} {row['seconds_per_batch']:>9} {row['images_per_s']:>8}")

    builds = []
    if args.build_images > 0:
        cfg = base.model_copy(update={"steps": args.build_steps or args.steps})
        output = {"images_per_shard": args.build_shard, "image_size": args.stored_size, "image_format": args.build_format}
        threads = [int(t) for t in args.build_threads.split(",") if t] or [torch.get_num_threads()]
        before = torch.get_num_threads()
        try:
            for n in threads:
                torch.set_num_threads(n)
                builds.append(build_rates(loaded, cfg, output, args.build_images, args.build_repeats) | {"torch_threads": n})
        finally:
            torch.set_num_threads(before)
        print(f"builds: {args.build_images} images, shards of {args.build_shard} ({args.build_format}), "
              f"{cfg.steps} steps, batch {cfg.batch_size}; median of {args.build_repeats}")
        print(f"{'threads':>7} {'engine':>8} {'serial':>8} {'ratio':>6} {'pipelined':>9} {'ratio':>6}")
        for b in builds:
            print(f"{b['torch_threads']:>7} {b['engine_images_per_s']:>8} {b['serial']['images_per_s']:>8} "
                  f"{b['serial']['vs_engine']:>6} {b['pipelined']['images_per_s']:>9} {b['pipelined']['vs_engine']:>6}")

    name = "builtin-tiny-sd" if args.model.startswith("builtin:") else args.model.replace("/", "--")
    path = write_json(
        args.out / f"generate-{name}-{loaded.device.split(':')[0]}.json",
        {
            "benchmark": "generation",
            "note": "builtin:tiny-sd is a random-weight toy pipeline: engine overhead, not SD speed"
            if args.model.startswith("builtin:") else "",
            "environment": environment(loaded.device),
            "model": loaded.provenance() if hasattr(loaded, "provenance") else {"id": args.model},
            "settings": {"size": args.size, "stored_size": args.stored_size, "steps": args.steps,
                         "scheduler": args.scheduler, "guidance": args.guidance, "repeats": args.repeats,
                         "compile": args.compile},
            "results": rows,
            "builds": {"images": args.build_images, "images_per_shard": args.build_shard, "image_format": args.build_format,
                       "steps": args.build_steps or args.steps, "repeats": args.build_repeats, "results": builds,
                       "note": BUILD_NOTE} if builds else None,
        },
    )
    print(f"wrote {path}")


BUILD_NOTE = (
    "build_vs_engine: the build's images/s over ImageGenerator.generate alone on the same images (1.0: the "
    "writer costs nothing). On a CPU the generator and the writer share the same cores: the pipelined "
    "writer can only hide the write where a core is idle (torch on fewer threads than cores), unlike a GPU "
    "box, where the generator waits on the GPU and the cores are free"
)


def build_rates(loaded, cfg: GeneratorConfig, output: dict, images: int, repeats: int) -> dict:
    """The engine's rate on ``images`` records, then ``build_dataset``'s with each writer (median of
    ``repeats``, alternating so that drift hits each alike)."""
    from synthgen.dataset import build_dataset
    from synthgen.prompts import build_sampler
    from synthgen.recipe import recipe_from_dict

    def recipe(writer: str):
        return recipe_from_dict({
            "name": "bench-generate", "seed": 0, "count": images,
            "prompts": {"kind": "wordnet", "classes": "cifar10", "templates": ["{c}, {h} inside {b}"]},
            "generator": cfg.model_dump(mode="json"), "output": {**output, "writer": writer},
        })

    records = [build_sampler(recipe("serial"))[i] for i in range(images)]
    generator = ImageGenerator(loaded, cfg, OutputConfig(), recipe_seed=0)  # at the generated size, as a build
    generator.generate(records[: cfg.batch_size])  # warm-up
    times: dict[str, list[float]] = {"engine": [], "serial": [], "pipelined": []}
    for _ in range(repeats):
        start = time.perf_counter()
        ImageGenerator(loaded, cfg, OutputConfig(), recipe_seed=0).generate(records)
        times["engine"].append(time.perf_counter() - start)
        for writer in ("serial", "pipelined"):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                build_dataset(recipe(writer), Path(tmp) / "ds", progress=False, loaded_pipeline=loaded)
                times[writer].append(time.perf_counter() - start)
    engine = statistics.median(times["engine"])
    out = {"engine_images_per_s": round(images / engine, 2)}
    for writer in ("serial", "pipelined"):
        median = statistics.median(times[writer])
        out[writer] = {"images_per_s": round(images / median, 2), "vs_engine": round(engine / median, 3),
                       "times": [round(t, 3) for t in times[writer]]}
    out["engine_times"] = [round(t, 3) for t in times["engine"]]
    return out


if __name__ == "__main__":
    main()
