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


# tiny kernels gain nothing from threads; on shared cores OpenMP spin-waiting slows them
pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    images within one uint8 level of one of ``banned`` (float HWC arrays in [0, 1]): the content of
    chosen seeds.
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
            hit = self.always or any((decoded[i] - b).abs().max() <= 1 / 255 for b in self.banned)
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
    banned, _ = plain.run_pipeline(["a photo of a 11"], [first_seed])  # uint8 pixels

    checker = ContentSafetyChecker(banned=[banned[0] / 255.0])
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


# -------------------------------------------------------------------------------------------------
# the GPU path's settings, checked on CPU (benchmarks/bench_sd.py measures them on a GPU)
# -------------------------------------------------------------------------------------------------
SPEED_PROMPTS = ["a photo of a cat", "a red dog", "a photo of a cat", "a bird"]  # one repeated


def speed_seeds():
    return [image_seed(SEED, i) for i in range(len(SPEED_PROMPTS))]


def engine_pixels(cfg, **update):
    """uint8 pixels of SPEED_PROMPTS through load_pipeline + ImageGenerator with ``update`` applied."""
    cfg = cfg.model_copy(update=update)
    gen = make_generator(load_pipeline(cfg), cfg)
    arrays, reasons = gen.run_pipeline(SPEED_PROMPTS, speed_seeds())
    assert reasons == [None] * len(SPEED_PROMPTS)
    return arrays.astype(np.int16), gen


def plain_pixels(pipe, cfg, negative_prompt=None):
    """What a user's own diffusers call gives for the same prompts and seeds."""
    out = pipe(
        prompt=SPEED_PROMPTS, negative_prompt=None if negative_prompt is None else [negative_prompt] * 4,
        num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
        generator=[torch.Generator().manual_seed(s) for s in speed_seeds()], output_type="np",
    )
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.int16)


def assert_within_rounding(a, b):
    """The batch-position bound of this file's docstring: a kernel choice, not another image."""
    diff = np.abs(a - b)
    assert diff.max() <= BATCH_POSITION_MAX_LEVELS, diff.max()
    assert diff.mean() < 0.01, diff.mean()


def test_engine_path_gives_the_plain_diffusers_pixels(loaded, tiny_generator_config):
    """Cached prompt embeddings, latents decoded by synthgen, uint8 on the device: same pixels."""
    cfg = tiny_generator_config
    got, gen = engine_pixels(cfg)
    assert gen.latent_path
    assert np.array_equal(got, plain_pixels(loaded.pipe, cfg))
    # a negative prompt goes through the embedding cache too
    neg, _ = engine_pixels(cfg, negative_prompt="blurry")
    assert np.array_equal(neg, plain_pixels(loaded.pipe, cfg, negative_prompt="blurry"))
    assert np.abs(neg - got).mean() > 0.1  # and it is used (the tiny model barely reads text)


def test_prompt_embeddings_are_computed_once_per_distinct_prompt(tiny_generator_config):
    cfg = tiny_generator_config
    cached, gen = engine_pixels(cfg)
    assert gen.embeddings.encoded == 4  # three distinct prompts and the empty negative prompt
    gen.run_pipeline(SPEED_PROMPTS[:2], speed_seeds()[:2])
    assert gen.embeddings.encoded == 4  # all kept
    uncached, plain = engine_pixels(cfg, prompt_cache=0)
    assert plain.embeddings.encoded == 8 and not plain.embeddings.kept
    assert np.array_equal(cached, uncached)
    # least recently used prompts leave first; a batch's own prompts always stay
    small, few = engine_pixels(cfg, prompt_cache=2)
    assert np.array_equal(small, cached)
    assert list(few.embeddings.kept) == ["a bird", ""]  # the negative prompt was encoded last
    encoded = few.embeddings.encoded
    few.embeddings(["a red dog"])
    assert few.embeddings.encoded == encoded + 1 and list(few.embeddings.kept) == ["", "a red dog"]


def test_chunked_vae_decode_is_within_rounding(tiny_generator_config):
    whole, gen = engine_pixels(tiny_generator_config)
    one, _ = engine_pixels(tiny_generator_config, vae_decode_chunk=1)
    assert_within_rounding(one, whole)
    latents = torch.zeros(5, 4, 16, 16)
    assert gen.decoder.chunk_size(latents) == 5  # auto on a CPU: the whole batch
    gen.decoder.chunk = 2
    assert gen.decoder.chunk_size(latents) == 2
    parts = []
    real_vae = gen.decoder._vae
    gen.decoder._vae = lambda z, eager=False: parts.append(len(z)) or real_vae(z, eager=eager)
    images, flags = gen.decoder(torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert parts == [2, 2, 1] and images.shape == (5, 3, 64, 64) and images.dtype == torch.float32
    assert flags is None and 0 <= images.min() and images.max() <= 1


def test_channels_last_and_fused_qkv_are_within_rounding(tiny_generator_config):
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    base, gen = engine_pixels(tiny_generator_config)
    assert not gen.loaded.channels_last and not gen.loaded.fused_qkv  # auto: off on a CPU
    for update in ({"channels_last": True}, {"fuse_qkv": True}, {"channels_last": True, "fuse_qkv": True}):
        got, gen = engine_pixels(tiny_generator_config, **update)
        assert_within_rounding(got, base)
        info = gen.loaded.provenance()
        assert info["channels_last"] == update.get("channels_last", False)
        assert info["fused_qkv"] == update.get("fuse_qkv", False)
    unet = gen.loaded.pipe.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert {type(p) for p in unet.attn_processors.values()} == {FusedAttnProcessor2_0}


def test_auto_settings_mean_cuda_only(loaded):
    from synthgen.generate.accel import enabled

    assert enabled("auto", "cuda") and enabled("auto", "cuda:1") and not enabled("auto", "cpu")
    assert enabled(True, "cpu") and not enabled(False, "cuda")
    info = loaded.provenance()
    assert info["attention"] == "sdpa" and info["compiled"] is False and info["compiled_modules"] == []
    assert info["fused_qkv"] is False and info["channels_last"] is False and info["step_cache_interval"] == 1
    assert info["vae_decode_chunk"] == "auto" and info["prompt_cache"] == 1024


def test_classifier_free_guidance_is_one_batched_unet_call(loaded, tiny_generator_config):
    batches = []
    handle = loaded.pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    try:
        make_generator(loaded, tiny_generator_config).run_pipeline(SPEED_PROMPTS[:3], speed_seeds()[:3])
    finally:
        handle.remove()
    assert batches == [6] * tiny_generator_config.steps  # conditional + unconditional halves together


def test_step_cache_runs_deep_blocks_every_nth_step_only(tiny_generator_config):
    from synthgen.generate.stepcache import deep_blocks

    cfg = tiny_generator_config.model_copy(update={"steps": 5})
    base, _ = engine_pixels(cfg)
    cached, gen = engine_pixels(cfg, step_cache_interval=2)
    assert gen.loaded.provenance()["step_cache_interval"] == 2
    unet = gen.loaded.pipe.unet
    # count block bodies run: a layer inside a block runs only when the block's body does
    inner = {"shallow": unet.down_blocks[0].resnets[0], **{f"deep{i}": b.resnets[0] for i, b in enumerate(deep_blocks(unet))}}
    calls = dict.fromkeys(inner, 0)
    hooks = [m.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1)) for k, m in inner.items()]
    try:
        again, _ = gen.run_pipeline(SPEED_PROMPTS, speed_seeds())
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"shallow": 5, **{k: 3 for k in inner if k != "shallow"}}  # steps 0, 2, 4 in full
    assert np.array_equal(again.astype(np.int16), cached)  # the cache is reset between calls
    diff = np.abs(cached - base)
    assert diff.mean() > 0.01  # an approximation: it changes pixels ...
    assert np.isfinite(diff).all() and diff.max() < 128  # ... but not into another image


def test_speed_settings_are_in_the_settings_hash():
    from synthgen.recipe import recipe_from_dict

    data = {"name": "x", "count": 1, "prompts": {"kind": "wordnet", "classes": "cifar10"},
            "generator": {"model": "builtin:tiny-sd"}}
    base = recipe_from_dict(data)
    assert {"compile", "attention", "channels_last", "fuse_qkv", "step_cache_interval"} <= set(
        base.generation_settings()
    )
    for key, value in [("compile", True), ("attention", "xformers"), ("channels_last", False),
                       ("fuse_qkv", False), ("step_cache_interval", 3), ("dtype", "float16")]:
        changed = recipe_from_dict({**data, "generator": {**data["generator"], key: value}})
        assert changed.settings_hash() != base.settings_hash(), key


def test_speed_settings_validate_with_one_line():
    from synthgen.errors import RecipeError
    from synthgen.recipe import recipe_from_dict

    data = {"name": "x", "count": 1, "prompts": {"kind": "wordnet", "classes": "cifar10"}}
    for gen, key in [({"attention": "flash"}, "generator.attention"), ({"vae_decode_chunk": 0}, "generator.vae_decode_chunk"),
                     ({"step_cache_interval": 0}, "generator.step_cache_interval"), ({"compile": "sometimes"}, "generator.compile")]:
        with pytest.raises(RecipeError, match=key):
            recipe_from_dict({**data, "generator": {"model": "m", **gen}})
    ok = recipe_from_dict({**data, "generator": {"model": "m", "compile": "auto", "vae_decode_chunk": 8, "fuse_qkv": True}})
    assert ok.generator.vae_decode_chunk == 8 and ok.generator.fuse_qkv is True


def test_xformers_unusable_is_one_line(tiny_generator_config):
    with pytest.raises(SynthgenError) as info:
        load_pipeline(tiny_generator_config.model_copy(update={"attention": "xformers"}))
    msg = str(info.value)
    assert "\n" not in msg and "attention: xformers" in msg and "use attention: sdpa" in msg


def test_fused_qkv_needs_plain_sdpa(tiny_generator_config):
    sliced = tiny_generator_config.model_copy(update={"attention_slicing": True})
    assert load_pipeline(sliced).fused_qkv is False  # auto: not with slicing
    with pytest.raises(SynthgenError, match="fuse_qkv needs attention: sdpa"):
        load_pipeline(sliced.model_copy(update={"fuse_qkv": True}))


def test_rejection_statistics_on_the_device_follow_the_rule():
    from synthgen.generate.decode import rejection_stats, to_uint8
    from synthgen.generate.generator import _reason

    images = torch.full((4, 3, 4, 4), 0.5)
    images[1] = 0
    images[2] = 0
    images[2, 0, 0, 0] = 2 / 255  # dark, not black
    images[3, 1, 2, 0] = float("nan")
    finite, largest = rejection_stats(images)
    reasons = [_reason(f, m, False) for f, m in zip(finite, largest)]
    hwc = images.permute(0, 2, 3, 1).numpy()
    assert reasons == [rejection_reason(a) for a in hwc] == [None, "black image", None, "non-finite values"]
    pixels = to_uint8(images[:3])
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 4, 4, 3)
    assert pixels[0].max() == 128 and pixels[2, 0, 0, 0] == 2  # round(0.5 * 255) = 128 (half to even: 127.5)


def test_an_infinite_pixel_from_the_vae_is_rejected_not_clamped(loaded):
    """An overflow to inf in the VAE's last layer (no NaN): the decoded image counts as non-finite."""
    from synthgen.generate.decode import LatentDecoder, rejection_stats

    def overflow(module, inputs, output):
        output = output.clone()
        output[0, 0, 0, 0] = float("inf")
        return output

    handle = loaded.pipe.vae.decoder.conv_out.register_forward_hook(overflow)
    try:
        images, _ = LatentDecoder(loaded.pipe, "cpu")(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    finally:
        handle.remove()
    finite, _ = rejection_stats(images)
    assert finite == [False, True]


def test_sd15_architecture_matches_the_published_checkpoint():
    from synthgen.generate.sd15 import PARAMETERS, image_flops, model_flops, sd15_components

    parts = sd15_components("meta")
    for name, count in PARAMETERS.items():
        assert sum(p.numel() for p in parts[name].parameters()) == count, name
    flops = model_flops(parts, 512, 512)
    assert 0.79e12 < flops["unet"] < 0.81e12 and 2.45e12 < flops["vae_decode"] < 2.55e12
    assert 0.010e12 < flops["text_encoder"] < 0.015e12
    assert 82e12 < image_flops(flops, 50) < 84e12 and 42e12 < image_flops(flops, 25) < 44e12


def test_compile_serves_a_range_of_batch_sizes_with_one_graph(loaded):
    """The UNet and VAE decoder are compiled with a dynamic batch dimension: one graph for a range of batches."""
    import copy

    from torch._dynamo.testing import CompileCounter

    from synthgen.generate.accel import compile_with_dynamic_batch

    torch._dynamo.reset()
    unet, decoder = copy.deepcopy(loaded.pipe.unet), copy.deepcopy(loaded.pipe.vae.decoder)
    inputs = {b: (torch.randn(b, 4, 16, 16), torch.randn(b, 77, 32)) for b in (2, 3, 5)}
    eager = {b: (unet(x, 10, encoder_hidden_states=c).sample, decoder(x)) for b, (x, c) in inputs.items()}
    counters = CompileCounter(), CompileCounter()
    compile_with_dynamic_batch(unet, backend=counters[0])  # the eager backend of dynamo's tests: counts graphs
    compile_with_dynamic_batch(decoder, backend=counters[1])
    for b, (x, c) in inputs.items():
        assert torch.equal(unet(x, 10, encoder_hidden_states=c).sample, eager[b][0])
        assert torch.equal(decoder(x), eager[b][1])
    assert [c.frame_count for c in counters] == [1, 1]
    # diffusers' upsampler branches at 64 rows (32 images with guidance): a second UNet graph, shared above
    for b in (64, 70):
        unet(torch.randn(b, 4, 16, 16), 10, encoder_hidden_states=torch.randn(b, 77, 32))
    assert counters[0].frame_count == 2
    torch._dynamo.reset()
