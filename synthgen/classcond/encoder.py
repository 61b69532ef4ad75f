"""The class encoder: a one-hot class vector -> a sequence of tokens the UNet cross-attends to.

Lomurno et al. replace Stable Diffusion's text encoder with a small fully connected network (their
``Models/class_encoder.py``, KerasCV): Dense(500) -> Dense(100 x 768, no bias) -> reshape to 100
tokens of width 768, no activation. Its output takes the place of the CLIP text embeddings
(``prompt_embeds`` in diffusers' terms: ``encoder_hidden_states`` of the UNet), so any sequence length
works; the width must be the UNet's cross-attention width (768 for SD 1.x, 1024 for SD 2.x). The
unconditional embedding used for classifier-free guidance is the encoder applied to a zero vector.

Weights start as Keras initialises a ``Dense`` layer (Glorot-uniform kernels, zero biases), so the
unconditional embedding starts at exactly zero and training moves it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from synthgen.errors import SynthgenError

__all__ = ["ClassEncoder", "cross_attention_width", "load_class_encoder"]


class ClassEncoder(ModelMixin, ConfigMixin):
    """``[B, num_classes]`` one-hot (or any) vectors -> ``[B, num_tokens, cross_attention_dim]`` tokens.

    ``hidden_dims`` are the widths of the hidden ``Linear`` layers (their code: one of 500); the last
    layer has no bias, as theirs. Build one that fits a UNet with :meth:`for_unet`.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int,
        cross_attention_dim: int = 768,
        num_tokens: int = 100,
        hidden_dims: Sequence[int] = (500,),
    ):
        super().__init__()
        if num_classes < 1 or cross_attention_dim < 1 or num_tokens < 1 or any(h < 1 for h in hidden_dims):
            raise SynthgenError(
                f"class encoder sizes must be positive: num_classes={num_classes}, "
                f"cross_attention_dim={cross_attention_dim}, num_tokens={num_tokens}, hidden_dims={list(hidden_dims)}"
            )
        layers = []
        width = num_classes
        for h in hidden_dims:
            layers.append(nn.Linear(width, h))
            width = h
        self.hidden = nn.Sequential(*layers)
        self.to_tokens = nn.Linear(width, num_tokens * cross_attention_dim, bias=False)
        for layer in self.modules():
            if isinstance(layer, nn.Linear):  # Keras Dense defaults
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    @classmethod
    def for_unet(cls, unet, num_classes: int, **kwargs) -> "ClassEncoder":
        """An encoder whose token width is ``unet``'s cross-attention width."""
        return cls(num_classes=num_classes, cross_attention_dim=cross_attention_width(unet), **kwargs)

    def forward(self, class_vectors: torch.Tensor) -> torch.Tensor:
        x = self.to_tokens(self.hidden(class_vectors.to(self.to_tokens.weight.dtype)))
        return x.view(x.shape[0], self.config.num_tokens, self.config.cross_attention_dim)

    def one_hot(self, class_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(class_ids.long(), self.config.num_classes).to(self.to_tokens.weight.dtype)

    def embed_classes(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Tokens for integer class ids ``[B]`` (each in ``[0, num_classes)``)."""
        return self(self.one_hot(class_ids.to(self.device)))

    def unconditional(self, batch_size: int = 1) -> torch.Tensor:
        """The unconditional tokens: the encoder applied to a zero vector, repeated ``batch_size`` times."""
        zeros = torch.zeros(1, self.config.num_classes, device=self.device, dtype=self.to_tokens.weight.dtype)
        return self(zeros).expand(batch_size, -1, -1)


def cross_attention_width(unet) -> int:
    """The width of the tokens ``unet`` cross-attends to; SynthgenError if it has no cross-attention."""
    config = getattr(unet, "config", {})
    name = type(unet).__name__
    has_cross_attention = any(getattr(m, "is_cross_attention", False) for m in unet.modules())
    width = config.get("cross_attention_dim") if hasattr(config, "get") else None
    if not has_cross_attention or width is None:
        raise SynthgenError(
            f"the base model's UNet ({name}) has no cross-attention layers, so it cannot be conditioned on "
            "class tokens; use a text-to-image Stable Diffusion 1.x/2.x checkpoint"
        )
    if config.get("encoder_hid_dim") is not None:  # the UNet projects its conditioning input first
        width = config["encoder_hid_dim"]
    if isinstance(width, (list, tuple)):
        if len(set(width)) != 1:
            raise SynthgenError(f"the base model's UNet uses different cross-attention widths per block ({list(width)})")
        width = width[0]
    return int(width)


def load_class_encoder(folder) -> "ClassEncoder":
    """The class encoder saved in the checkpoint ``folder`` (safetensors only: a folder without them
    is damaged, never read as a pickle); SynthgenError naming the folder when it cannot be loaded."""
    from synthgen.classcond.base import _LOAD_ERRORS, _first_line
    from synthgen.generate.embeddings import quiet_diffusers

    try:
        with quiet_diffusers():
            return ClassEncoder.from_pretrained(folder, use_safetensors=True)
    except _LOAD_ERRORS as exc:
        raise SynthgenError(f"cannot load the class encoder checkpoint {folder}: {_first_line(exc)}; the checkpoint is "
                            "incomplete or damaged (train that stage again in a new run folder)") from None
