"""synthgen: synthetic image datasets with Stable Diffusion, from recipe to Hub to trained model."""

__version__ = "0.1.0"
