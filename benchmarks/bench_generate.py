"""Generation throughput: images/s of ImageGenerator for several batch sizes.

Times ``ImageGenerator.generate`` (one torch.Generator per image, the pipeline call, the
black/non-finite check, the resize to the stored size) after one warm-up batch; median of
``--repeats`` timed calls per batch size. The default model is ``builtin:tiny-sd``, synthgen's tiny
random-weight pipeline: its numbers measure the engine's overhead on this machine, NOT the speed
of a real Stable Diffusion. On a GPU with real weights in the local cache, pass e.g.
``--model CompVis/stable-diffusion-v1-4 --size 512 --steps 50 --dtype float16``.

    python benchmarks/bench_generate.py [--model builtin:tiny-sd] [--batch-sizes 1,4,16] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
