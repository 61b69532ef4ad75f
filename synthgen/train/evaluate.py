"""Evaluate a backbone on a labelled dataset: linear probe, weighted k-NN, or full fine-tuning.

The backbone is a ``synthgen pretrain`` checkpoint (its output folder), a fresh or
timm-pretrained model by name, or ``pixels`` (the normalised raw pixels, flattened — a baseline).

Protocols (``EvalConfig.protocol``); a validation split (``dataset.val_fraction``, stratified,
seeded) is always carved from the **train** split for model selection, the test split is only used
for the final number:

* ``linear`` — features are extracted once (frozen backbone, eval mode), standardised with the
  train statistics, and a linear classifier (softmax regression, Adam, full passes over the train
  features) is trained for each weight decay in ``linear.weight_decays``; the (weight decay, epoch)
  with the best validation top-1 is kept (early stopping after ``patience`` epochs without
  improvement) and scored on test. The probe is not retrained on train+val.
* ``knn`` — weighted k-NN as in Wu et al. (InstDisc) and DINO: features L2-normalised, the ``k``
  training images with the highest cosine similarity ``s`` vote for their class with weight
  ``exp(s / temperature)`` (0.07); top-1/top-5 rank classes by total vote. Every ``k`` is scored
  on test with the full train split as memory; the ``k`` with the best validation top-1 (memory:
  train minus val) is reported as ``selected_k`` and its numbers as the headline ``top1``/``top5``.
* ``finetune`` — the backbone plus a new linear head, trained end to end (cross-entropy with
  optional label smoothing, pad-4 crop + flip); the epoch with the best validation top-1 is scored.

Top-5 is reported when the dataset has at least 5 classes. :func:`evaluate` returns, and the CLI
writes as JSON, the numbers with the dataset ids/revisions/fingerprints, the resolved config, the
seed, the device and library versions.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthgen.errors import SynthgenError
from synthgen.provenance import library_versions
from synthgen.train.batches import resolve_normalization
from synthgen.train.callbacks import EarlyStopping
from synthgen.train.checkpoint import load_checkpoint as _load_checkpoint, load_model_state
from synthgen.train.classify import TrainConfig, evaluate_classifier, train_classifier
from synthgen.train.config import EvalConfig, ModelSpec, resolve_source
from synthgen.train.data import naming_split_setting, to_float
from synthgen.train.pretrain import CHECKPOINT_KIND, progress_bar
from synthgen.train.runtime import Runtime

__all__ = [
    "PixelFeatures",
    "load_checkpoint",
    "load_backbone",
    "extract_dataset_features",
    "topk_accuracy",
    "knn_scores",
    "knn_evaluate",
    "probe_batch_size",
    "linear_probe",
    "finetune",
    "evaluate",
]


class PixelFeatures(nn.Module):
    """The input pixels, flattened: ``[B, C*H*W]`` (a no-learning baseline backbone)."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.num_features = 3 * image_size * image_size

    def forward_features_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    forward = forward_features_pooled


def load_checkpoint(path: str | Path):
    """A pre-training checkpoint (:class:`~synthgen.train.checkpoint.Checkpoint`), from its output
    folder or its ``checkpoint.json``; a pickled ``.pt`` file is refused (unpickling runs code)."""
    p = Path(resolve_source(str(path), what="checkpoint"))
    return _load_checkpoint(p, kind=CHECKPOINT_KIND)


def load_backbone(checkpoint: str | Path | None = None, model: ModelSpec | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(backbone, info)``: the checkpoint's backbone (weights loaded) or ``model`` built fresh.

    ``info`` has ``image_size``, ``normalization`` (the checkpoint's mean/std, or None) and a
    ``description`` for the report.
    """
    from synthgen.train.models import create_model

    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        spec = ModelSpec.model_validate(state["model"])
        backbone = create_model(spec.name, 0, image_size=spec.image_size, pretrained=False, **spec.kwargs)
        tensors = state.model_state()
        weights = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        load_model_state(backbone, weights, str(state.path.parent))
        config = state.get("config", {})
        info = {
            "image_size": spec.image_size,
            "normalization": state.get("normalization"),
            "description": {
                "checkpoint": str(state.path.parent),
                "model": spec.model_dump(mode="json"),
                "pretrain": {
                    "name": config.get("name"),
                    "objective": config.get("objective", {}).get("kind"),
                    "step": state.get("step"),
                    "finished": state.get("finished"),
                    "dataset": config.get("dataset"),
                },
            },
        }
        return backbone, info
    if model is None:
        raise SynthgenError("give a checkpoint or a model")
    if model.name == "pixels":
        backbone: nn.Module = PixelFeatures(model.image_size)
    else:
        backbone = create_model(model.name, 0, image_size=model.image_size, pretrained=model.pretrained, **model.kwargs)
    return backbone, {"image_size": model.image_size, "normalization": None, "description": {"model": model.model_dump(mode="json")}}


@torch.inference_mode()
def extract_dataset_features(backbone: nn.Module, images: torch.Tensor, mean, std, runtime: Runtime, batch_size: int = 256,
                             on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Pooled features ``[N, D]`` (float32, on the runtime's device) of uint8 ``images``, backbone in
    eval mode; ``on_batch(n)`` is called after each batch of ``n`` images (a progress bar)."""
    from synthgen.train.models import extract_features

    backbone.eval()
    net = runtime.prepare(backbone, compile=False)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = to_float(runtime.to_device(images[start : start + batch_size]), mean, std)
        if net.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            f = extract_features(backbone, x)
        out.append(f.float())
        if on_batch is not None:
            on_batch(x.shape[0])
    return torch.cat(out) if out else torch.empty(0, int(getattr(backbone, "num_features", 0)), device=runtime.device)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` (top5 only when there are at least 5 classes)."""
    labels = labels.to(scores.device)
    out = {"top1": (scores.argmax(1) == labels).float().mean().item()}
    if num_classes >= 5:
        top5 = scores.topk(5, dim=1).indices
        out["top5"] = (top5 == labels[:, None]).any(1).float().mean().item()
    return out


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class votes ``[Nq, C]``: the k most cosine-similar train features vote ``exp(s / T)``."""
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[start : start + chunk].float().to(train.device), dim=1)
        sims, idx = (q @ train.t()).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_evaluate(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], num_classes: int, ks, temperature):
    per_k = {}
    for k in ks:
        val = topk_accuracy(knn_scores(feats["fit"], labels["fit"], feats["val"], k, num_classes, temperature), labels["val"], num_classes)
        test = topk_accuracy(knn_scores(feats["train"], labels["train"], feats["test"], k, num_classes, temperature), labels["test"], num_classes)
        per_k[str(k)] = {"val": val, "test": test}
    best = max(ks, key=lambda k: (per_k[str(k)]["val"]["top1"], -k))
    return {"selected_k": best, **per_k[str(best)]["test"], "val_top1": per_k[str(best)]["val"]["top1"], "per_k": per_k}


def probe_batch_size(n: int, batch_size: int, min_steps: int = 10) -> int:
    """The probe's batch: at most ``batch_size``, small enough for ``min_steps`` steps an epoch on
    ``n`` training features (a small subset at batch 1,024 would get one step an epoch)."""
    return max(1, min(batch_size, math.ceil(n / min_steps)))


def linear_probe(
    feats: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    num_classes: int,
    spec,
    runtime: Runtime,
    seed: int = 0,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Softmax regression on standardised features; (weight decay, epoch) selected on val.
    ``on_epoch(k, epoch, val_acc)`` is called after each epoch of the ``k``-th weight decay."""
    fit, val, test = feats["fit"], feats["val"], feats["test"]
    mu, sd = fit.mean(0, keepdim=True), fit.std(0, keepdim=True).clamp_min(1e-6)
    fit, val, test = (fit - mu) / sd, (val - mu) / sd, (test - mu) / sd
    y_fit, y_val = labels["fit"].to(fit.device), labels["val"].to(fit.device)
    bs = probe_batch_size(fit.shape[0], spec.batch_size)
    best: dict[str, Any] = {"val_top1": -1.0}
    curves = {}
    for k, wd in enumerate(spec.weight_decays):
        torch.manual_seed(seed)
        head = nn.Linear(fit.shape[1], num_classes).to(fit.device)
        opt = torch.optim.AdamW(head.parameters(), lr=spec.lr, weight_decay=0.0)
        runtime.reset_scaler()
        gen = torch.Generator().manual_seed(seed)
        stopper = EarlyStopping("val_acc", "max", spec.patience, restore_best=head)
        curve = []
        for epoch in range(1, spec.epochs + 1):
            head.train()
            perm = torch.randperm(fit.shape[0], generator=gen).to(fit.device)
            for start in range(0, fit.shape[0], bs):
                idx = perm[start : start + bs]
                # L2 penalty on the weights only (not the bias), scaled like sklearn's 1/C
                loss = F.cross_entropy(head(fit[idx]), y_fit[idx]) + 0.5 * wd * head.weight.pow(2).sum()
                runtime.step(loss, opt)
            head.eval()
            with torch.no_grad():
                acc = (head(val).argmax(1) == y_val).float().mean().item()
            curve.append(round(acc, 5))
            if on_epoch is not None:
                on_epoch(k, epoch, acc)
            if stopper.on_epoch_end(epoch, {"val_acc": acc}):
                break
        stopper.on_train_end()
        curves[str(wd)] = curve
        if stopper.best > best["val_top1"]:
            best = {"val_top1": stopper.best, "weight_decay": wd, "epoch": stopper.best_epoch,
                    "state": copy.deepcopy(head.state_dict())}
    head = nn.Linear(fit.shape[1], num_classes).to(fit.device)
    head.load_state_dict(best.pop("state"))
    with torch.no_grad():
        result = topk_accuracy(head(test), labels["test"], num_classes)
    return {**result, **best, "batch_size": bs, "val_curves": curves}


class _Classifier(nn.Module):
    """A backbone and a new linear head on its pooled features."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.num_features), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from synthgen.train.models import extract_features

        return self.head(extract_features(self.backbone, x))


def finetune(backbone: nn.Module, fit, val, test, num_classes: int, spec, mean, std, runtime: Runtime, seed: int = 0,
             quiet: bool = True) -> dict[str, Any]:
    """Train backbone + linear head end to end (the classification loop); test the epoch with the
    best validation top-1."""
    torch.manual_seed(seed)
    model = _Classifier(backbone, num_classes)
    world = runtime.world_size  # a fit set smaller than the batch caps it, to a size the processes split
    batch = spec.batch_size if spec.batch_size <= len(fit) else max(world, len(fit) // world * world)
    cfg = TrainConfig(
        epochs=spec.epochs, batch_size=batch, optimizer=spec.optimizer.name,
        lr=spec.optimizer.resolved_lr(spec.batch_size), weight_decay=spec.optimizer.weight_decay, betas=spec.optimizer.betas,
        momentum=spec.optimizer.momentum, nesterov=spec.optimizer.momentum > 0, label_smoothing=spec.label_smoothing,
        lr_schedule=spec.lr_schedule, warmup_steps=spec.warmup_steps, max_steps=spec.max_steps,
        grad_clip=spec.optimizer.grad_clip, augment=spec.augment,
    )
    best = EarlyStopping("val_acc", "max", patience=10**9, restore_best=model)
    res = train_classifier(model, fit, val, cfg, runtime=runtime, callbacks=[best], seed=seed, mean=mean, std=std,
                           quiet=quiet, desc="finetune")
    result = evaluate_classifier(model, test, mean=mean, std=std, runtime=runtime)
    out = {"top1": result["top1"]}
    if num_classes >= 5:
        out["top5"] = result["top5"]
    history = [{"epoch": h["epoch"], "train_loss": h["train_loss"], "val_top1": h["val_acc"]} for h in res.history]
    return {**out, "val_top1": best.best, "epoch": best.best_epoch, "steps": res.steps, "history": history}


def _resolve_dataset_splits(config: EvalConfig, image_size: int):
    from synthgen.train.data import load_image_dataset, relabel_by_name, split_train_val

    spec = config.dataset
    source = resolve_source(spec.source)
    kw = dict(
        revision=spec.revision,
        image_column=spec.image_column,
        label_column=spec.label_column,
        image_size=spec.image_size or image_size,
        require_labels=True,
    )

    def load(field: str, limit: int | None):
        with naming_split_setting(f"name another with --set dataset.{field}=<split>"):  # a build has only train
            return load_image_dataset(source, getattr(spec, field), limit=limit, **kw)

    train = load("train_split", spec.train_limit)
    test = load("test_split", spec.test_limit)
    if train.class_names is not None and test.class_names is not None and test.class_names != train.class_names:
        # each split numbers its own (string) class names: put the test labels in the train split's ids
        test = relabel_by_name(test, train.class_names, what=f"test split {spec.test_split!r}",
                               target=f"train split {spec.train_split!r}")
    fit, val = split_train_val(train, spec.val_fraction, config.seed)
    return train, test, fit, val


def evaluate(config: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run ``config`` and return the report (see the module docstring)."""
    t0 = time.time()
    rt = Runtime.create(config.device, amp=config.amp)
    torch.manual_seed(config.seed)
    backbone, info = load_backbone(config.checkpoint, config.model)
    train, test, fit, val = _resolve_dataset_splits(config, info["image_size"])
    num_classes = max(train.num_classes or 0, int(train.labels.max()) + 1, int(test.labels.max()) + 1)
    if config.normalization is None and info["normalization"] is not None:
        mean, std = tuple(info["normalization"]["mean"]), tuple(info["normalization"]["std"])
        norm_kind = "checkpoint"
    else:
        norm_kind = config.normalization or "dataset"
        mean, std = resolve_normalization(norm_kind, fit.images)

    if config.protocol in ("linear", "knn"):
        parts = {"fit": fit, "val": val, "test": test}
        if config.protocol == "knn":
            parts["train"] = train
        labels = {k: ds.labels.to(rt.device) for k, ds in parts.items()}
        with progress_bar(progress and rt.is_main) as bar:
            task = bar.add_task(f"{config.name}: features", total=sum(len(ds) for ds in parts.values()), info="")
            feats = {}
            for k, ds in parts.items():
                bar.update(task, info=k)
                feats[k] = extract_dataset_features(backbone, ds.images, mean, std, rt, config.feature_batch_size,
                                                    on_batch=lambda n: bar.advance(task, n))
            if config.protocol == "knn":
                result = knn_evaluate(feats, labels, num_classes, config.knn.k, config.knn.temperature)
            else:
                spec = config.linear
                probe = bar.add_task(f"{config.name}: linear probe", total=len(spec.weight_decays) * spec.epochs, info="")

                def on_epoch(k: int, epoch: int, acc: float) -> None:
                    bar.update(probe, completed=k * spec.epochs + epoch,
                               info=f"weight decay {spec.weight_decays[k]:g} epoch {epoch} val top-1 {acc:.4f}")

                result = linear_probe(feats, labels, num_classes, spec, rt, seed=config.seed, on_epoch=on_epoch)
                bar.update(probe, completed=len(spec.weight_decays) * spec.epochs)  # the rest stopped early
        result["feature_dim"] = int(feats["fit"].shape[1])
    else:
        if isinstance(backbone, PixelFeatures):
            raise SynthgenError("fine-tuning needs a trainable model, not 'pixels'")
        result = finetune(backbone, fit, val, test, num_classes, config.finetune, mean, std, rt, seed=config.seed, quiet=not progress)
    return {
        "name": config.name,
        "protocol": config.protocol,
        "top1": result["top1"],
        "top5": result.get("top5"),
        "num_classes": num_classes,
        "result": result,
        "backbone": info["description"],
        "datasets": {
            "train": train.source,
            "test": test.source,
            "sizes": {"train": len(train), "fit": len(fit), "val": len(val), "test": len(test)},
        },
        "normalization": {"kind": norm_kind, "mean": list(mean), "std": list(std)},
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "device": rt.describe(),
        "runtime": rt.settings(),
        "versions": library_versions(),
        "elapsed_s": round(time.time() - t0, 2),
    }


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return p
