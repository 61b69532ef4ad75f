"""A class-conditioned pipeline from a run folder: base model + encoder epoch (+ UNet epoch).

Tuning (stage 2 and 4) and generation pick checkpoints by epoch: ``load_run_pipeline(run_dir,
encoder_epoch=k)`` puts encoder epoch ``k`` on the base model; ``unet_epoch=j`` also loads stage 3's
epoch ``j`` (a whole UNet, or LoRA adapters merged into the base UNet) and, when ``encoder_epoch`` is
not given, the encoder epoch that UNet was trained with. The pipeline's ``training`` config records
the run, both epochs and the base model's revision, so a saved pipeline says where it came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from synthgen.classcond.checkpoints import epoch_dir, read_state, require_epoch
from synthgen.classcond.encoder import load_class_encoder
from synthgen.classcond.finetune import UNET_STAGE, load_unet_epoch
from synthgen.classcond.pipeline import ClassConditionedPipeline
from synthgen.classcond.runfolder import RunFolder
from synthgen.classcond.train_encoder import ENCODER_STAGE
from synthgen.errors import SynthgenError

__all__ = ["load_run_pipeline"]


def load_run_pipeline(
    run_dir: str | os.PathLike,
    *,
    encoder_epoch: Optional[int] = None,
    unet_epoch: Optional[int] = None,
    scheduler: Optional[str] = None,
) -> ClassConditionedPipeline:
    """The pipeline of ``run_dir`` at the given epochs (None: the last encoder epoch; the base UNet).

    ``scheduler``: a synthgen scheduler name (``ddim``, ``euler``, ...) to sample with instead of the
    base model's. SynthgenError when an epoch does not exist, or when the UNet epoch was trained
    with another encoder epoch than the one asked for.
    """
    from synthgen.classcond.base import load_base_components

    run = RunFolder(Path(run_dir))
    info = run.read_info()
    unet_dir = None
    if unet_epoch is not None:
        unet_dir = epoch_dir(run.stage_dir(UNET_STAGE), require_epoch(run.stage_dir(UNET_STAGE), unet_epoch, "UNet"))
        trained_with = int(read_state(unet_dir)["settings"]["encoder_epoch"])
        if encoder_epoch is not None and encoder_epoch != trained_with:
            raise SynthgenError(
                f"UNet epoch {unet_epoch} was fine-tuned with encoder epoch {trained_with}, not {encoder_epoch}"
            )
        encoder_epoch = trained_with
    encoder_epoch = require_epoch(run.stage_dir(ENCODER_STAGE), encoder_epoch, "encoder")
    encoder = load_class_encoder(epoch_dir(run.stage_dir(ENCODER_STAGE), encoder_epoch))
    base = load_base_components(info["base_model"], revision=info["base_revision"], vae=True)
    if unet_dir is not None:
        load_unet_epoch(base.unet, unet_dir)
    inference_scheduler = base.scheduler
    if scheduler is not None:
        from synthgen.generate.pipeline import make_scheduler

        inference_scheduler = make_scheduler(scheduler, base.scheduler.config)
    training = {
        "run": str(run.root.resolve()),
        "base_model": info["base_model"],
        "base_revision": info["base_revision"],
        "encoder_epoch": encoder_epoch,
        "unet_epoch": unet_epoch,
    }
    return ClassConditionedPipeline(
        vae=base.vae,
        unet=base.unet,
        scheduler=inference_scheduler,
        class_encoder=encoder.eval(),
        class_names=info["class_names"],
        resolution=info["resolution"],
        training=training,
    )
