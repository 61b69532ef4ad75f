"""Stage 1: train the class encoder on a labelled dataset; the base model's UNet and VAE stay frozen.

``train_class_encoder(run_dir, base_model, dataset)`` loads the labelled split, encodes its images
once into latents (cached in the run folder), and trains a :class:`ClassEncoder` sized from the UNet's
cross-attention width with the noise-prediction loss, writing ``run_dir/encoder/epoch-NNNN/`` after
every epoch. Called again on the same folder it resumes after the last finished epoch (or returns
at once when all are done). The text encoder is never loaded: the class encoder replaces it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import PartialState

from synthgen.classcond.base import load_base_components
from synthgen.classcond.checkpoints import load_module_weights
from synthgen.classcond.config import EncoderStageConfig, validate_config
from synthgen.classcond.data import load_labelled_images, run_latents
from synthgen.classcond.encoder import ClassEncoder
from synthgen.classcond.loop import DenoisingTask, EpochInfo, StageResult, run_stage
from synthgen.classcond.runfolder import RunFolder

__all__ = ["train_class_encoder", "initial_encoder", "ENCODER_STAGE"]

ENCODER_STAGE = "encoder"


def train_class_encoder(
    run_dir: str | os.PathLike,
    base_model: str,
    dataset: str,
    *,
    split: str = "train",
    dataset_revision: Optional[str] = None,
    base_revision: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    limit: Optional[int] = None,
    config: EncoderStageConfig | dict | None = None,
    on_step_end: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    on_epoch_end: Optional[Callable[[EpochInfo], None]] = None,
) -> StageResult:
    """Train (or resume training) the class encoder of the run in ``run_dir``.

    ``base_model``: a Stable Diffusion 1.x/2.x pipeline folder, Hub id or ``builtin:tiny-sd``;
    ``dataset``: a labelled image dataset (local folder, parquet file or Hub id) and its ``split``
    (``limit``: its first rows only). Returns the epochs' checkpoints and mean losses. Bad input
    (no labels, a base model without cross-attention, a folder of another run) raises SynthgenError
    before anything is written.
    """
    config = validate_config(EncoderStageConfig, config)
    ds, class_names, described = load_labelled_images(
        dataset, split, revision=dataset_revision, image_column=image_column, label_column=label_column, limit=limit
    )
    base = load_base_components(base_model, revision=base_revision)
    run = RunFolder(Path(run_dir))
    with PartialState(cpu=config.cpu).main_process_first():  # several processes: the main one writes
        info = run.claim({
            "base_model": str(base_model),
            "base_revision": base.revision,
            "dataset": described,
            "class_names": class_names,
            "resolution": config.resolution,
        })
    latents = run_latents(run, info, base.folder, encode_batch_size=config.encode_batch_size, cpu=config.cpu,
                          images=ds.images, labels=ds.labels)
    del ds

    encoder = initial_encoder(base.unet, len(class_names), config)
    num_classes = len(class_names)
    task = DenoisingTask(
        name=ENCODER_STAGE,
        trainable=encoder,
        unet=base.unet,
        condition=lambda model, labels: model(F.one_hot(labels, num_classes).float()),
        save_weights=lambda model, folder: model.save_pretrained(folder, safe_serialization=True),
        load_weights=load_module_weights,
        settings={"stage": ENCODER_STAGE, "config": config.resume_key()},
    )
    return run_stage(task, config, latents, base.noise_scheduler, run.stage_dir(ENCODER_STAGE),
                     on_step_end=on_step_end, on_epoch_end=on_epoch_end)


def initial_encoder(unet, num_classes: int, config: EncoderStageConfig) -> ClassEncoder:
    """The encoder stage 1 starts from: sized for ``unet``, weights drawn from ``config.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return ClassEncoder.for_unet(unet, num_classes, num_tokens=config.num_tokens, hidden_dims=tuple(config.hidden_dims))
