"""Settings of the two training stages, with Lomurno et al.'s values as defaults.

From their ``SD_adapting.py``: encoder stage batch 64, 50 epochs, lr 1e-4; UNet stage batch 16, 10
epochs, lr 1e-5; both Keras ``Adam(weight_decay=0.004, epsilon=1e-8, global_clipnorm=10)`` with a
cosine decay of the learning rate to 0 over all steps. Keras applies ``weight_decay`` decoupled from
the gradient (``w -= lr * wd * w``), which is what ``torch.optim.AdamW`` does, so AdamW it is.
Images are resized to 128 px (KerasCV's minimum) by bilinear interpolation and scaled to [-1, 1].
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synthgen.errors import SynthgenError
from synthgen.train.config import switch_words

__all__ = ["StageConfig", "EncoderStageConfig", "UNetStageConfig", "validate_config"]


class StageConfig(BaseModel):
    """What both stages share. ``resolution``: images are resized to it before VAE encoding."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    batch_size: int = Field(ge=1)  # global: split across processes
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.004, ge=0)
    clip_norm: Optional[float] = Field(10.0, gt=0)  # global gradient norm; None: no clipping
    resolution: int = Field(128, ge=8)
    seed: int = 1234
    # auto: bf16 on CUDA, else no; YAML reads an unquoted no as False, yes as True (auto)
    mixed_precision: Annotated[Literal["auto", "no", "fp16", "bf16"], switch_words(on="auto", off="no")] = "auto"
    cpu: bool = False  # train on the CPU even when a GPU is present (and: several CPU processes, gloo)
    encode_batch_size: int = Field(64, ge=1)  # VAE encoding of the images, done once

    # Settings that may change when a stage resumes: where and how it runs, not what it learns
    # (a precision change moves results by rounding only; an fp16 loss scale is kept in the checkpoint).
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = ("mixed_precision", "cpu", "encode_batch_size")

    def resume_key(self) -> dict:
        """The settings an interrupted stage must be resumed with (all but ``RESUMABLE_CHANGES``)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.RESUMABLE_CHANGES}


class EncoderStageConfig(StageConfig):
    """Stage 1: train the class encoder; the UNet and VAE are frozen."""

    batch_size: int = Field(64, ge=1)
    epochs: int = Field(50, ge=1)
    lr: float = Field(1e-4, gt=0)
    num_tokens: int = Field(100, ge=1)  # tokens per class embedding
    hidden_dims: tuple[int, ...] = (500,)  # hidden Linear widths of the encoder


class UNetStageConfig(StageConfig):
    """Stage 3: fine-tune the UNet with the encoder fixed; ``method: lora`` trains LoRA adapters (peft)
    on the attention projections instead of every weight."""

    batch_size: int = Field(16, ge=1)
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-5, gt=0)
    resolution: Optional[int] = Field(None, ge=8)  # None: the run's (its latents were encoded at it)
    method: Literal["full", "lora"] = "full"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: Optional[float] = Field(None, gt=0)  # None: equal to the rank (scale 1)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    gradient_checkpointing: bool = False


def validate_config(cls: type[StageConfig], config: StageConfig | dict | None) -> StageConfig:
    """``config`` as a ``cls``: None gives the defaults; a dict is validated with one-line errors."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, BaseModel):
        config = config.model_dump()
    try:
        return cls.model_validate(config)
    except ValidationError as exc:
        from synthgen.recipe import format_validation_error

        raise SynthgenError(f"{cls.__name__}: {format_validation_error(exc, cls)}") from None
