"""Image generation: load a diffusers pipeline, generate seeded images, reject broken ones.

* :func:`load_pipeline` (``pipeline.py``) -- a ``GeneratorConfig`` -> :class:`LoadedPipeline`
  (pipeline, device, dtype, resolved model revision, scheduler, library versions);
* :class:`ImageGenerator` (``generator.py``) -- prompt records -> :class:`GeneratedImage` (stored-size
  RGB image, the seed used, retries), and ``generate_one(prompt, seed)`` to regenerate a row;
* :func:`build_tiny_pipeline` / :func:`builtin_model_path` (``tiny.py``) -- ``builtin:tiny-sd``, a
  tiny random-weight Stable Diffusion built from configs for demos and tests;
* :func:`image_seed` (``seeds.py``) -- per-image seeds;
* the GPU path: ``accel.py`` (attention, fused QKV, channels-last, ``torch.compile``),
  ``embeddings.py`` (text embeddings once per prompt), ``decode.py`` (chunked VAE decode, uint8 on
  the device), ``stepcache.py`` (opt-in DeepCache), ``sd15.py`` (SD 1.5's architecture, random
  weights, for benchmarks).

Names are imported lazily so ``import synthgen.generate`` does not import torch or diffusers.
"""

from __future__ import annotations

from synthgen.generate.seeds import image_seed

_LAZY = {
    "load_pipeline": "synthgen.generate.pipeline",
    "prepare_pipeline": "synthgen.generate.pipeline",
    "LoadedPipeline": "synthgen.generate.pipeline",
    "SCHEDULER_CLASSES": "synthgen.generate.pipeline",
    "ImageGenerator": "synthgen.generate.generator",
    "GeneratedImage": "synthgen.generate.generator",
    "GenerationStats": "synthgen.generate.generator",
    "rejection_reason": "synthgen.generate.generator",
    "build_tiny_pipeline": "synthgen.generate.tiny",
    "builtin_model_path": "synthgen.generate.tiny",
    "model_fingerprint": "synthgen.generate.tiny",
}

__all__ = ["image_seed", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'synthgen.generate' has no attribute {name!r}")
