"""Class-conditioned Stable Diffusion (Lomurno et al.): a trained class encoder in place of the text
encoder, then optional UNet fine-tuning.

* :class:`ClassEncoder` (``encoder.py``) -- one-hot class vector -> tokens for the UNet's cross-attention;
* :class:`ClassConditionedPipeline` (``pipeline.py``) -- class ids -> images, classifier-free guidance;
* :func:`train_class_encoder` (``train_encoder.py``) -- stage 1: the encoder, UNet and VAE frozen;
* :func:`finetune_unet` (``finetune.py``) -- stage 3: the UNet (full or LoRA), the encoder fixed;
* :func:`load_run_pipeline` (``assemble.py``) -- a pipeline from a run folder's encoder/UNet epochs;
* ``EncoderStageConfig`` / ``UNetStageConfig`` (``config.py``) -- the stage settings, their defaults;
* :func:`tune_stage` (``tune.py``) -- stages 2 and 4: Optuna (TPE, Hyperband) over steps, guidance and
  a checkpoint epoch, objective CAS validation accuracy (study on disk: ``study.py``; trials: ``trials.py``);
* :func:`final_stage` (``final.py``) -- the tuned pipeline, its x1..xk datasets and their CAS;
* :func:`run_classcond` (``run.py``) -- all stages, resuming; :class:`ClassCondRecipe` (``recipe.py``)
  -- every stage's settings (``train/classcond-*.yaml``); plots and their JSON in ``report.py``.

Names are imported lazily so ``import synthgen.classcond`` does not import torch or diffusers.
"""

from __future__ import annotations

_LAZY = {
    "ClassEncoder": "synthgen.classcond.encoder",
    "cross_attention_width": "synthgen.classcond.encoder",
    "ClassConditionedPipeline": "synthgen.classcond.pipeline",
    "load_base_components": "synthgen.classcond.base",
    "EncoderStageConfig": "synthgen.classcond.config",
    "UNetStageConfig": "synthgen.classcond.config",
    "train_class_encoder": "synthgen.classcond.train_encoder",
    "finetune_unet": "synthgen.classcond.finetune",
    "StageResult": "synthgen.classcond.loop",
    "denoising_loss": "synthgen.classcond.loop",
    "load_run_pipeline": "synthgen.classcond.assemble",
    "list_epochs": "synthgen.classcond.checkpoints",
    "tune_stage": "synthgen.classcond.tune",
    "read_best": "synthgen.classcond.tune",
    "final_stage": "synthgen.classcond.final",
    "run_classcond": "synthgen.classcond.run",
    "ClassCondRecipe": "synthgen.classcond.recipe",
    "load_classcond_recipe": "synthgen.classcond.recipe",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'synthgen.classcond' has no attribute {name!r}")
