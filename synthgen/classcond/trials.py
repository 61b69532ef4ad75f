"""One tuning trial's two halves: generate class-balanced images, train the CAS classifier on them.

* :class:`TrialPipeline` -- the run's class-conditioned pipeline, loaded and prepared once (device,
  dtype, scheduler, speed settings of the ``generation`` recipe), whose class encoder (stage 2) or
  UNet (stage 4) is swapped in place for each trial's checkpoint epoch, so that a compiled UNet is
  compiled once per study, not once per trial;
* :func:`generate_class_images` -- ``count`` label-balanced images through the engine's own generator
  (``ImageGenerator``: per-image seeds, rejection and retries, the stored size and resize filter of
  the recipe), as an in-memory :class:`~synthgen.train.data.ImageTensorDataset`;
* :class:`OptunaPruning` -- the epoch callback that reports validation accuracy to the trial at
  every epoch and stops the classifier when the pruner says so;
* :func:`score_images` -- :func:`synthgen.train.cas.train_cas_classifier` on the images, validated
  on the real held-out images; never given a test split.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from synthgen.errors import SynthgenError
from synthgen.train.callbacks import Callback

__all__ = ["TrialPipeline", "generate_class_images", "OptunaPruning", "score_images", "TrialScore"]


class TrialPipeline:
    """The run's pipeline for a study: base model + the study's fixed weights, loaded once;
    :meth:`use` puts one trial's encoder or UNet epoch in place."""

    def __init__(self, run_dir: Path, generator_cfg, *, encoder_epoch: Optional[int] = None, tune_unet: bool = False,
                 revision: str = "run") -> None:
        from synthgen.classcond.assemble import load_run_pipeline
        from synthgen.generate.pipeline import prepare_pipeline

        from synthgen.classcond.checkpoints import epoch_dir, list_epochs
        from synthgen.classcond.finetune import ADAPTER_WEIGHTS, UNET_STAGE

        self.run_dir = Path(run_dir)
        self.tune_unet = tune_unet
        pipe = load_run_pipeline(self.run_dir, encoder_epoch=encoder_epoch, scheduler=generator_cfg.scheduler)
        # LoRA epochs are merged into a copy of the base UNet (kept on the CPU); whole-UNet epochs
        # simply replace the weights.
        unet_epochs = list_epochs(self.run_dir / UNET_STAGE) if tune_unet else []
        lora = bool(unet_epochs) and (epoch_dir(self.run_dir / UNET_STAGE, unet_epochs[-1]) / ADAPTER_WEIGHTS).is_file()
        self.base_unet = copy.deepcopy(pipe.unet).cpu() if lora else None
        # fuse_qkv off: a fused UNet keeps separate QKV weights that a swapped state dict would miss
        cfg = generator_cfg.model_copy(update={"scheduler": None, "fuse_qkv": False})
        self.loaded = prepare_pipeline(pipe, cfg, revision=revision, model=str(self.run_dir))
        self.loaded.scheduler_name = generator_cfg.scheduler or self.loaded.scheduler_name
        self.epoch: Optional[int] = None

    @property
    def pipe(self):
        return self.loaded.pipe

    def use(self, epoch: int) -> None:
        """Load encoder epoch ``epoch`` (stage 2) or UNet epoch ``epoch`` (stage 4) in place."""
        from synthgen.classcond.checkpoints import epoch_dir, load_module_weights
        from synthgen.classcond.finetune import UNET_STAGE, load_unet_epoch
        from synthgen.classcond.train_encoder import ENCODER_STAGE

        if epoch == self.epoch:
            return
        if self.tune_unet and self.base_unet is not None:
            unet = copy.deepcopy(self.base_unet)
            load_unet_epoch(unet, epoch_dir(self.run_dir / UNET_STAGE, epoch))
            self.pipe.unet.load_state_dict(unet.state_dict())
            del unet
        elif self.tune_unet:
            load_module_weights(self.pipe.unet, epoch_dir(self.run_dir / UNET_STAGE, epoch))
        else:
            load_module_weights(self.pipe.class_encoder, epoch_dir(self.run_dir / ENCODER_STAGE, epoch))
        training = dict(self.pipe.config.training or {})
        training["unet_epoch" if self.tune_unet else "encoder_epoch"] = epoch
        self.pipe.register_to_config(training=training)
        self.epoch = epoch


def generate_class_images(loaded, generator_cfg, output, class_names: Sequence[str], count: int, seed: int,
                          progress: Optional[Callable[[int], None]] = None):
    """``count`` label-balanced images (class ``i % classes``) of ``loaded``'s class-conditioned
    pipeline with ``generator_cfg`` (steps, guidance ...) and ``output`` (stored size), image ``i``
    from ``image_seed(seed, i)``; an ImageTensorDataset labelled with ``class_names``."""
    from synthgen.generate.generator import ImageGenerator
    from synthgen.prompts.classes import ClassSampler
    from synthgen.recipe import ClassPrompts
    from synthgen.train.data import ImageTensorDataset

    sampler = ClassSampler(ClassPrompts(classes=list(class_names)), count, seed)
    generator = ImageGenerator(loaded, generator_cfg, output, seed)
    records = list(sampler)
    images = []
    batch = generator_cfg.batch_size
    for start in range(0, count, batch):
        images.extend(np.asarray(g.image, dtype=np.uint8) for g in generator.generate(records[start : start + batch]))
        if progress is not None:
            progress(len(images))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([r.label for r in records], dtype=torch.long)
    source = {"id": f"generated:{loaded.model}", "split": "trial", "steps": generator_cfg.steps,
              "guidance": generator_cfg.guidance_scale, "seed": seed, "retries": generator.stats.retries}
    return ImageTensorDataset(images=pixels, labels=labels, class_names=list(class_names), source=source)


class OptunaPruning(Callback):
    """Report ``monitor`` to an Optuna trial after every epoch (step = epoch) and stop the run when
    the trial's pruner says so; ``pruned_at`` is then that epoch (raise ``optuna.TrialPruned``
    after training: the loop must finish its callbacks first)."""

    def __init__(self, trial, monitor: str = "val_acc") -> None:
        self.trial = trial
        self.monitor = monitor
        self.pruned_at: Optional[int] = None

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> bool | None:
        value = metrics.get(self.monitor)
        if value is None:
            raise SynthgenError(f"the classifier reports no {self.monitor!r}; tuning needs a real validation split")
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            return True
        return None


@dataclass
class TrialScore:
    value: float  # best validation accuracy (fraction), the objective
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    pruned_at: Optional[int] = None
    train_s: float = 0.0


def score_images(syn, real_val, protocol, *, seed: int, runtime=None, trial=None,
                 callbacks: Sequence[Callback] = ()) -> TrialScore:
    """Train the protocol's classifier on ``syn`` (labels mapped onto ``real_val``'s classes by name)
    and validate on ``real_val`` every epoch; with ``trial``, report each epoch to it (pruning)."""
    from synthgen.train.cas import relabel_to_real, train_cas_classifier

    started = time.perf_counter()
    fit = relabel_to_real(syn, real_val.class_names)
    pruning = OptunaPruning(trial) if trial is not None else None
    extra = [pruning] if pruning is not None else []
    run = train_cas_classifier(fit, real_val, protocol, seed=seed, callbacks=[*extra, *callbacks], runtime=runtime)
    history = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in run.history]
    return TrialScore(
        value=float(run.metrics.get("best_val_acc", 0.0)),
        metrics={k: v for k, v in run.metrics.items() if k != "history"},
        history=history,
        pruned_at=pruning.pruned_at if pruning is not None else None,
        train_s=time.perf_counter() - started,
    )
