"""synthgen: synthetic image datasets with Stable Diffusion, from recipe to Hub to trained model."""

__version__ = "0.1.0"

# Imported on first use, so `import synthgen` stays cheap (no torch/diffusers):
# synthgen.ClassConditionedPipeline.from_pretrained(folder) loads a saved class-conditioned pipeline.
_LAZY = {
    "ClassConditionedPipeline": "synthgen.classcond.pipeline",
    "ClassEncoder": "synthgen.classcond.encoder",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'synthgen' has no attribute {name!r}")
