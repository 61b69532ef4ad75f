"""Crash campaign: kill -9 `synthgen build` at random moments and at exact phases, resume, and check
that every resumed folder ends byte-identical to an uninterrupted build.

Each trial builds a fresh folder with the demo recipe (shrunk with --set so a build takes seconds),
killing one build process per phase in ``--phases`` (in build order), each kill followed by a
resume, then lets a last run finish. A kill targets a phase by watching the folder (1 ms polling):
``plan`` (the fresh folder's state directory appears: the plan is being written), ``shard-write``
(a shard's temp file appears), ``marker`` (a new completion marker appears), ``manifest`` (every
marker is there, the manifest not yet), ``card`` (the manifest is there, the card not yet), or
``random`` (a uniform delay over an uninterrupted build's duration, process start included). The
phase a kill landed in is read from the folder right after it and recorded. A target the build ran
past before the watcher saw it counts as "missed", not as a kill.

The trials use ``--writer`` (default ``pipelined``: shards are written in a background thread while
the next one generates, so ``shard-write`` and ``marker`` kills land inside a background write), the
reference build ``--reference-writer`` (default ``serial``). After the last run every trial must
have: exit status 0, exactly the planned rows, each shard file byte-identical (sha256) to the
reference build's, ``verify_dataset`` clean (checksums, indices,
every image decodes), no temp files left, and a manifest whose model record names the resolved
revision, scheduler, device, dtype and library versions.

    python benchmarks/crash_campaign.py                      # 4 trials x 6 phases, results/crash-campaign-cpu.json
    python benchmarks/crash_campaign.py --writer serial      # the same with the serial writer
    python benchmarks/crash_campaign.py --trials 1 --phases plan,shard-write,manifest --out X.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synthgen.provenance import environment, write_json  # noqa: E402

SETTINGS = [
    "count=24",
    "output.images_per_shard=4",
    "generator.steps=2",
    "generator.height=32",
    "generator.width=32",
    "generator.batch_size=2",
    "generator.device=cpu",
]
PHASES = ("plan", "shard-write", "random", "marker", "manifest", "card")  # build order


def build_command(out: Path, writer: str = "pipelined") -> list[str]:
    args = [sys.executable, "-m", "synthgen", "build", "demo", "--out", str(out), "-q"]
    for item in [*SETTINGS, f"output.writer={writer}"]:
        args += ["--set", item]
    return args


def shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "data").glob("*.parquet"))}


def observed_phase(folder: Path, shards: int) -> str:
    """Where a build stood when it was killed, read from what it left on disk."""
    state = folder / ".synthgen"
    if not state.is_dir():
        return "startup"
    if not (state / "plan.json").is_file():
        return "plan"
    if list((folder / "data").glob(".tmp-*")) if (folder / "data").is_dir() else []:
        return "shard-write"
    markers = len(list((state / "done").glob("*.json"))) if (state / "done").is_dir() else 0
    if markers < shards:
        return "marker" if list((state / "done").glob(".tmp-*")) else "generating"
    if not (folder / "synthgen_manifest.json").is_file():
        return "manifest"
    if not (folder / "README.md").is_file():
        return "card"
    return "finished"


def target_reached(phase: str, folder: Path, shards: int, start_markers: int, deadline: float) -> bool:
    state = folder / ".synthgen"
    if phase == "plan":
        return (state / "folder.lock").exists()
    if phase == "shard-write":
        data = folder / "data"
        return data.is_dir() and any(p.name.startswith(".tmp-") for p in data.iterdir())
    markers = len(list((state / "done").glob("*.json"))) if (state / "done").is_dir() else 0
    if phase == "marker":
        return markers > start_markers
    if phase == "manifest":
        return markers == shards and not (folder / "synthgen_manifest.json").exists()
    if phase == "card":
        return (folder / "synthgen_manifest.json").exists() and not (folder / "README.md").exists()
    return time.monotonic() >= deadline  # random


def run_and_kill(folder: Path, phase: str, reference_seconds: float, shards: int, rng: random.Random,
                 writer: str) -> dict:
    """Start a build and kill -9 it when ``phase`` is reached; returns what happened."""
    start_markers = len(list((folder / ".synthgen" / "done").glob("*.json"))) if (folder / ".synthgen" / "done").is_dir() else 0
    deadline = time.monotonic() + rng.uniform(0.0, reference_seconds)
    proc = subprocess.Popen(build_command(folder, writer), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        if target_reached(phase, folder, shards, start_markers, deadline):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"target": phase, "killed": True, "landed": observed_phase(folder, shards)}
        time.sleep(0.001 if phase != "random" else 0.005)
    err = proc.stderr.read().decode(errors="replace")
    return {"target": phase, "killed": False, "rc": proc.returncode, "stderr": err[-500:]}


def check_folder(folder: Path, reference: dict[str, str], rows: int) -> list[str]:
    from synthgen.dataset import verify_dataset

    problems = []
    digests = shard_digests(folder)
    if digests != reference:
        differing = sorted(k for k in set(digests) | set(reference) if digests.get(k) != reference.get(k))
        problems.append(f"shards differ from the uninterrupted build: {differing}")
    manifest = json.loads((folder / "synthgen_manifest.json").read_text())
    if manifest["rows"] != rows or not manifest.get("complete"):
        problems.append(f"manifest rows {manifest['rows']} != {rows}")
    model = manifest.get("model", {})
    missing = [k for k in ("model_revision", "scheduler", "device", "dtype", "versions") if not model.get(k)]
    if missing:
        problems.append(f"manifest model record lacks {missing}")
    report = verify_dataset(folder)
    problems += [f"verify: {p}" for p in report.problems]
    leftovers = [str(p.relative_to(folder)) for p in folder.rglob(".tmp-*")]
    if leftovers:
        problems.append(f"temp files left: {leftovers}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--phases", default=",".join(PHASES), help="kill targets of each trial, in build order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writer", choices=("pipelined", "serial"), default="pipelined", help="the trials' output.writer")
    parser.add_argument("--reference-writer", choices=("pipelined", "serial"), default="serial",
                        help="the uninterrupted reference build's output.writer")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder [default: a temp folder]")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "crash-campaign-cpu.json")
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")

    import tempfile

    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="crash-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    reference_folder = work / "reference"
    t0 = time.perf_counter()
    ref = subprocess.run(build_command(reference_folder, args.reference_writer), cwd=REPO, capture_output=True, text=True)
    reference_seconds = time.perf_counter() - t0
    if ref.returncode != 0:
        print(ref.stderr, file=sys.stderr)
        return 1
    reference = shard_digests(reference_folder)
    rows = json.loads((reference_folder / "synthgen_manifest.json").read_text())["rows"]
    shards = len(reference)

    trials, kills, landed, missed, failures = [], 0, {}, 0, 0
    for trial in range(args.trials):
        folder = work / f"trial-{trial:03d}"
        events = []
        for phase in phases:
            event = run_and_kill(folder, phase, reference_seconds, shards, rng, args.writer)
            events.append(event)
            if event["killed"]:
                kills += 1
                landed[event["landed"]] = landed.get(event["landed"], 0) + 1
            else:
                missed += 1
        final = subprocess.run(build_command(folder, args.writer), cwd=REPO, capture_output=True, text=True)
        problems = [] if final.returncode == 0 else [f"final run exited {final.returncode}: {final.stderr[-300:]}"]
        if final.returncode == 0:
            problems += check_folder(folder, reference, rows)
        failures += bool(problems)
        trials.append({"trial": trial, "events": events, "final_rc": final.returncode, "problems": problems})
        status = "ok" if not problems else "FAILED: " + "; ".join(problems)
        print(f"trial {trial}: " + ", ".join(f"{e['target']}->{e.get('landed', 'missed')}" for e in events) + f"  {status}",
              flush=True)

    summary = {
        "benchmark": "crash_campaign",
        "recipe": "demo",
        "settings": SETTINGS,
        "writer": args.writer,
        "reference_writer": args.reference_writer,
        "rows_planned": rows,
        "shards": shards,
        "reference_build_seconds": round(reference_seconds, 2),
        "trials": args.trials,
        "kills": kills,
        "missed_targets": missed,
        "kills_by_landed_phase": dict(sorted(landed.items())),
        "failed_trials": failures,
        "all_byte_identical": failures == 0,
        "seconds": round(time.perf_counter() - started, 1),
        "environment": environment("cpu"),
        "details": trials,
    }
    summary["environment"].pop("host", None)
    path = write_json(args.out, summary)
    print(f"{kills} kills ({missed} targets missed) in {args.trials} trials, landed: {summary['kills_by_landed_phase']}; "
          f"failed trials: {failures}; {summary['seconds']} s -> {path}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
