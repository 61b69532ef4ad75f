"""Training images as VAE posteriors, encoded once and cached in the run folder.

Both stages train the UNet's noise prediction on latents of the real images; the VAE is frozen, so
its output for an image never changes. Each image is resized (bilinear, as ``tf.image.resize`` in
Lomurno et al.'s code; antialiased when shrinking), scaled to [-1, 1] and encoded once; the cache
keeps the posterior's mean and log-variance (diffusers' ``latent_dist.parameters``), and every
training step draws a fresh latent ``mean + std * eps`` from it, as their training step did from the
encoder's output. The file is safetensors, its metadata the key it was made for (base model
revision, dataset, resolution); a file made for another key is encoded again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["LatentSet", "encode_images", "load_or_encode_latents", "read_latents"]

_FORMAT = 1


@dataclass
class LatentSet:
    """``moments`` ``[N, 2C, h, w]`` (mean and log-variance), ``labels`` ``[N]``, the VAE's scaling."""

    moments: torch.Tensor
    labels: torch.Tensor
    scaling_factor: float
    shift_factor: Optional[float] = None

    def __len__(self) -> int:
        return int(self.moments.shape[0])

    def to(self, device) -> "LatentSet":
        return LatentSet(self.moments.to(device), self.labels.to(device), self.scaling_factor, self.shift_factor)

    def sample(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of rows ``index``, drawn from their posteriors with ``generator``."""
        mean, logvar = self.moments[index].float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        if self.shift_factor:
            z = z - self.shift_factor
        return z * self.scaling_factor


def resize_images(images_uint8: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float ``[B, 3, resolution, resolution]`` in [-1, 1]."""
    x = images_uint8.float().div(127.5).sub(1.0)
    if tuple(x.shape[-2:]) != (resolution, resolution):
        shrinking = min(x.shape[-2:]) > resolution
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrinking)
    return x


@torch.no_grad()
def encode_images(vae, images_uint8: torch.Tensor, resolution: int, batch_size: int, device) -> torch.Tensor:
    """The VAE posteriors' parameters ``[N, 2C, h, w]`` (float32, on the CPU) of ``images_uint8``."""
    vae = vae.to(device)
    out = []
    for start in range(0, len(images_uint8), batch_size):
        x = resize_images(images_uint8[start : start + batch_size].to(device), resolution).to(vae.dtype)
        out.append(vae.encode(x).latent_dist.parameters.float().cpu())
    # Contiguous, as the cached file reads back: a CPU convolution may come out channels-last, and a
    # different memory layout takes different kernels downstream (rounding differs in the last bit).
    return torch.cat(out).contiguous()


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def read_latents(path: str | os.PathLike, key: Optional[dict[str, Any]] = None) -> Optional[LatentSet]:
    """The latents cached at ``path`` (None if missing or unreadable, or made for another ``key``)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if key is not None and meta.get("key") != _key_text({"format": _FORMAT, **key}):
                return None
            return LatentSet(
                moments=f.get_tensor("moments"),
                labels=f.get_tensor("labels"),
                scaling_factor=float(meta["scaling_factor"]),
                shift_factor=json.loads(meta.get("shift_factor", "null")),
            )
    except Exception:  # missing, truncated or from another format: encode again
        return None


def load_or_encode_latents(
    path: Path,
    key: dict[str, Any],
    *,
    source: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    vae_loader: Callable[[], Any],
    resolution: int,
    batch_size: int,
    device,
) -> LatentSet:
    """The cached latents at ``path`` if made for ``key``; else encode the images ``source()`` gives
    (uint8 images, labels) with the VAE ``vae_loader()`` gives, and write them atomically."""
    cached = read_latents(path, key)
    if cached is not None:
        return cached
    images, labels = source()
    vae = vae_loader()
    moments = encode_images(vae, images, resolution, batch_size, device)
    shift = getattr(vae.config, "shift_factor", None)
    latents = LatentSet(moments, labels.long().cpu(), float(vae.config.scaling_factor), shift)
    meta = {
        "key": _key_text({"format": _FORMAT, **key}),
        "scaling_factor": repr(latents.scaling_factor),
        "shift_factor": json.dumps(shift),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"moments": moments.contiguous(), "labels": latents.labels.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return latents
