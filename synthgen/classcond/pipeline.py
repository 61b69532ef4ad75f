"""A class-conditioned Stable Diffusion pipeline: class ids in, images out.

The text encoder and tokenizer of a Stable Diffusion pipeline are replaced by a
:class:`~synthgen.classcond.encoder.ClassEncoder`, whose tokens are fed to the UNet exactly where
``prompt_embeds`` would go. Classifier-free guidance uses the encoder applied to a zero vector as the
unconditional embedding, as in Lomurno et al.'s code, and their formula
``uncond + g * (cond - uncond)`` at every guidance ``g``: guidance below 1 is meaningful here (their
tuning searches ``g`` in [0, 7.5]; ``g = 0`` is the unconditional model), unlike diffusers' text
pipelines, which switch guidance off at ``g <= 1``. At ``g = 1`` only the conditional pass runs.

The pipeline saves and loads like any diffusers pipeline (safetensors weights, ``model_index.json``)
and is loaded by its class, ``synthgen.ClassConditionedPipeline.from_pretrained(folder)``; no remote
code is involved. Its config keeps the class names, the training resolution (the default image size)
and where its weights came from (``training``: run, encoder and UNet epochs, base model revision).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Optional, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from synthgen.classcond.encoder import ClassEncoder, cross_attention_width
from synthgen.errors import SynthgenError

__all__ = ["ClassConditionedPipeline"]


class ClassConditionedPipeline(DiffusionPipeline):
    """Stable Diffusion conditioned on class ids through a trained :class:`ClassEncoder`.

    Components: ``vae``, ``unet``, ``scheduler`` (from the base Stable Diffusion checkpoint) and
    ``class_encoder``. ``class_names[i]`` names class id ``i``.
    """

    model_cpu_offload_seq = "class_encoder->unet->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        class_encoder: ClassEncoder,
        class_names: Optional[list[str]] = None,
        resolution: Optional[int] = None,
        training: Optional[dict] = None,
    ):
        super().__init__()
        width = cross_attention_width(unet)
        if class_encoder.config.cross_attention_dim != width:
            raise SynthgenError(
                f"the class encoder makes tokens of width {class_encoder.config.cross_attention_dim}, but the UNet "
                f"cross-attends to width {width}"
            )
        n = class_encoder.config.num_classes
        class_names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(n)]
        if len(class_names) != n:
            raise SynthgenError(f"{len(class_names)} class names for a class encoder of {n} classes")
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, class_encoder=class_encoder)
        self.register_to_config(class_names=class_names, resolution=resolution, training=training)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike,
        class_encoder: ClassEncoder,
        class_names: Optional[Sequence[str]] = None,
        *,
        resolution: Optional[int] = None,
        training: Optional[dict] = None,
    ) -> "ClassConditionedPipeline":
        """Put ``class_encoder`` on the VAE, UNet and scheduler of a Stable Diffusion pipeline folder."""
        from synthgen.classcond.base import load_base_components

        parts = load_base_components(base, vae=True)
        return cls(
            vae=parts.vae,
            unet=parts.unet,
            scheduler=parts.scheduler,
            class_encoder=class_encoder,
            class_names=list(class_names) if class_names is not None else None,
            resolution=resolution,
            training=training,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved folder, or a Hub repo (``revision=`` a tag, branch or commit)."""
        path = pretrained_model_name_or_path
        if not os.path.isdir(path):  # diffusers' own download refuses it: see download_class_conditioned
            from synthgen.generate.classcond import download_class_conditioned

            path = download_class_conditioned(str(path), kwargs.pop("revision", None),
                                              local_files_only=bool(kwargs.get("local_files_only")),
                                              token=kwargs.get("token"), cache_dir=kwargs.get("cache_dir"))
            if path is None:
                raise SynthgenError(f"{pretrained_model_name_or_path} holds another kind of pipeline, "
                                    f"not a {cls.__name__}")
        return super().from_pretrained(path, **kwargs)

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def num_classes(self) -> int:
        return int(self.class_encoder.config.num_classes)

    def class_ids_tensor(self, class_ids: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``class_ids`` as a 1-D long tensor; SynthgenError for ids outside the label set."""
        ids = torch.as_tensor([class_ids] if isinstance(class_ids, int) else class_ids)
        if ids.ndim != 1 or ids.numel() == 0 or ids.is_floating_point():
            raise SynthgenError(f"class_ids must be one or more integer class ids, got {class_ids!r}")
        bad = ids[(ids < 0) | (ids >= self.num_classes)]
        if bad.numel():
            raise SynthgenError(
                f"class id {int(bad[0])} is outside the label set (0..{self.num_classes - 1}: "
                f"{', '.join(self.class_names[:5])}{', ...' if self.num_classes > 5 else ''})"
            )
        return ids.long()

    def encode_classes(self, class_ids: torch.Tensor, guidance_scale: float, device, dtype) -> torch.Tensor:
        """UNet conditioning for ``class_ids``: ``[uncond; cond]`` when guidance needs both passes."""
        cond = self.class_encoder.embed_classes(class_ids.to(device))
        if guidance_scale != 1.0:
            cond = torch.cat([self.class_encoder.unconditional(len(class_ids)), cond])
        return cond.to(device=device, dtype=dtype)

    def _step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        class_ids: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        eta: float = 0.0,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[[Any, int, Any, dict], dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        """Generate one image per entry of ``class_ids``.

        ``generator``: one ``torch.Generator`` per image (an image's pixels then depend on its own
        generator only, not on the batch it is in) or one for the batch. ``height``/``width``
        default to the training resolution. ``callback_on_step_end(pipe, i, t, tensors)`` runs
        after each denoising step with the tensors named in ``callback_on_step_end_tensor_inputs``
        and may return replacements. Returns :class:`ImagePipelineOutput` (or a tuple).
        """
        ids = self.class_ids_tensor(class_ids)
        batch = len(ids)
        default = self.config.resolution or self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default, width or default
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple:
            raise SynthgenError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        if num_inference_steps < 1:
            raise SynthgenError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise SynthgenError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if isinstance(generator, list) and len(generator) != batch:
            raise SynthgenError(f"{len(generator)} generators for {batch} images; give one per image")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise SynthgenError(f"callback tensors {sorted(unknown)} unknown; available: {self._callback_tensor_inputs}")

        device = self._execution_device
        dtype = self.unet.dtype
        guided = guidance_scale != 1.0
        embeddings = self.encode_classes(ids, guidance_scale, device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
            if guided:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                available = {"latents": latents}
                tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                latents = callback_on_step_end(self, i, t, tensors).pop("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            scaled = latents / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None):
                scaled = scaled + self.vae.config.shift_factor
            decoded = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
