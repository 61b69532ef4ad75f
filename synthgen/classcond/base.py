"""Load the parts of a base Stable Diffusion checkpoint that class conditioning keeps.

The base is a diffusers pipeline folder (SD 1.x/2.x layout: ``unet/``, ``vae/``, ``scheduler/``), a
Hub id, or ``builtin:tiny-sd``; :func:`synthgen.generate.pipeline.resolve_model` finds it and gives
its revision (Hub commit, or a content fingerprint for local and builtin models). The text encoder
and tokenizer are never loaded: the class encoder replaces them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from synthgen.errors import SynthgenError

__all__ = ["BaseComponents", "load_base_components", "load_vae", "resolve_base"]


@dataclass
class BaseComponents:
    folder: Path
    revision: str  # Hub commit hash, or "sha256:<fingerprint>"
    unet: Any  # UNet2DConditionModel
    scheduler: Any  # the pipeline's inference scheduler
    noise_scheduler: Any  # DDPMScheduler with the same betas, for the training loss
    vae: Any = None  # AutoencoderKL, when asked for


def resolve_base(base: str | os.PathLike, revision: Optional[str] = None) -> tuple[Path, str]:
    """(pipeline folder, resolved revision) of ``base``."""
    from synthgen.generate.pipeline import resolve_model
    from synthgen.recipe import GeneratorConfig

    return resolve_model(GeneratorConfig(model=str(base), revision=revision))


_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _component_class(folder: Path, index: dict, name: str):
    import diffusers

    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
        raise SynthgenError(f"{folder} has no {name!r} component; a Stable Diffusion pipeline folder is needed")
    library, class_name = entry
    cls = getattr(diffusers, class_name, None) if library == "diffusers" else None
    if cls is None:
        raise SynthgenError(f"{folder}: component {name!r} is {library}.{class_name}, not a diffusers class")
    return cls


def load_base_components(
    base: str | os.PathLike, *, revision: Optional[str] = None, vae: bool = False
) -> BaseComponents:
    """UNet, schedulers (and the VAE when ``vae``) of ``base``; SynthgenError when it cannot be
    class-conditioned (no UNet, no cross-attention)."""
    from diffusers import DDPMScheduler

    from synthgen.classcond.encoder import cross_attention_width
    from synthgen.generate.pipeline import quiet_loading

    folder, resolved = resolve_base(base, revision)
    index = json.loads((folder / "model_index.json").read_text())
    try:
        with quiet_loading():
            unet = _component_class(folder, index, "unet").from_pretrained(folder, subfolder="unet")
            cross_attention_width(unet)  # fail before loading the rest
            scheduler = _component_class(folder, index, "scheduler").from_pretrained(folder, subfolder="scheduler")
    except _LOAD_ERRORS as exc:
        raise SynthgenError(f"cannot load base model {base!s} from {folder}: {_first_line(exc)}") from None
    unet.requires_grad_(False)
    autoencoder = load_vae(folder) if vae else None
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    return BaseComponents(folder, resolved, unet, scheduler, noise_scheduler, autoencoder)


def load_vae(folder: Path):
    """The frozen VAE of the pipeline folder ``folder`` (a resolved base model)."""
    from synthgen.generate.pipeline import quiet_loading

    index = json.loads((Path(folder) / "model_index.json").read_text())
    try:
        with quiet_loading():
            vae = _component_class(folder, index, "vae").from_pretrained(folder, subfolder="vae")
    except _LOAD_ERRORS as exc:
        raise SynthgenError(f"cannot load the VAE of {folder}: {_first_line(exc)}") from None
    return vae.requires_grad_(False).eval()
