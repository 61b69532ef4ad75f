"""The engine's GPU path: a recipe's speed settings applied to a loaded diffusers pipeline.

Each setting is a :class:`~synthgen.recipe.GeneratorConfig` field; ``auto`` means on for CUDA
devices and off elsewhere (on a CPU none of these helps, and ``torch.compile`` costs minutes).

* ``attention``: ``sdpa`` is PyTorch's ``scaled_dot_product_attention`` (diffusers' default
  processor, which picks flash/memory-efficient kernels itself); ``xformers`` switches to
  xformers' kernels, checked first so that a missing or mismatched build is one clear line.
* ``fuse_qkv``: diffusers' ``fuse_qkv_projections`` -- self-attention's Q, K and V (and
  cross-attention's K and V) as one matmul, in the UNet and the VAE. SDPA only.
* ``channels_last``: UNet and VAE in NHWC layout, the layout cuDNN's fastest convolutions use.
* ``compile``: ``torch.compile`` of the UNet's and the VAE decoder's ``forward``, with the batch
  dimension marked dynamic: a compiled graph serves a range of batch sizes -- a shard's short last
  batch, a retry, a decode chunk -- instead of one compile per batch size. Dynamo still splits the
  range where the model's code branches on the batch: at exactly one (single-image VAE decodes),
  and at 64 rows, where diffusers' ``Upsample2D`` and ``ResnetBlock2D`` take a ``.contiguous()``
  branch (with guidance, 32 images are 64 UNet rows: a recipe of ``batch_size: 32`` whose shards
  end in a shorter batch compiles the UNet twice per process). The pipeline keeps its modules;
  ``type(module).forward`` stays the eager forward.
* ``step_cache_interval``: DeepCache step caching (``stepcache.py``), opt-in.

Batched classifier-free guidance needs no setting: diffusers' Stable Diffusion pipeline already
runs the conditional and unconditional halves as one UNet batch (tested). Prompt embeddings,
chunked VAE decoding and the uint8 conversion on the device are in ``ImageGenerator``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Union

from synthgen.errors import SynthgenError

logger = logging.getLogger(__name__)


def enabled(setting: Union[bool, str], device: str) -> bool:
    """A ``bool | "auto"`` setting on ``device``: auto means on for CUDA devices only."""
    if setting == "auto":
        return device.startswith("cuda")
    return bool(setting)


@dataclass
class Speedups:
    """What :func:`apply_speedups` did (recorded in the pipeline's provenance)."""

    attention: str = "sdpa"  # "sdpa", "xformers", "sliced"
    fused_qkv: bool = False
    channels_last: bool = False
    compiled: list[str] = field(default_factory=list)  # modules compiled: "unet", "vae.decoder"
    step_cache_interval: int = 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def check_xformers(device: str) -> None:
    """Raise a one-line :class:`SynthgenError` unless xformers' attention can run on ``device``."""
    fix = "use attention: sdpa (PyTorch's own memory-efficient attention)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # xformers warns at import when its C++ build does not load
        try:
            import xformers
            import xformers.ops
        except Exception as exc:
            raise SynthgenError(f"attention: xformers, but xformers cannot be imported ({_first_line(exc)}); {fix}") from None
    if not device.startswith("cuda"):
        raise SynthgenError(f"attention: xformers needs a CUDA device, not {device!r}; {fix}")
    load_error = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    import torch

    try:
        q = torch.randn((1, 2, 40), device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as exc:
        why = _first_line(exc)
        if load_error is not None:  # e.g. "built for: PyTorch 2.10.0+cu128 ... (you have 2.14.1+cu130)"
            built = [line.strip() for line in str(load_error).splitlines() if "PyTorch" in line]
            why = f"its C++/CUDA kernels do not load ({built[0] if built else _first_line(load_error)})"
        raise SynthgenError(
            f"attention: xformers {getattr(xformers, '__version__', '?')} cannot run with torch "
            f"{torch.__version__}: {why}; {fix}"
        ) from None


def apply_speedups(pipe: Any, cfg: Any, device: str) -> Speedups:
    """Apply ``cfg``'s attention, fusion, memory layout, step cache and compile settings to ``pipe``."""
    import torch

    done = Speedups()
    if cfg.attention == "xformers":
        check_xformers(device)
        pipe.enable_xformers_memory_efficient_attention()
        done.attention = "xformers"
    if cfg.attention_slicing:
        pipe.enable_attention_slicing()
        done.attention = "sliced" if done.attention == "sdpa" else done.attention + "+sliced"

    if enabled(cfg.fuse_qkv, device):
        if done.attention != "sdpa":
            if cfg.fuse_qkv is True:
                raise SynthgenError(
                    f"generator.fuse_qkv needs attention: sdpa without attention_slicing (got {done.attention})"
                )
        elif hasattr(pipe, "fuse_qkv_projections"):
            pipe.fuse_qkv_projections()
            done.fused_qkv = True

    if enabled(cfg.channels_last, device):
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
        done.channels_last = True

    if cfg.step_cache_interval > 1:
        from synthgen.generate.stepcache import enable_step_cache

        enable_step_cache(pipe.unet, cfg.step_cache_interval)
        done.step_cache_interval = cfg.step_cache_interval

    if enabled(cfg.compile, device):
        if not device.startswith("cuda"):
            warnings.warn(
                f"generator.compile is ignored on {device} (torch.compile of the UNet and VAE is for GPUs)",
                stacklevel=3,
            )
        else:
            if done.step_cache_interval > 1:
                # The cache's per-step Python branches would split the graph at every block.
                logger.info("step caching is on: the UNet runs eagerly, only the VAE decoder is compiled")
            else:
                compile_with_dynamic_batch(pipe.unet)
                done.compiled.append("unet")
            compile_with_dynamic_batch(pipe.vae.decoder)
            done.compiled.append("vae.decoder")
    return done


def compile_with_dynamic_batch(module: Any, **options: Any) -> None:
    """Replace ``module.forward`` by its ``torch.compile(**options)`` with tensor inputs' dimension 0 dynamic."""
    import torch

    compiled = torch.compile(module.forward, **options)

    def forward(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() >= 2:  # (batch, ...) inputs, not timesteps
                torch._dynamo.maybe_mark_dynamic(value, 0)
        return compiled(*args, **kwargs)

    module.forward = forward
