"""Batched, per-sample image augmentations that run on the training device (GPU or CPU).

torchvision's transforms draw ONE set of random parameters per call, so applied to a batch every
image gets the same crop; contrastive views need independent parameters per image. The functions
here draw parameters per image (on the CPU, from an optional ``torch.Generator``, so runs are
reproducible) and apply them with batched tensor ops (``affine_grid``/``grid_sample``, grouped
convolutions) on whatever device the images are on.

Input images are ``uint8`` ``[B, 3, H, W]`` or float in ``[0, 1]``; :class:`ContrastiveAugment`
returns normalised float views. SimCLR's recipe (Chen et al. 2020, appendix A): random resized crop
(scale 0.08-1, aspect 3/4-4/3) + horizontal flip, colour jitter (brightness, contrast, saturation
0.8*s, hue 0.2*s, applied with p=0.8), grayscale (p=0.2), Gaussian blur (p=0.5 on ImageNet, off for
32-pixel images). Differences from torchvision, by design: the jitter operations run in a fixed order
(brightness, contrast, saturation, hue) rather than a random one; hue is rotated in YIQ space; a crop
box that would exceed the image is clamped to it instead of re-drawn.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from synthgen.train.runtime import device_constant, host_to_device

__all__ = [
    "ContrastiveAugment",
    "to_unit_float",
    "random_resized_crop",
    "color_jitter",
    "random_grayscale",
    "gaussian_blur",
    "random_crop_flip",
    "normalize",
]

_GRAY = (0.299, 0.587, 0.114)
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = device_constant(mean, images.dtype, images.device).view(1, -1, 1, 1)
    std_t = device_constant(std, images.dtype, images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def _uniform(n: int, low: float, high: float, generator, device) -> torch.Tensor:
    return host_to_device(torch.rand(n, generator=generator) * (high - low) + low, device)


def _bernoulli(n: int, p: float, generator, device) -> torch.Tensor:
    return host_to_device(torch.rand(n, generator=generator) < p, device)


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image random resized crop (area fraction ``scale``, aspect ``ratio``) + horizontal flip.

    Bilinear resampling to ``size x size``. Float input in, float out.
    """
    b = images.shape[0]
    dev = images.device
    area = torch.rand(b, generator=generator) * (scale[1] - scale[0]) + scale[0]
    log_r = torch.rand(b, generator=generator) * (math.log(ratio[1]) - math.log(ratio[0])) + math.log(ratio[0])
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the image width / height
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=generator) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    theta = host_to_device(theta.to(images.dtype), dev)
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(images: torch.Tensor) -> torch.Tensor:
    w = device_constant(_GRAY, images.dtype, images.device).view(1, 3, 1, 1)
    return (images * w).sum(dim=1, keepdim=True)


@functools.lru_cache(maxsize=8)
def _yiq_matrices(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB -> YIQ and its inverse, once per dtype and device (not a copy and a solve every batch)."""
    to_yiq = device_constant(_TO_YIQ, dtype, device)
    with torch.inference_mode(False):
        return to_yiq, torch.linalg.inv(to_yiq)


def _rotate_hue(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``angle`` radians (per image) in YIQ space."""
    to_yiq, from_yiq = _yiq_matrices(images.dtype, images.device)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, images)
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], c * i - s * q, s * i + c * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", from_yiq, yiq)


def color_jitter(
    images: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image colour jitter applied with probability ``p`` (factors as in torchvision)."""
    b, dev = images.shape[0], images.device
    apply = _bernoulli(b, p, generator, dev).view(-1, 1, 1, 1)
    out = images
    if brightness > 0:
        f = _uniform(b, max(0.0, 1 - brightness), 1 + brightness, generator, dev).view(-1, 1, 1, 1)
        out = (out * f).clamp(0, 1)
    if contrast > 0:
        f = _uniform(b, max(0.0, 1 - contrast), 1 + contrast, generator, dev).view(-1, 1, 1, 1)
        mean = _gray(out).mean(dim=(2, 3), keepdim=True)
        out = ((out - mean) * f + mean).clamp(0, 1)
    if saturation > 0:
        f = _uniform(b, max(0.0, 1 - saturation), 1 + saturation, generator, dev).view(-1, 1, 1, 1)
        gray = _gray(out)
        out = ((out - gray) * f + gray).clamp(0, 1)
    if hue > 0:
        angle = _uniform(b, -hue, hue, generator, dev) * (2 * math.pi)
        out = _rotate_hue(out, angle.to(out.dtype)).clamp(0, 1)
    return torch.where(apply, out, images)


def random_grayscale(images: torch.Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    apply = _bernoulli(images.shape[0], p, generator, images.device).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(images).expand_as(images), images)


def gaussian_blur(
    images: torch.Tensor,
    sigma: tuple[float, float] = (0.1, 2.0),
    p: float = 0.5,
    kernel_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image Gaussian blur (sigma ~ U(sigma)) with a kernel of ~10% of the image side, prob. ``p``."""
    b, c, h, w = images.shape
    dev = images.device
    k = max(3, int(round(kernel_fraction * min(h, w))) // 2 * 2 + 1)
    s = _uniform(b, sigma[0], sigma[1], generator, dev).to(images.dtype)
    x = torch.arange(k, device=dev, dtype=images.dtype) - k // 2
    kern = torch.exp(-(x.view(1, -1) ** 2) / (2 * s.view(-1, 1) ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)  # [b, k]
    kern = kern.repeat_interleave(c, dim=0)  # [b*c, k]
    flat = images.reshape(1, b * c, h, w)
    flat = F.pad(flat, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    flat = F.conv2d(flat, kern.view(b * c, 1, 1, k), groups=b * c)
    flat = F.conv2d(flat, kern.view(b * c, 1, k, 1), groups=b * c)
    blurred = flat.view(b, c, h, w)
    apply = _bernoulli(b, p, generator, dev).view(-1, 1, 1, 1)
    return torch.where(apply, blurred, images)


def random_crop_flip(
    images: torch.Tensor,
    padding: int = 4,
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    fill: str = "reflect",
) -> torch.Tensor:
    """The standard CIFAR augmentation, batched on the images' device: pad by ``padding``
    (``fill``: ``reflect`` or ``zeros``), crop a random window back to size, flip horizontally with
    probability ``flip_p``. The only crop-and-flip in synthgen (classification and pre-training)."""
    if fill not in ("reflect", "zeros"):
        raise ValueError(f"fill must be 'reflect' or 'zeros', got {fill!r}")
    b, c, h, w = images.shape
    dev = images.device
    if padding > 0:
        x = F.pad(images, (padding,) * 4, mode="reflect" if fill == "reflect" else "constant")
    else:
        x = images
    oy = host_to_device(torch.randint(0, 2 * padding + 1, (b,), generator=generator), dev)
    ox = host_to_device(torch.randint(0, 2 * padding + 1, (b,), generator=generator), dev)
    rows = (oy.view(-1, 1) + torch.arange(h, device=dev)).view(b, 1, h, 1).expand(b, c, h, x.shape[-1])
    x = torch.gather(x, 2, rows)
    cols = (ox.view(-1, 1) + torch.arange(w, device=dev)).view(b, 1, 1, w).expand(b, c, h, w)
    x = torch.gather(x, 3, cols)
    flip = _bernoulli(b, flip_p, generator, dev).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


@dataclass
class ContrastiveAugment:
    """SimCLR/StableRep view generator: crop+flip, colour jitter, grayscale, optional blur, normalise.

    ``strength`` scales the jitter (brightness/contrast/saturation ``0.8*s``, hue ``0.2*s``); SimCLR
    uses s=1 on ImageNet and s=0.5 on CIFAR-10.
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    scale: tuple[float, float] = (0.08, 1.0)
    strength: float = 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    flip_p: float = 0.5

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = to_unit_float(images)
        x = random_resized_crop(x, self.size, scale=self.scale, flip_p=self.flip_p, generator=generator)
        x = x.clamp(0, 1)
        if self.jitter_p > 0 and self.strength > 0:
            s = self.strength
            x = color_jitter(x, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=self.jitter_p, generator=generator)
        if self.grayscale_p > 0:
            x = random_grayscale(x, self.grayscale_p, generator=generator)
        if self.blur_p > 0:
            x = gaussian_blur(x, p=self.blur_p, generator=generator)
        return normalize(x, self.mean, self.std)
