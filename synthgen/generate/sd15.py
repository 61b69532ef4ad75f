"""Stable Diffusion 1.5's architecture with random weights, built from its published configs.

For measuring speed, never quality: the UNet, VAE and CLIP text encoder have exactly the shapes of
``runwayml/stable-diffusion-v1-5`` (the configs below are copied from that repository's
``unet/``, ``vae/``, ``text_encoder/`` and ``scheduler/`` ``config.json``; 859.5M + 83.7M + 123.1M
parameters), so every kernel runs at the real model's size, but nothing is downloaded. The
tokenizer is synthgen's offline byte-level CLIP tokenizer (``tiny.write_tokenizer``): CLIP's BPE
vocabulary cannot be downloaded here, and the text encoder's cost does not depend on which of its
49,408 token ids a prompt uses (every prompt is padded to 77 tokens).

Weights are drawn from a fixed seed on the device they are built on (fast on a GPU); the same seed
and device give the same weights, so pipelines made from :func:`sd15_components` in different
dtypes start from the same float32 values.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

#: runwayml/stable-diffusion-v1-5 unet/config.json (without the _class_name/_diffusers_version keys)
UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

#: runwayml/stable-diffusion-v1-5 vae/config.json
VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: runwayml/stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14's text tower)
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

#: runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM, i.e. PLMS)
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: parameter counts of the published checkpoint (checked by the tests)
PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}

#: the pipeline's name in results and provenance
MODEL_NAME = "sd15-random"


def sd15_components(device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """UNet, VAE, text encoder (float32, random weights from ``seed``, on ``device``), tokenizer, scheduler."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from synthgen.generate.tiny import write_tokenizer

    models: dict[str, Any] = {}
    # Initialisers draw from the default generator of the device the modules are built on.
    with torch.device(device):
        torch.manual_seed(seed)
        models["unet"] = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed + 1)
        models["vae"] = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    for module in models.values():
        module.eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        models["tokenizer"] = CLIPTokenizer.from_pretrained(tmp)
    models["scheduler"] = PNDMScheduler.from_config(SCHEDULER_CONFIG)  # ignores DDIM-only keys
    return models


def sd15_pipeline(components: dict[str, Any], dtype=None):
    """A ``StableDiffusionPipeline`` of ``components`` (cast to ``dtype`` in place when given).

    Casting changes the given modules; pass copies to keep float32 originals.
    """
    from diffusers import StableDiffusionPipeline

    if dtype is not None:
        for name in ("unet", "vae", "text_encoder"):
            if components[name].dtype != dtype:
                components[name].to(dtype)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_flops(components: dict[str, Any], height: int = 512, width: int = 512) -> dict[str, float]:
    """FLOPs of one UNet forward, one VAE decode and one text encoding, for one image.

    Counted by ``torch.utils.flop_counter`` (matmuls, convolutions, attention) on the given
    modules; pass modules on the ``meta`` device (``sd15_components("meta")``) to count without
    computing. For SD 1.5 at 512 px: UNet 0.80 TFLOP, VAE decode 2.51, text encoder 0.013.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae, text = components["unet"], components["vae"], components["text_encoder"]
    device = unet.device
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = torch.zeros(1, unet.config.in_channels, height // scale, width // scale, device=device)
    context = torch.zeros(1, 77, unet.config.cross_attention_dim, device=device)
    ids = torch.zeros(1, 77, dtype=torch.long, device=text.device)
    calls = {
        "unet": lambda: unet(latent, torch.tensor([500], device=device), encoder_hidden_states=context),
        "vae_decode": lambda: vae.decode(latent),
        "text_encoder": lambda: text(ids),
    }
    flops = {}
    with torch.no_grad():
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            flops[name] = float(counter.get_total_flops())
    return flops


def image_flops(flops: dict[str, float], steps: int, guided: bool = True) -> float:
    """FLOPs per generated image: ``steps`` UNet calls (two halves with guidance), one decode."""
    halves = 2 if guided else 1
    return steps * halves * flops["unet"] + flops["vae_decode"] + halves * flops["text_encoder"]
