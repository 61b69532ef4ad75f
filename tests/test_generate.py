"""Image generation on the real tiny Stable Diffusion pipeline (no mocks).

Batch-position bound: CPU kernels (oneDNN convolutions, batched matmuls) may take a different
blocking path for a batch of 4 than for a batch of 1, so the same image can differ in float
rounding between batch positions. Measured on a 2-core x86 CPU (torch 2.14, diffusers 0.42, one
thread), an image alone vs. at each position of a batch of 4, 3 indices: 4 steps -- 0 levels for
ddim, euler, euler_ancestral, dpm_solver_multistep, 1 for unipc; 10 steps -- at most 1 level for
all five, mean difference <= 0.0002 levels. We assert at most ``BATCH_POSITION_MAX_LEVELS`` = 2
levels (max abs difference of any channel of any pixel) and a mean below 0.01 levels: a wrong
generator/seed assignment changes nearly every pixel by tens of levels, so the test still fails on
any real mix-up.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from synthgen.errors import SynthgenError
from synthgen.generate.generator import ImageGenerator, rejection_reason
from synthgen.generate.pipeline import SCHEDULER_CLASSES, load_pipeline, make_scheduler
from synthgen.generate.seeds import image_seed
from synthgen.generate.tiny import build_tiny_pipeline, builtin_model_path, model_fingerprint
from synthgen.prompts.base import PromptRecord
from synthgen.recipe import SCHEDULERS, GeneratorConfig, OutputConfig

BATCH_POSITION_MAX_LEVELS = 2
SEED = 1234


def records(indices, prompt="a photo of a {i}"):
    return [PromptRecord(index=i, prompt=prompt.format(i=i)) for i in indices]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models' kernels are too small to gain from threads; with 2 threads on shared cores,
    OpenMP spin-waiting made a 4-step batch 10-50x slower. One thread keeps the file fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(tiny_generator_config):
    return load_pipeline(tiny_generator_config)


@pytest.fixture(scope="module")
def tiny_generator_config(tiny_pipeline_path):  # module-scoped copy of the conftest fixture
    return GeneratorConfig(
        model="builtin:tiny-sd", scheduler="ddim", steps=4, guidance_scale=2.0,
        height=64, width=64, batch_size=4, device="cpu", max_retries=3,
    )


def make_generator(loaded, cfg, output=None, seed=SEED):
    return ImageGenerator(loaded, cfg, output or OutputConfig(), seed)


# -------------------------------------------------------------------------------------------------
# the tiny pipeline
# -------------------------------------------------------------------------------------------------
def test_tiny_pipeline_builds_deterministically_and_loads_with_from_pretrained(tiny_pipeline_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    index = json.loads((tiny_pipeline_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    assert (tiny_pipeline_path / "tokenizer" / "vocab.json").is_file()
    assert (tiny_pipeline_path / "tokenizer" / "merges.txt").read_text().startswith("#version")

    # A second build gives the same bytes (fixed seed), so the same fingerprint.
    again = build_tiny_pipeline(tmp_path / "again")
    assert model_fingerprint(again) == model_fingerprint(tiny_pipeline_path)

    # The builtin path is reused, not rebuilt.
    mtime = (tiny_pipeline_path / "model_index.json").stat().st_mtime_ns
    assert builtin_model_path("builtin:tiny-sd") == tiny_pipeline_path
    assert (tiny_pipeline_path / "model_index.json").stat().st_mtime_ns == mtime
    assert not [p for p in tiny_pipeline_path.parent.iterdir() if p.name.startswith(".")]  # no temp left

    pipe = StableDiffusionPipeline.from_pretrained(again)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer("A Red Cat, small").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.model_max_length == 77
    out = pipe(
        "a red cat", num_inference_steps=2, height=64, width=64,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    assert out.images.std() > 0.01  # not a constant image


def test_unknown_builtin_is_one_line():
    with pytest.raises(SynthgenError, match="unknown builtin model 'builtin:nope'"):
        builtin_model_path("builtin:nope")


def test_load_pipeline_provenance(loaded, tiny_pipeline_path):
    assert loaded.device == "cpu" and loaded.dtype == torch.float32
    assert loaded.model_revision == "sha256:" + model_fingerprint(tiny_pipeline_path)
    assert loaded.scheduler_name == "ddim" and loaded.scheduler_class == "DDIMScheduler"
    assert loaded.pipeline_class == "StableDiffusionPipeline"
    assert {"torch", "diffusers", "transformers"} <= set(loaded.versions)
    assert loaded.pipe.safety_checker is None
    json.dumps(loaded.provenance())


def test_pinned_revision_must_match(tiny_generator_config, loaded):
    fp = loaded.model_revision.removeprefix("sha256:")
    ok = tiny_generator_config.model_copy(update={"revision": fp[:12]})
    assert load_pipeline(ok).model_revision == loaded.model_revision
    bad = tiny_generator_config.model_copy(update={"revision": "0123456789abcdef"})
    with pytest.raises(SynthgenError, match="pins revision"):
        load_pipeline(bad)


def test_unknown_hub_model_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = GeneratorConfig(model="synthgen-test/this-model-does-not-exist", revision="main", device="cpu")
    start = time.perf_counter()
    with pytest.raises(SynthgenError) as info:
        load_pipeline(cfg)
    assert time.perf_counter() - start < 15
    msg = str(info.value)
    assert "\n" not in msg
    assert "synthgen-test/this-model-does-not-exist" in msg and "main" in msg
    assert "not in the local Hugging Face cache" in msg


def test_compile_is_ignored_on_cpu_with_a_warning(tiny_generator_config):
    with pytest.warns(UserWarning, match="compile is ignored on cpu"):
        got = load_pipeline(tiny_generator_config.model_copy(update={"compile": True}))
    assert got.compiled is False


def test_missing_local_folder_is_one_line(tmp_path):
    cfg = GeneratorConfig(model=str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(SynthgenError, match="model folder not found"):
        load_pipeline(cfg)


def test_every_scheduler_name_resolves_and_runs(loaded, tiny_generator_config):
    assert set(SCHEDULER_CLASSES) == set(SCHEDULERS)
    pipe = loaded.pipe
    original = pipe.scheduler
    try:
        for name in SCHEDULERS:
            sched = make_scheduler(name, original.config)
            assert type(sched).__name__ == SCHEDULER_CLASSES[name]
            pipe.scheduler = sched
            out = pipe(
                "a cat", num_inference_steps=3, guidance_scale=2.0, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np",
            )
            assert np.isfinite(out.images).all(), name
    finally:
        pipe.scheduler = original


# -------------------------------------------------------------------------------------------------
# reproducibility
# -------------------------------------------------------------------------------------------------
def test_same_prompt_and_seed_give_identical_pixels(loaded, tiny_generator_config):
    gen = make_generator(loaded, tiny_generator_config)
    a = gen.generate_one("a red cat", 42)
    b = gen.generate_one("a red cat", 42)
    c = gen.generate_one("a red cat", 43)
    assert a.mode == "RGB" and a.size == (64, 64)
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 5  # another seed is another image


def test_image_does_not_depend_on_batch_position(loaded, tiny_generator_config):
    gen = make_generator(loaded, tiny_generator_config)
    target = records([7])[0]
    alone = gen.generate([target])[0]
    assert alone.seed == image_seed(SEED, 7) and alone.retries == 0
    neighbours = records([100, 101, 102], prompt="another prompt {i}")
    for pos in range(4):
        batch = neighbours[:pos] + [target] + neighbours[pos:]
        out = gen.generate(batch)
        assert [g.index for g in out] == [r.index for r in batch]
        got = out[pos]
        assert got.seed == alone.seed
        diff = np.abs(pixels(got.image) - pixels(alone.image))
        assert diff.max() <= BATCH_POSITION_MAX_LEVELS, (pos, diff.max())
        assert diff.mean() < 0.01, (pos, diff.mean())
    # and a neighbour is a different image
    assert np.abs(pixels(out[0].image) - pixels(alone.image)).mean() > 5


def test_row_regenerates_from_prompt_and_seed(loaded, tiny_generator_config):
    gen = make_generator(loaded, tiny_generator_config.model_copy(update={"batch_size": 3}))
    recs = records(range(20, 25))  # two chunks: 3 + 2
    out = gen.generate(recs)
    assert [g.index for g in out] == list(range(20, 25))
    assert len({g.seed for g in out}) == 5
    row = out[4]  # a stored row: (prompt, seed) + the recipe's settings
    fresh = make_generator(load_pipeline(tiny_generator_config), tiny_generator_config)
    again = fresh.generate_one(row.prompt, row.seed)
    diff = np.abs(pixels(again) - pixels(row.image))
    assert diff.max() <= BATCH_POSITION_MAX_LEVELS  # it was generated at position 1 of a batch of 2


def test_stored_size_resize(loaded, tiny_generator_config):
    out32 = OutputConfig(image_size=32, resize_filter="bicubic")
    gen = make_generator(loaded, tiny_generator_config, output=out32)
    small = gen.generate(records([3]))[0].image
    assert small.size == (32, 32) and small.mode == "RGB"
    full = make_generator(loaded, tiny_generator_config).generate(records([3]))[0].image
    assert full.size == (64, 64)
    from PIL import Image

    assert np.array_equal(pixels(small), pixels(full.resize((32, 32), Image.Resampling.BICUBIC)))
    assert gen.generate_one("a photo of a 3", image_seed(SEED, 3)).size == (32, 32)


# -------------------------------------------------------------------------------------------------
# rejection and retries
# -------------------------------------------------------------------------------------------------
def test_rejection_rule():
    ok = np.full((4, 4, 3), 0.5, dtype=np.float32)
    assert rejection_reason(ok) is None
    assert rejection_reason(np.zeros((4, 4, 3), np.float32)) == "black image"
    assert rejection_reason(np.full((4, 4, 3), 1 / 255, np.float32)) == "black image"
    almost = np.zeros((4, 4, 3), np.float32)
    almost[0, 0, 0] = 1.4 / 255  # stored as level 1
    assert rejection_reason(almost) == "black image"
    almost[0, 0, 0] = 2 / 255  # one pixel at level 2: dark, not black
    assert rejection_reason(almost) is None
    nan = ok.copy()
    nan[1, 2, 0] = np.nan
    assert rejection_reason(nan) == "non-finite values"
    assert rejection_reason(ok, nsfw=True) == "flagged by safety checker"


class ContentSafetyChecker(torch.nn.Module):
    """Has the StableDiffusionSafetyChecker call signature: ``(images, clip_input) -> (images, flags)``.

    Like the real one, it blacks out what it flags. It flags every image when ``always``, else the
    images that match one of ``banned`` (float HWC arrays in [0, 1]): the content of chosen seeds.
    """

    def __init__(self, banned=(), always=False):
        super().__init__()
        self.banned = [torch.as_tensor(b) for b in banned]
        self.always = always
        self.calls = 0
        self.register_buffer("_anchor", torch.zeros(()))  # .device/.dtype, as a PreTrainedModel has

    @property
    def device(self):
        return self._anchor.device

    @property
    def dtype(self):
        return self._anchor.dtype

    def forward(self, images, clip_input):
        assert clip_input.ndim == 4  # the pipeline's feature extractor ran
        self.calls += 1
        # images: the VAE output, (N, 3, H, W) in [-1, 1]; compare in the pipeline's [0, 1] HWC space
        decoded = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
        flags = []
        for i in range(len(images)):
            hit = self.always or any((decoded[i] - b).abs().max() < 2e-3 for b in self.banned)
            if hit:
                images[i] = torch.zeros_like(images[i])
            flags.append(bool(hit))
        return images, flags


def with_checker(tiny_generator_config, checker):
    from transformers import CLIPImageProcessor

    fresh = load_pipeline(tiny_generator_config)
    fresh.pipe.feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    fresh.pipe.safety_checker = checker
    return fresh


def test_flagged_image_is_regenerated_with_next_attempt_seed(loaded, tiny_generator_config):
    cfg = tiny_generator_config
    plain = make_generator(loaded, cfg)
    target = 11
    first_seed = image_seed(SEED, target, 0)
    banned, _ = plain.run_pipeline(["a photo of a 11"], [first_seed])

    checker = ContentSafetyChecker(banned=[banned[0]])
    gen = make_generator(with_checker(cfg, checker), cfg)
    out = gen.generate(records([10, 11, 12]))
    assert checker.calls == 2  # the batch, then the one regeneration
    by_index = {g.index: g for g in out}
    g = by_index[target]
    assert g.retries == 1
    assert g.seed == image_seed(SEED, target, 1) != first_seed
    assert len(g.rejected_reasons) == 1 and "flagged by safety checker" in g.rejected_reasons[0]
    assert pixels(g.image).max() > 1  # not black
    for i in (10, 12):
        assert by_index[i].retries == 0 and by_index[i].seed == image_seed(SEED, i, 0)
    # the stored (prompt, seed) regenerates the kept image
    again = plain.generate_one(g.prompt, g.seed)
    assert np.abs(pixels(again) - pixels(g.image)).max() <= BATCH_POSITION_MAX_LEVELS
    stats = gen.counters()
    assert stats["images"] == 3 and stats["retries"] == 1 and stats["retried_images"] == 1
    assert stats["attempts"] == 4 and stats["rejected"] == {"flagged by safety checker": 1}


def test_always_rejected_image_raises_after_max_retries(tiny_generator_config):
    cfg = tiny_generator_config.model_copy(update={"max_retries": 2, "steps": 2})
    checker = ContentSafetyChecker(always=True)
    gen = make_generator(with_checker(cfg, checker), cfg)
    with pytest.raises(SynthgenError) as info:
        gen.generate(records([5]))
    msg = str(info.value)
    assert "image 5" in msg and "3 attempt" in msg and "max_retries=2" in msg and "\n" not in msg
    assert checker.calls == 3
    assert gen.counters()["failed"] == 1
