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


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sd", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_sd_variants_stage_measures_each_candidate_against_the_engine(tmp_path, monkeypatch, tiny_pipeline_path):
    """The variants stage: the engine as it is, then each candidate alone, with speed-up and pixel difference.

    On a CPU neither candidate changes what runs (cuDNN is CUDA's; compile is off on a CPU), so the
    pixels equal the engine's exactly; the process-wide switches are restored afterwards.
    """
    import torch._inductor.config as inductor

    bench = _bench()
    out = tmp_path / "variants.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_sd.py", "--arch", "tiny", "--device", "cpu", "--size", "64", "--steps", "1", "--batches", "2",
        "--repeats", "1", "--pixel-batch", "1", "--stages", "variants", "--variants", "cudnn-benchmark,inductor-tuning",
        "--out", str(out)])
    before = torch.backends.cudnn.benchmark, inductor.conv_1x1_as_mm, inductor.epilogue_fusion
    bench.main()
    assert (torch.backends.cudnn.benchmark, inductor.conv_1x1_as_mm, inductor.epilogue_fusion) == before
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["table"] == [] and result["pixels"] == []
    rows = {row["variant"]: row for row in result["variants"]}
    assert list(rows) == ["the engine as it is", "cudnn-benchmark", "inductor-tuning"]
    assert rows["the engine as it is"]["batch"] == 2 and rows["the engine as it is"]["images_per_s"] > 0
    for name in ("cudnn-benchmark", "inductor-tuning"):
        assert rows[name]["pixels_vs_engine"] == {"max": 0, "mean": 0.0}
        assert rows[name]["speedup_vs_engine"] > 0 and rows[name]["what"] == bench.VARIANTS[name]
        assert rows[name]["engine_provenance"]["compiled"] is False
    assert result["engine_provenance"]["compiled"] is False and result["engine_provenance"]["device"] == "cpu"


def test_bench_sd_refuses_an_unknown_stage_or_variant(monkeypatch, capsys):
    bench = _bench()
    for extra in (["--stages", "table,speed"], ["--stages", "variants", "--variants", "cudnn-benchmark,fp8"]):
        monkeypatch.setattr(sys, "argv", ["bench_sd.py", "--arch", "tiny", "--device", "cpu", *extra])
        try:
            bench.main()
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{extra} was accepted")
        assert "unknown stage or variant" in capsys.readouterr().err


def test_bench_sd_attention_stage_times_every_sdpa_call_of_a_unet_forward(tmp_path, monkeypatch, tiny_pipeline_path):
    """The attention stage records each SDPA call of one guided UNet forward (one per attention module,
    with the latent and text shapes), times them under each fused backend (a CPU has flash only: the
    others are one-line errors, not a failed run), and the cudnn-attention variant leaves SDPA's
    backend switches as they were."""
    from diffusers.models.attention_processor import Attention

    bench = _bench()
    out = tmp_path / "attention.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_sd.py", "--arch", "tiny", "--device", "cpu", "--size", "64", "--steps", "1", "--batches", "2",
        "--repeats", "1", "--pixel-batch", "1", "--stages", "attention,variants", "--variants", "cudnn-attention",
        "--out", str(out)])
    switches = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
                torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    before = [f() for f in switches]
    bench.main()
    assert [f() for f in switches] == before
    result = json.loads(out.read_text())
    assert result["errors"] == []
    attention = result["attention"]
    unet = bench.master_components("tiny", "cpu")["unet"]
    assert sum(c["count"] for c in attention["calls"]) == sum(isinstance(m, Attention) for m in unet.modules())
    assert {c["query"][0] for c in attention["calls"]} == {4}  # 2 images x (conditional, unconditional)
    assert {c["key"][2] for c in attention["calls"]} >= {77}  # cross-attention on the 77 text tokens
    assert attention["attention_gflop_per_forward"] > 0 and attention["eager_unet_forward_s"] > 0
    backends = {row["backend"]: row for row in attention["backends"]}
    assert list(backends) == list(bench.SDPA_BACKENDS)
    assert 0 < backends["FLASH_ATTENTION"]["share_of_eager_forward"] < 1
    assert "error" in backends["CUDNN_ATTENTION"]  # CUDA's
    rows = {row["variant"]: row for row in result["variants"]}
    assert rows["cudnn-attention"]["pixels_vs_engine"] == {"max": 0, "mean": 0.0}  # a CPU keeps its own kernel
