"""benchmarks/bench_sd.py runs end to end on a CPU (its GPU table is a device script's job).

With synthgen's tiny pipeline in place of SD 1.5 (``--arch tiny``), one step and one image per
batch: the table (plain diffusers and the engine), the phase breakdown, the end-to-end build rate
and the pixel-effect ladder all run and land in the JSON, and the engine's pixels equal the plain
pipeline's on a CPU in float32.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sd.py"


def test_bench_sd_runs_on_cpu_and_writes_every_stage(tmp_path, monkeypatch, tiny_pipeline_path):
    spec = importlib.util.spec_from_file_location("bench_sd", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sd.json"
    argv = ["bench_sd.py", "--arch", "tiny", "--device", "cpu", "--size", "64", "--steps", "1", "--batches", "2,1",
            "--repeats", "1", "--pixel-batch", "2", "--step-cache", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: threads only spin on shared cores
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["skipped"] == []
    table = {(r["path"], r["batch"]): r for r in result["table"]}
    assert set(table) == {("plain", 2), ("engine", 2), ("plain", 1), ("engine", 1)}
    assert all(r["images_per_s"] > 0 and r["percent_of_limit"] is None for r in table.values())  # no limit on a CPU
    assert table[("engine", 2)]["speedup_vs_plain"] > 0
    assert result["engine_provenance"]["compiled"] is False  # auto: off on a CPU
    assert result["breakdown"]["batch"] == 2 and result["breakdown"]["denoise_s"] > 0
    build = result["build"]  # build_dataset end to end: 4 shards of the largest batch, each writer
    assert build["images"] == 8 and build["shards"] == 4 and build["writer"] == "pipelined"
    assert set(build["writers"]) == {"pipelined", "serial"}
    assert all(w["shards"] == 4 and w["build_vs_engine"] > 0 for w in build["writers"].values())
    pixels = {row["variant"]: row for row in result["pixels"]}
    assert pixels["engine, every setting off"]["vs_plain"] == {"max": 0, "mean": 0.0}
    assert pixels["+ prompt-embedding cache"]["vs_plain"] == {"max": 0, "mean": 0.0}
    for row in result["pixels"]:
        assert row["vs_plain"]["max"] <= 2, row  # the tiny model at one step: rounding at most
    assert "step cache, interval 2 (opt-in)" in pixels
