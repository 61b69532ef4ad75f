"""Latents -> images on the device: the VAE decode in chunks, the safety checker, uint8 conversion.

``ImageGenerator`` asks the pipeline for latents and finishes here instead of in diffusers'
post-processing, so that

* the VAE decodes at most ``chunk`` images at a time. ``vae_decode_chunk: auto`` measures the peak
  memory of one image's decode (once per image size, eagerly) and decodes as many images at once
  as half the free device memory holds; on a CPU it decodes the whole batch at once;
* the decoded image is upcast to float32 *before* ``x / 2 + 0.5`` (diffusers does that step in
  the model's dtype, where bfloat16 alone would cost up to one uint8 level);
* the rejection statistics (finite? brightest value?) and the uint8 conversion run on the device,
  and only uint8 pixels (a quarter of float32's bytes) cross to the host.

On a CPU in float32 the pixels are the same as diffusers' own ``output_type="np"`` path (tested).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Union

#: ``vae_decode_chunk: auto`` decodes as many images at once as this share of free memory holds
DECODE_MEMORY_SHARE = 0.5

# VAE -> {(latent dtype, h, w): measured peak bytes of one image's decode}. Kept per model, not per
# decoder: a tuning study makes a generator per trial, and each measurement resets the device's
# peak-memory counter (see LatentDecoder.chunk_size), which should happen once, at the first batch.
_DECODE_BYTES: "weakref.WeakKeyDictionary[Any, dict[tuple, int]]" = weakref.WeakKeyDictionary()


class LatentDecoder:
    """``decoder(latents)`` -> (float32 images (N, 3, H, W) in [0, 1] on the device, nsfw flags)."""

    def __init__(self, pipe: Any, device: str, chunk: Union[int, str] = "auto") -> None:
        self.pipe = pipe
        self.device = device
        self.chunk = chunk

    def _vae(self, latents, *, eager: bool = False):
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor
        if eager:  # the class's forward: never a compiled one (accel.compile_with_dynamic_batch)
            z = vae.post_quant_conv(z) if vae.post_quant_conv is not None else z
            return type(vae.decoder).forward(vae.decoder, z)
        return vae.decode(z, return_dict=False)[0]

    def chunk_size(self, latents) -> int:
        """How many of ``latents``' images to decode per VAE call."""
        import torch

        n = len(latents)
        if self.chunk != "auto":
            return max(1, min(int(self.chunk), n))
        if not self.device.startswith("cuda") or n == 1:
            return n
        measured = _DECODE_BYTES.setdefault(self.pipe.vae, {})
        key = (str(latents.dtype), *latents.shape[-2:])
        if key not in measured:
            # The only measure of one decode's peak is the device's peak counter, which this resets:
            # a caller measuring its own peak across this point sees only what came after (the
            # benchmarks size the decoder before they reset the counter themselves).
            dev = torch.device(self.device)
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self._vae(latents[:1], eager=True)
            measured[key] = max(1, torch.cuda.max_memory_allocated(dev) - before)
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        return max(1, min(n, int(DECODE_MEMORY_SHARE * free // measured[key])))

    def __call__(self, latents) -> tuple[Any, Optional[list[bool]]]:
        import torch

        images, flags = [], []
        any_checked = False
        with torch.no_grad():
            size = self.chunk_size(latents)
            for part in latents.split(size):
                decoded = self._vae(part)
                if getattr(self.pipe, "safety_checker", None) is not None:
                    # the pipeline's own check, on [-1, 1] images; it blacks out what it flags
                    decoded, nsfw = self.pipe.run_safety_checker(decoded, self.device, self.pipe.text_encoder.dtype)
                    any_checked = True
                    flags.extend(bool(f) for f in nsfw)
                x = decoded.float()
                # clamp would turn +-inf into 1 and 0: make them NaN, which it keeps, so the image is rejected
                images.append((x.masked_fill(torch.isinf(x), float("nan")) / 2 + 0.5).clamp(0, 1))
        return torch.cat(images), (flags if any_checked else None)


def rejection_stats(images) -> tuple[list[bool], list[float]]:
    """Per image of float (N, C, H, W): all values finite? and its largest finite value."""
    import torch

    flat = images.flatten(1)
    finite = torch.isfinite(flat).all(1)
    largest = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0).amax(1)
    return finite.tolist(), largest.float().tolist()


def to_uint8(images):
    """Float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C) numpy, rounding like ``numpy_to_pil``."""
    import torch

    pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
