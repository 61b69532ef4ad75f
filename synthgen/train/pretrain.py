"""Self-supervised pre-training: rotation prediction, SimCLR, StableRep.

``pretrain(config, out_dir)`` trains ``config.model`` (a feature extractor from
:func:`synthgen.train.models.create_model` with ``num_classes=0``) plus an objective head:

* ``rotation`` - a linear 4-way classifier on the pooled features; every batch of ``batch_size``
  images becomes ``4 * batch_size`` rotated copies (:func:`~synthgen.train.losses.rotate_batch`).
* ``simclr`` - two :class:`~synthgen.train.augment.ContrastiveAugment` views per image, an MLP
  projection, :func:`~synthgen.train.losses.nt_xent_loss`.
* ``stablerep`` - batches of ``groups_per_batch`` captions x ``images_per_group`` images from
  :class:`~synthgen.train.samplers.GroupBatchSampler`, one augmented view per image, an MLP
  projection, :func:`~synthgen.train.losses.multi_positive_contrastive_loss`.

The training set is one split, a mixture of sources (``dataset.sources``; rows per source are
recorded), or a stream of parquet shards (``dataset.stream``). Device, precision, compile mode and
DDP come from :class:`~synthgen.train.runtime.Runtime`: under ``torchrun`` each process takes its
share of every global batch, contrastive losses gather the features of the whole global batch, and
only rank 0 writes. The rate schedule (warm-up, cosine) is sized to the steps actually run.

The output folder holds the checkpoint (:mod:`synthgen.train.checkpoint`: ``model.safetensors``
with ``backbone.*``/``head.*``, ``optimizer.safetensors``, ``checkpoint.json``), ``config.yaml`` and
``metrics.json``. Running the same config into the same folder resumes from the checkpoint (written
every ``checkpoint_every`` epochs, at the end, and on Ctrl-C); a finished run is not repeated. A
resumed run ends with the weights an uninterrupted one would have: augmentation draws are a function
of (seed, epoch, batch), and Ctrl-C waits for the step under way to finish before the save.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from synthgen.errors import SynthgenError
from synthgen.prompts.base import stable_uint64
from synthgen.provenance import library_versions
from synthgen.train.augment import ContrastiveAugment, random_crop_flip
from synthgen.train.batches import TensorBatches, resolve_normalization
from synthgen.train.checkpoint import atomic_write_text, has_checkpoint, load_checkpoint, load_model_state, save_checkpoint
from synthgen.train.config import (
    PretrainConfig,
    RotationObjective,
    SimCLRObjective,
    StableRepObjective,
    config_hash,
    resolve_source,
)
from synthgen.train.data import to_float
from synthgen.train.losses import multi_positive_contrastive_loss, nt_xent_loss, rotate_batch, rotation_loss
from synthgen.train.optim import build_optimizer, make_scheduler
from synthgen.train.runtime import Runtime
from synthgen.train.samplers import GroupBatchSampler

__all__ = [
    "PretrainResult",
    "pretrain",
    "build_head",
    "make_optimizer",
    "make_scheduler",
    "progress_bar",
    "load_pretrain_dataset",
    "CHECKPOINT_KIND",
]

CHECKPOINT_KIND = "synthgen-pretrain"
# Settings that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"log_every", "checkpoint_every", "device", "compile"}


@dataclass
class PretrainResult:
    out_dir: Path
    checkpoint: Path
    metrics: dict[str, Any]
    resumed_from_step: int | None = None


# --------------------------------------------------------------------------------------------------
# helpers shared with evaluate.py
# --------------------------------------------------------------------------------------------------
def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> nn.Module:
    if layers == 1:
        return nn.Linear(d_in, d_out)
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


def build_head(objective, num_features: int) -> nn.Module:
    """The objective's head on top of the pooled backbone features."""
    if isinstance(objective, RotationObjective):
        return nn.Linear(num_features, 4)
    hidden = objective.projection_hidden or num_features
    return _mlp(num_features, hidden, objective.projection_dim, objective.projection_layers)


class _Trainee(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from synthgen.train.models import extract_features

        return self.head(extract_features(self.backbone, x))


def decay_groups(model: nn.Module, weight_decay: float, exempt_bias_and_norm: bool) -> list[dict]:
    """Parameter groups; with ``exempt_bias_and_norm`` (StableRep's ``add_weight_decay``) biases and
    1-d parameters (norm layers' scales and shifts) get no weight decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not exempt_bias_and_norm:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    exempt = [p for n, p in params if p.ndim < 2 or n.endswith("bias")]
    decay = [p for n, p in params if not (p.ndim < 2 or n.endswith("bias"))]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def make_optimizer(spec, model: nn.Module, images_per_batch: int) -> torch.optim.Optimizer:
    """The optimizer an :class:`OptimizerSpec` describes (SGD uses Nesterov momentum when any)."""
    groups = decay_groups(model, spec.weight_decay, spec.decay_exempt_bias_and_norm)
    return build_optimizer(
        groups, spec.name, lr=spec.resolved_lr(images_per_batch), betas=tuple(spec.betas),
        weight_decay=spec.weight_decay, momentum=spec.momentum, nesterov=spec.momentum > 0,
    )


def progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    # on stderr, as the build's: stdout keeps the results (and stays clean when redirected)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False, console=Console(stderr=True),
    )


def _config_change(state: dict, config: PretrainConfig) -> str:
    """`` (differs in: a.b, c)``: the settings that keep ``config`` from resuming ``state``'s run."""
    from synthgen.dataset.folder import changed_keys, shown_keys

    try:
        keys = changed_keys(json.loads(state["resume_key"]), json.loads(_resume_key(config)))
    except (KeyError, TypeError, ValueError):  # a checkpoint without a readable key: say nothing more
        return ""
    return f" (differs in: {shown_keys(keys)})" if keys else ""


# what a checkpoint write leaves in its folder (``<name>.tmp<pid>`` while it writes), and evaluate's reports
_RUN_FILES = {"model.safetensors", "optimizer.safetensors", "checkpoint.json", "config.yaml", "metrics.json", "eval"}


def _check_fresh_out(out: Path) -> None:
    """A new run goes into an empty or new folder (or one a crash left before its first checkpoint
    finished), never among other files: a dataset folder or a source tree would get a checkpoint."""
    if out.exists() and not out.is_dir():
        raise SynthgenError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return
    other = sorted(p.name for p in out.iterdir() if p.name.split(".tmp")[0] not in _RUN_FILES)
    if other:
        shown = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
        raise SynthgenError(f"{out} holds other files ({shown}) and no checkpoint; choose an empty or new --out")


def _resume_key(config: PretrainConfig) -> str:
    data = config.model_dump(mode="json")
    for key in _RESUMABLE_CHANGES:
        data.pop(key, None)
    data["schedule"].pop("max_steps", None)
    data["dataset"].pop("num_workers", None)
    return json.dumps(data, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def load_pretrain_dataset(config: PretrainConfig, runtime: Runtime | None = None):
    """``(dataset, rows per source)``: an ImageTensorDataset, or a StreamBatches with ``dataset.stream``."""
    from synthgen.train.data import load_image_dataset, naming_split_setting
    from synthgen.train.sources import load_mixture

    spec = config.dataset
    group_column = spec.group_column
    if isinstance(config.objective, StableRepObjective) and group_column is None:
        group_column = "group"
    size = spec.image_size or config.model.image_size
    if spec.sources is not None:
        return load_mixture(spec.sources, image_size=size, group_column=group_column, seed=config.seed)
    if spec.stream:
        from synthgen.train.stream import StreamBatches

        if isinstance(config.objective, StableRepObjective):
            raise SynthgenError("dataset.stream does not serve stablerep (its batches pick images by caption); decode the split instead")
        with naming_split_setting("name another with --set dataset.split=<split>"):
            stream = StreamBatches(resolve_source(spec.source), spec.split, runtime or Runtime.create(config.device),
                                   revision=spec.revision, image_column=spec.image_column, image_size=size,
                                   num_workers=spec.num_workers, seed=config.seed, limit=spec.limit, labels=False)
        return stream, None
    with naming_split_setting("name another with --set dataset.split=<split>"):
        ds = load_image_dataset(resolve_source(spec.source), spec.split, revision=spec.revision, image_column=spec.image_column,
                                label_column=spec.label_column, group_column=group_column, image_size=size, limit=spec.limit)
    return ds, None


def _gather(x: torch.Tensor, rt: Runtime, grad: bool) -> torch.Tensor:
    """The whole global batch of ``x`` on every process (with gradients flowing back when ``grad``)."""
    if not rt.distributed:
        return x
    import torch.distributed as dist

    if grad:
        import torch.distributed.nn.functional as dnn

        return torch.cat(dnn.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(rt.world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def objective_loss(obj, net, x_u8: torch.Tensor, groups, rt: Runtime, aug, mean, std, gen) -> tuple[torch.Tensor, dict]:
    """One step's loss of ``obj`` on a (local) uint8 batch; contrastive losses see the global batch."""
    extra: dict = {}
    if isinstance(obj, RotationObjective):
        x = to_float(x_u8, mean, std)
        if obj.augment == "crop_flip":
            x = random_crop_flip(x, generator=gen)
        x4, y4 = rotate_batch(x)
        with rt.autocast():
            logits = net(x4)
        loss = rotation_loss(logits, y4)
        extra["acc"] = (logits.detach().argmax(1) == y4).float().mean()
    elif isinstance(obj, SimCLRObjective):
        n = x_u8.shape[0]
        with rt.autocast():
            z = net(torch.cat([aug(x_u8, gen), aug(x_u8, gen)]))
        z1, z2 = _gather(z[:n].float(), rt, True), _gather(z[n:].float(), rt, True)
        loss = nt_xent_loss(z1, z2, temperature=obj.temperature)
    else:
        with rt.autocast():
            z = net(aug(x_u8, gen))
        loss = multi_positive_contrastive_loss(_gather(z, rt, True), _gather(groups, rt, False), temperature=obj.temperature).float()
    return loss, extra


def augment_generator(seed: int, epoch: int, batch_index: int, rank: int = 0) -> torch.Generator:
    """The generator of one batch's augmentation draws, a function of (seed, epoch, batch, process)
    alone: a run resumed mid-epoch skips the batches it had done and still draws what an
    uninterrupted run draws for the rest."""
    return torch.Generator().manual_seed(stable_uint64("pretrain-augment", seed, epoch, batch_index, rank) & (2**63 - 1))


class _StepLosses:
    """Each step's global-batch loss (and accuracy), kept on the device until :meth:`read` copies
    them to the host lists in one go: reading a GPU value every step would make the host wait for
    the GPU every step. A non-finite loss is found at that read, which comes before any checkpoint
    is written, so a checkpoint never holds the weights that followed it."""

    def __init__(self, losses: list[float], accs: list[float], epoch_losses: list[float]) -> None:
        self.losses, self.accs, self.epoch_losses = losses, accs, epoch_losses
        self.pending: list[torch.Tensor] = []
        self.pending_acc: list[torch.Tensor] = []

    def add(self, rt: Runtime, loss: torch.Tensor, acc: torch.Tensor | None) -> None:
        """This step's values, averaged over the processes in one collective (loss and accuracy
        together). Every step, not at :meth:`read`: a Ctrl-C reads on one process alone."""
        if acc is None:
            self.pending.append(rt.all_reduce_mean(loss))
            return
        loss, acc = rt.all_reduce_mean(torch.stack([loss.float(), acc.float()])).unbind()
        self.pending.append(loss)
        self.pending_acc.append(acc)

    def read(self, step: int) -> None:
        """Move the pending values to the lists; ``step``: steps done, the last pending one included."""
        if not self.pending:
            return
        values = torch.stack(self.pending).tolist()
        accs = torch.stack(self.pending_acc).tolist() if self.pending_acc else []
        self.pending.clear()
        self.pending_acc.clear()
        for k, value in enumerate(values):
            if not math.isfinite(value):
                at = step - len(values) + k  # the step's number as counted before it ran (0-based)
                raise SynthgenError(f"loss became {value} at step {at}; lower optimizer.lr")
        self.losses.extend(values)
        self.epoch_losses.extend(values)
        self.accs.extend(accs)


class _WholeSteps:
    """Keeps Ctrl-C between training steps, so the checkpoint it saves is the state after the last
    whole step and a resumed run repeats nothing.

    A SIGINT during a step is held until the step (update and bookkeeping) is done, then raised; a
    second one raises at once. For a KeyboardInterrupt raised inside a step anyway (that second
    Ctrl-C, a hook, a thread other than the main one), :meth:`drop_unfinished` puts back the module
    buffers - BatchNorm's running statistics, which the step's forward pass has already moved - so
    the saved state is that before the step (parameters too, unless it struck inside the update)."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = [b for b in model.buffers()]
        self.saved = [b.detach().clone() for b in self.buffers]
        self.in_step = self.held = False
        self.installed = False

    def __enter__(self) -> _WholeSteps:
        # only where Ctrl-C would raise KeyboardInterrupt anyway (not under a custom or ignoring handler)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._on_sigint)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.installed = False

    def _on_sigint(self, signum, frame) -> None:
        if self.in_step and not self.held:
            self.held = True
            return
        raise KeyboardInterrupt

    def begin(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)
        self.in_step = True

    def end(self) -> None:
        self.in_step = False
        if self.held:
            self.held = False
            raise KeyboardInterrupt

    def drop_unfinished(self) -> None:
        if self.in_step and self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)
        self.in_step = False


# --------------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------------
def pretrain(
    config: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    dataset=None,
    runtime: Runtime | None = None,
) -> PretrainResult:
    """Train ``config`` into ``out_dir``; see the module docstring. ``dataset`` (an
    :class:`~synthgen.train.data.ImageTensorDataset`) skips loading ``config.dataset``. Nothing is
    written before the data has loaded and the checkpoint (when resuming) has been checked."""
    from synthgen.train.models import create_model

    out = Path(out_dir)
    rt = runtime or Runtime.create(config.device, amp=config.amp, compile=config.compile, channels_last=config.channels_last)
    obj = config.objective
    torch.manual_seed(config.seed)
    state = None
    if has_checkpoint(out):
        if not resume:
            raise SynthgenError(f"{out} already holds a checkpoint; use another --out, or resume")
        state = load_checkpoint(out, kind=CHECKPOINT_KIND)
        if state.get("resume_key") != _resume_key(config):
            raise SynthgenError(f"{out} was trained with a different config{_config_change(state, config)}; "
                                "use another --out (or the same settings to resume)")
    else:
        _check_fresh_out(out)

    ds, mixture_rows = (dataset, None) if dataset is not None else load_pretrain_dataset(config, rt)
    streamed = not hasattr(ds, "images")
    if len(ds) == 0:
        raise SynthgenError("the pre-training dataset is empty")
    if state is not None:
        mean, std = tuple(state["normalization"]["mean"]), tuple(state["normalization"]["std"])
    elif streamed and config.normalization == "dataset":
        mean, std = ds.channel_stats()
    else:
        mean, std = resolve_normalization(config.normalization, None if streamed else ds.images)
    size = config.model.image_size

    # batches per epoch (global batches; each process takes its share)
    sampler = None
    if isinstance(obj, StableRepObjective):
        if ds.groups is None:
            raise SynthgenError("stablerep needs a group (caption id) column; set dataset.group_column")
        sampler = GroupBatchSampler(ds.groups, obj.groups_per_batch, obj.images_per_group, seed=config.seed, short_groups=obj.short_groups)
        steps_per_epoch, batch = len(sampler), sampler.batch_size
        if steps_per_epoch == 0:
            raise SynthgenError(f"{sampler.num_groups} usable groups < groups_per_batch={obj.groups_per_batch}: not one full batch")
    else:
        batch = obj.batch_size
        if len(ds) < batch:
            raise SynthgenError(f"{len(ds)} images < batch_size={batch}: not one full batch")
    if batch % rt.world_size:
        raise SynthgenError(f"the global batch ({batch} images) does not split evenly over {rt.world_size} processes")
    if sampler is None:
        # a stream's batches: under DDP the fewest full batches any process has in any epoch
        steps_per_epoch = ds.batches_per_epoch(batch, config.schedule.epochs) if streamed else len(ds) // batch
        if steps_per_epoch == 0:
            raise SynthgenError(f"{len(ds)} streamed images give a process no full batch of {batch // rt.world_size}; "
                                "lower objective.batch_size")
    total_steps = config.schedule.epochs * steps_per_epoch
    if config.schedule.max_steps is not None:
        total_steps = min(total_steps, config.schedule.max_steps)

    backbone = create_model(config.model.name, 0, image_size=size, pretrained=config.model.pretrained, **config.model.kwargs)
    model = _Trainee(backbone, build_head(obj, int(backbone.num_features))).to(rt.device)
    optimizer = make_optimizer(config.optimizer, model, batch)
    scheduler = make_scheduler(optimizer, total_steps, config.schedule.warmup(steps_per_epoch), config.schedule.lr_schedule)

    step, history, epochs_log, elapsed_before, resumed_from = 0, [], [], 0.0, None
    rt.reset_scaler()
    if state is not None:
        tensors = state.model_state()
        load_model_state(model, tensors, str(out))
        optimizer.load_state_dict(state.optimizer_state())
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            rt.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        history, epochs_log = list(state.get("history", [])), list(state.get("epochs_log", []))
        elapsed_before = float(state.get("elapsed_s", 0.0))
        resumed_from = step
    # the rows of one training forward: four rotations of each image, or SimCLR's two views of it
    views = 4 if isinstance(obj, RotationObjective) else 2 if isinstance(obj, SimCLRObjective) else 1
    net = rt.prepare(model, batch_size=(batch // rt.world_size) * views)

    aug = None
    if not isinstance(obj, RotationObjective):
        a = obj.augment
        aug = ContrastiveAugment(size=size, mean=mean, std=std, scale=tuple(a.scale), strength=a.strength,
                                 jitter_p=a.jitter_p, grayscale_p=a.grayscale_p, blur_p=a.blur_p, flip_p=a.flip_p)

    resolved = config.model_dump(mode="json")
    resolved["dataset"]["resolved_source"] = ds.source
    t0 = time.time()

    def metrics_doc(finished: bool) -> dict:
        losses = [h["loss"] for h in history]
        return {
            "name": config.name, "objective": obj.kind, "finished": finished, "step": step, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "images": len(ds), "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "history": history, "epochs": epochs_log,
            "elapsed_s": round(elapsed_before + (time.time() - t0), 2), "device": rt.describe(), "runtime": rt.settings(),
            "dataset": ds.source, "rows_per_source": mixture_rows, "seed": config.seed,
            "config_hash": config_hash(config), "versions": library_versions(),
        }

    def save(finished: bool) -> None:
        if not rt.is_main:
            return
        doc = metrics_doc(finished)
        save_checkpoint(out, model.state_dict(), {
            "kind": CHECKPOINT_KIND, "scheduler": scheduler.state_dict(),
            "scaler": rt.scaler.state_dict() if rt.scaler.is_enabled() else None, "step": step, "finished": finished,
            "config": resolved, "resume_key": _resume_key(config), "model": config.model.model_dump(mode="json"),
            "num_features": int(model.backbone.num_features),
            "normalization": {"mean": list(mean), "std": list(std), "kind": config.normalization},
            "history": history, "epochs_log": epochs_log, "elapsed_s": doc["elapsed_s"],
            # losses since the last log record and of the epoch so far, so a resumed run logs the same means
            "unlogged": {"loss": window, "acc": window_acc, "epoch": epoch_losses},
        }, optimizer)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2, default=str) + "\n")

    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if step >= total_steps:
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else metrics_doc(True)
        return PretrainResult(out, out / "checkpoint.json", metrics, resumed_from)

    tensors_data = None if streamed else TensorBatches(ds, rt, require_labels=False)

    def epoch_batches(epoch: int, gen: torch.Generator):
        if streamed:
            yield from ((x, None) for x, _ in ds.epoch(batch, epoch, drop_last=True, batches=steps_per_epoch))
            return
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = [torch.tensor(b) for b in sampler]
        else:
            perm = torch.randperm(len(ds), generator=gen)
            order = list(perm[: steps_per_epoch * batch].view(steps_per_epoch, batch))
        for idx in order:
            local = rt.shard(idx)
            x, _ = tensors_data.take(local)
            yield x, None if tensors_data.groups is None else tensors_data.groups[rt.to_device(local)]

    model.train()
    unlogged = state.get("unlogged", {}) if state is not None else {}
    window: list[float] = list(unlogged.get("loss", []))
    window_acc: list[float] = list(unlogged.get("acc", []))
    epoch_losses: list[float] = list(unlogged.get("epoch", []))
    steps = _WholeSteps(model)
    on_device = _StepLosses(window, window_acc, epoch_losses)
    try:
        with steps, progress_bar(progress and rt.is_main) as bar:
            task = bar.add_task(f"pretrain {config.name} ({obj.kind})", total=total_steps, completed=step, info="")
            for epoch in range(step // steps_per_epoch, config.schedule.epochs):
                if step >= total_steps:
                    break
                gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)  # the epoch's batch order
                skip = step - epoch * steps_per_epoch  # batches of this epoch done before a resume
                if skip == 0:
                    epoch_losses.clear()
                elif epochs_log and epochs_log[-1]["epoch"] == epoch:
                    epochs_log.pop()  # a max_steps cut logged this epoch part-done; it is logged whole below
                for i, (x, groups) in enumerate(epoch_batches(epoch, gen)):
                    if step >= total_steps:
                        break
                    if i < skip:
                        continue
                    steps.begin()
                    aug_gen = augment_generator(config.seed, epoch, i, rt.rank)
                    loss, extra = objective_loss(obj, net, x, groups, rt, aug, mean, std, aug_gen)
                    rt.step(loss, optimizer, model.parameters(), config.optimizer.grad_clip)
                    scheduler.step()
                    step += 1
                    on_device.add(rt, loss.detach(), extra.get("acc"))
                    if step % config.log_every == 0 or step == total_steps or step == 1:
                        on_device.read(step)
                        rec = {"step": step, "epoch": epoch, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0]}
                        if window_acc:
                            rec["acc"] = sum(window_acc) / len(window_acc)
                        history.append(rec)
                        window.clear()
                        window_acc.clear()
                        bar.update(task, info=f"epoch {epoch + 1}/{config.schedule.epochs} loss {epoch_losses[-1]:.4f}")
                    bar.update(task, completed=step)
                    steps.end()
                on_device.read(step)  # before the epoch is logged or checkpointed
                if epoch_losses:
                    epochs_log.append({"epoch": epoch, "mean_loss": sum(epoch_losses) / len(epoch_losses), "steps": len(epoch_losses)})
                if (epoch + 1) % config.checkpoint_every == 0 and step < total_steps:
                    save(False)
    except KeyboardInterrupt:
        steps.drop_unfinished()
        on_device.read(step)  # raises instead if a step since the last read had a non-finite loss
        save(False)
        raise
    save(True)
    result = PretrainResult(out, out / "checkpoint.json", metrics_doc(True), resumed_from)
    if runtime is None:
        rt.close()  # leave the process group this call joined
    return result
