"""The class encoder and the class-conditioned pipeline on the real tiny Stable Diffusion (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from synthgen.errors import SynthgenError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_path):
    from synthgen.classcond import ClassConditionedPipeline, ClassEncoder
    from synthgen.classcond.base import load_base_components

    torch.manual_seed(0)
    encoder = ClassEncoder.for_unet(load_base_components(tiny_pipeline_path).unet, len(NAMES))
    with torch.no_grad():  # a non-zero bias, so the unconditional tokens are not all zero
        encoder.hidden[0].bias.normal_()
    p = ClassConditionedPipeline.from_base(tiny_pipeline_path, encoder, NAMES, resolution=32, training={"note": "test"})
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, class_ids, seeds, **kw):
    args = dict(num_inference_steps=3, guidance_scale=2.0, output_type="np")
    args.update(kw)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(class_ids, generator=gens, **args).images


def test_encoder_is_their_architecture():
    from synthgen.classcond import ClassEncoder

    enc = ClassEncoder(num_classes=10)  # defaults: Dense(500) -> Dense(100 x 768, no bias)
    linears = [m for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linears] == [(10, 500, True), (500, 76_800, False)]
    assert sum(p.numel() for p in enc.parameters()) == 10 * 500 + 500 + 500 * 76_800
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 7]), 10).float()
    tokens = enc(one_hot)
    assert tokens.shape == (2, 100, 768)
    assert torch.equal(tokens, enc.embed_classes(torch.tensor([2, 7])))
    # No activation: the tokens are linear in the input, and the unconditional tokens are the
    # encoder of a zero vector (zero at initialisation: Keras' Dense starts with zero biases).
    assert torch.allclose(enc(2 * one_hot) - enc.unconditional(2), 2 * (tokens - enc.unconditional(2)), atol=1e-5)
    assert torch.count_nonzero(enc.unconditional(3)) == 0 and enc.unconditional(3).shape == (3, 100, 768)
    with torch.no_grad():
        enc.hidden[0].bias.fill_(0.5)
    expected = enc.to_tokens(torch.full((500,), 0.5)).view(1, 100, 768)
    assert torch.allclose(enc.unconditional(1), expected)

    small = ClassEncoder(num_classes=3, cross_attention_dim=16, num_tokens=4, hidden_dims=(8, 6))
    assert small(torch.eye(3)).shape == (3, 4, 16)
    with pytest.raises(SynthgenError, match="sizes must be positive"):
        ClassEncoder(num_classes=0)


def test_encoder_is_sized_from_the_unet_cross_attention(tiny_pipeline_path):
    from diffusers import UNet2DConditionModel

    from synthgen.classcond import ClassEncoder, cross_attention_width

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48,
    )
    assert cross_attention_width(unet) == 48
    enc = ClassEncoder.for_unet(unet, 5, num_tokens=7)
    assert enc(torch.eye(5)).shape == (5, 7, 48)
    out = unet(torch.randn(5, 4, 8, 8), 10, encoder_hidden_states=enc(torch.eye(5))).sample
    assert out.shape == (5, 4, 8, 8)


def test_save_reload_regenerates_identical_pixels(pipe, tmp_path):
    import synthgen

    before = generate(pipe, [0, 3, 9], [101, 102, 103])
    assert before.shape == (3, 32, 32, 3)  # the training resolution is the default size
    pipe.save_pretrained(tmp_path / "saved")
    files = {p.relative_to(tmp_path / "saved").as_posix() for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    assert "class_encoder/diffusion_pytorch_model.safetensors" in files and "unet/diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".py", ".pt", ".pkl")) for f in files)
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionedPipeline" and index["class_names"] == NAMES
    assert index["class_encoder"] == ["synthgen.classcond.encoder", "ClassEncoder"]

    reloaded = synthgen.ClassConditionedPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.class_names == NAMES and reloaded.config.resolution == 32 and reloaded.config.training == {"note": "test"}
    after = generate(reloaded, [0, 3, 9], [101, 102, 103])
    assert np.array_equal(before, after)
    assert not np.array_equal(before, generate(reloaded, [0, 3, 9], [101, 102, 104]))  # the seed matters


def test_each_image_depends_on_its_own_generator_only(pipe):
    batch = generate(pipe, [1, 4, 6, 8], [7, 8, 9, 10], output_type="pil")
    alone = generate(pipe, [6], [9], output_type="pil")[0]
    # Batched CPU kernels may round differently for another batch size (see test_generate.py): a
    # bound of 2 levels; a mixed-up generator or class changes pixels by tens of levels.
    diff = np.abs(np.asarray(batch[2], np.int16) - np.asarray(alone, np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.01


def test_guidance_follows_their_formula(pipe):
    # uncond + g * (cond - uncond) at every g: at g = 0 the class plays no part; below 1 it still
    # does (diffusers' text pipelines switch guidance off there), and more so as g grows.
    gaps = []
    for g in (0.0, 0.5, 1.0, 2.0):
        a, b = generate(pipe, [3, 7], [5, 5], guidance_scale=g, output_type="latent")
        gaps.append(float((a - b).abs().max()))
    assert gaps[0] == 0.0 and 0 < gaps[1] < gaps[2] < gaps[3], gaps

    batch_sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    try:
        generate(pipe, [3, 7], [5, 6], guidance_scale=1.0, num_inference_steps=2)
        generate(pipe, [3, 7], [5, 6], guidance_scale=0.5, num_inference_steps=2)
    finally:
        hook.remove()
    assert batch_sizes == [2, 2, 4, 4]  # guidance 1 runs the conditional pass only


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    out = pipe([2, 4], num_inference_steps=3, generator=[torch.Generator().manual_seed(1)] * 2, output_type="latent",
               callback_on_step_end=callback)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (2, 4, 8, 8)
    assert torch.count_nonzero(out.images) == 0


@pytest.mark.parametrize(
    "class_ids, match",
    [
        (10, "class id 10 is outside the label set"),
        ([0, -1], "class id -1 is outside the label set"),
        ([], "one or more integer class ids"),
        ([1.5], "one or more integer class ids"),
        ([[1, 2]], "one or more integer class ids"),
    ],
)
def test_bad_class_ids_are_one_line_errors(pipe, class_ids, match):
    with pytest.raises(SynthgenError, match=match) as err:
        pipe(class_ids, num_inference_steps=1)
    assert "\n" not in str(err.value)


def test_other_bad_inputs(pipe, tiny_pipeline_path):
    from synthgen.classcond import ClassConditionedPipeline, ClassEncoder

    with pytest.raises(SynthgenError, match="2 generators for 3 images"):
        pipe([1, 2, 3], generator=[torch.Generator()] * 2, num_inference_steps=1)
    with pytest.raises(SynthgenError, match="multiples of 8"):
        pipe([1], height=36, num_inference_steps=1)
    with pytest.raises(SynthgenError, match="guidance_scale must be >= 0"):
        pipe([1], guidance_scale=-1.0, num_inference_steps=1)
    with pytest.raises(SynthgenError, match="width 768, but the UNet cross-attends to width 32"):
        ClassConditionedPipeline(pipe.vae, pipe.unet, pipe.scheduler, ClassEncoder(num_classes=10))
    with pytest.raises(SynthgenError, match="3 class names for a class encoder of 10 classes"):
        ClassConditionedPipeline(pipe.vae, pipe.unet, pipe.scheduler, pipe.class_encoder, ["a", "b", "c"])


def test_exported_from_the_top_level_package_lazily():
    import synthgen
    from synthgen.classcond import ClassConditionedPipeline, ClassEncoder

    assert synthgen.ClassConditionedPipeline is ClassConditionedPipeline and synthgen.ClassEncoder is ClassEncoder
    code = "import sys, synthgen; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
