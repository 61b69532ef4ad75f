"""Prompt-sampling rate of each sampler (prompts/s on one core).

    taskset -c 0 python benchmarks/bench_prompts.py [--n 100000] [--repeats 3] [--out benchmarks/results]

For each sampler it times ``sampler[i]`` for ``n`` consecutive indices (the path the build engine
uses) and, for the combinatorial sampler, the vectorised ``records``/``prompts_for`` batch paths;
construction time (reading tables / captions) is reported separately. The best of ``repeats`` runs
is kept. Prints a table and writes ``prompts-<date>-<host>.json`` with the machine, versions and
settings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synthgen.prompts import CaptionSampler, CombinatorialSampler, WordNetSampler  # noqa: E402
from synthgen.provenance import cpu_name, library_versions  # noqa: E402
from synthgen.recipe import CaptionPrompts, CombinatorialPrompts, WordNetPrompts  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="prompts per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    n, seed = args.n, args.seed

    cases = {
        "wordnet imagenet1k '{c}, {h} inside {b}'": (
            WordNetSampler,
            WordNetPrompts(classes="imagenet1k", templates=["{c}, {h} inside {b}"]),
            n,
        ),
        "wordnet imagenet1k 4 templates": (
            WordNetSampler,
            WordNetPrompts(classes="imagenet1k", templates=["{c}", "{c}, {h}", "{c}, {d}", "{c}, {h} inside {b}"]),
            n,
        ),
        "captions cc3m-validation m=10 shuffle": (
            CaptionSampler,
            CaptionPrompts(source="cc3m-validation.txt", images_per_caption=10, shuffle=True),
            n,
        ),
        "combinatorial 9.6M space": (CombinatorialSampler, CombinatorialPrompts(), n),
    }
    rows = []
    for name, (cls, config, count) in cases.items():
        build = time.perf_counter()
        sampler = cls(config, count, seed)
        build = time.perf_counter() - build
        seconds = best_of(args.repeats, lambda: [sampler[i] for i in range(count)])
        rows.append({"sampler": name, "path": "__getitem__", "n": count, "seconds": seconds,
                     "prompts_per_s": count / seconds, "construct_s": build})
        if isinstance(sampler, CombinatorialSampler):
            seconds = best_of(args.repeats, lambda: sampler.records(0, count))
            rows.append({"sampler": name, "path": "records(0, n)", "n": count, "seconds": seconds,
                         "prompts_per_s": count / seconds, "construct_s": build})
            seconds = best_of(args.repeats, lambda: sampler.prompts_for(range(count)))
            rows.append({"sampler": name, "path": "prompts_for(range(n))", "n": count, "seconds": seconds,
                         "prompts_per_s": count / seconds, "construct_s": build})

    width = max(len(r["sampler"]) for r in rows)
    print(f"{'sampler':<{width}}  {'path':<22} {'n':>8} {'seconds':>8} {'prompts/s':>12} {'construct s':>11}")
    for r in rows:
        print(f"{r['sampler']:<{width}}  {r['path']:<22} {r['n']:>8} {r['seconds']:>8.3f} "
              f"{r['prompts_per_s']:>12,.0f} {r['construct_s']:>11.3f}")

    now = dt.datetime.now(dt.timezone.utc)
    result = {
        "benchmark": "prompt sampling rate, one core, best of repeats",
        "date": now.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": library_versions(),
        "settings": {
            "n": n,
            "repeats": args.repeats,
            "seed": seed,
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    host = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in socket.gethostname())[:40]
    path = args.out / f"prompts-{now:%Y%m%d}-{host}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
