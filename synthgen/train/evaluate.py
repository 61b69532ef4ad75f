"""Evaluate a backbone on a labelled dataset: linear probe, weighted k-NN, or full fine-tuning.

The backbone is a ``synthgen pretrain`` checkpoint (its folder or ``checkpoint.pt``), a fresh or
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
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthgen.errors import SynthgenError
from synthgen.train.optim import optimizer_step
from synthgen.provenance import library_versions
from synthgen.train.augment import normalize, random_crop_flip, to_unit_float
from synthgen.train.config import EvalConfig, ModelSpec, resolve_source
from synthgen.train.pretrain import (
    CHECKPOINT_NAME,
    autocast_context,
    device_description,
    make_optimizer,
    make_scheduler,
    progress_bar,
    resolve_device,
    resolve_normalization,
)

__all__ = [
    "PixelFeatures",
    "load_checkpoint",
    "load_backbone",
    "extract_dataset_features",
    "topk_accuracy",
    "knn_scores",
    "knn_evaluate",
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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A pre-training checkpoint, from its file or its output folder."""
    p = Path(resolve_source(str(path), what="checkpoint"))
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise SynthgenError(f"no checkpoint at {p} (run `synthgen pretrain` into that folder first)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SynthgenError(f"cannot read checkpoint {p}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("kind") != "synthgen-pretrain":
        raise SynthgenError(f"{p} is not a synthgen pre-training checkpoint")
    state["path"] = str(p)
    return state


def load_backbone(
    checkpoint: str | Path | None = None, model: ModelSpec | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """``(backbone, info)``: the checkpoint's backbone (weights loaded) or ``model`` built fresh.

    ``info`` has ``image_size``, ``normalization`` (the checkpoint's mean/std, or None) and a
    ``description`` for the report.
    """
    from synthgen.train.models import create_model

    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        spec = ModelSpec.model_validate(state["model"])
        backbone = create_model(spec.name, 0, image_size=spec.image_size, pretrained=False, **spec.kwargs)
        backbone.load_state_dict(state["backbone"])
        info = {
            "image_size": spec.image_size,
            "normalization": state.get("normalization"),
            "description": {
                "checkpoint": state["path"],
                "model": spec.model_dump(mode="json"),
                "pretrain": {
                    "name": state["config"].get("name"),
                    "objective": state["config"].get("objective", {}).get("kind"),
                    "step": state.get("step"),
                    "finished": state.get("finished"),
                    "dataset": state["config"].get("dataset"),
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


@torch.no_grad()
def extract_dataset_features(
    backbone: nn.Module,
    images: torch.Tensor,
    mean,
    std,
    device: torch.device,
    batch_size: int = 256,
    amp: bool = True,
) -> torch.Tensor:
    """Pooled features ``[N, D]`` (float32, on ``device``) of uint8 ``images``, backbone in eval mode."""
    from synthgen.train.models import extract_features

    backbone.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(to_unit_float(images[start : start + batch_size].to(device, non_blocking=True)), mean, std)
        with autocast_context(device, amp):
            f = extract_features(backbone, x)
        out.append(f.float())
    return torch.cat(out) if out else torch.empty(0, int(getattr(backbone, "num_features", 0)), device=device)


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


def linear_probe(
    feats: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    num_classes: int,
    spec,
    seed: int = 0,
    progress=None,
) -> dict[str, Any]:
    """Softmax regression on standardised features; (weight decay, epoch) selected on val."""
    fit, val, test = feats["fit"], feats["val"], feats["test"]
    mu, sd = fit.mean(0, keepdim=True), fit.std(0, keepdim=True).clamp_min(1e-6)
    fit, val, test = (fit - mu) / sd, (val - mu) / sd, (test - mu) / sd
    y_fit, y_val = labels["fit"].to(fit.device), labels["val"].to(fit.device)
    best: dict[str, Any] = {"val_top1": -1.0}
    curves = {}
    for wd in spec.weight_decays:
        torch.manual_seed(seed)
        head = nn.Linear(fit.shape[1], num_classes).to(fit.device)
        opt = torch.optim.AdamW(head.parameters(), lr=spec.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        since_best, wd_best, curve = 0, -1.0, []
        for epoch in range(spec.epochs):
            head.train()
            perm = torch.randperm(fit.shape[0], generator=gen).to(fit.device)
            for start in range(0, fit.shape[0], spec.batch_size):
                idx = perm[start : start + spec.batch_size]
                loss = F.cross_entropy(head(fit[idx]), y_fit[idx])
                # L2 penalty on the weights only (not the bias), scaled like sklearn's 1/C
                loss = loss + 0.5 * wd * head.weight.pow(2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            head.eval()
            with torch.no_grad():
                acc = (head(val).argmax(1) == y_val).float().mean().item()
            curve.append(round(acc, 5))
            if acc > best["val_top1"]:
                best = {"val_top1": acc, "weight_decay": wd, "epoch": epoch + 1, "state": copy.deepcopy(head.state_dict())}
            if acc > wd_best:
                wd_best, since_best = acc, 0
            else:
                since_best += 1
                if since_best >= spec.patience:
                    break
        curves[str(wd)] = curve
    head = nn.Linear(fit.shape[1], num_classes).to(fit.device)
    head.load_state_dict(best.pop("state"))
    with torch.no_grad():
        result = topk_accuracy(head(test), labels["test"], num_classes)
    return {**result, **best, "val_curves": curves}


def finetune(
    backbone: nn.Module,
    data: dict[str, Any],
    num_classes: int,
    spec,
    mean,
    std,
    device: torch.device,
    seed: int = 0,
    amp: bool = True,
    progress: bool = True,
    feature_batch_size: int = 256,
) -> dict[str, Any]:
    """Train backbone + linear head end to end; test the epoch with the best validation top-1."""
    from synthgen.train.models import extract_features

    torch.manual_seed(seed)
    model = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(int(backbone.num_features), num_classes)}).to(device)
    cuda = device.type == "cuda"
    mf = torch.channels_last if cuda else torch.contiguous_format
    if cuda:
        model = model.to(memory_format=torch.channels_last)

    def forward(x):
        with autocast_context(device, amp):
            return model["head"](extract_features(model["backbone"], x.contiguous(memory_format=mf))).float()

    @torch.no_grad()
    def scores(images):
        model.eval()
        out = []
        for start in range(0, images.shape[0], feature_batch_size):
            x = normalize(to_unit_float(images[start : start + feature_batch_size].to(device)), mean, std)
            out.append(forward(x))
        return torch.cat(out)

    x_fit, y_fit = data["fit_images"], data["fit_labels"]
    n = x_fit.shape[0]
    bs = min(spec.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = spec.epochs * steps_per_epoch
    if spec.max_steps:
        total = min(total, spec.max_steps)
    optimizer = make_optimizer(spec.optimizer, model.parameters())
    scheduler = make_scheduler(optimizer, total, spec.warmup_steps, spec.lr_schedule)
    use_scaler = cuda and amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    gen = torch.Generator().manual_seed(seed)
    best: dict[str, Any] = {"val_top1": -1.0}
    history = []
    step = 0
    with progress_bar(progress) as bar:
        task = bar.add_task("finetune", total=total, info="")
        for epoch in range(spec.epochs):
            if step >= total:
                break
            model.train()
            perm = torch.randperm(n, generator=gen)
            losses = []
            for start in range(0, steps_per_epoch * bs, bs):
                if step >= total:
                    break
                idx = perm[start : start + bs]
                x = to_unit_float(x_fit[idx].to(device, non_blocking=True))
                if spec.augment == "crop_flip":
                    x = random_crop_flip(x, generator=gen)
                logits = forward(normalize(x, mean, std))
                loss = F.cross_entropy(logits, y_fit[idx].to(device), label_smoothing=spec.label_smoothing)
                optimizer_step(loss, optimizer, scaler, model.parameters(), spec.optimizer.grad_clip)
                scheduler.step()
                step += 1
                losses.append(loss.item())
                bar.update(task, completed=step, info=f"epoch {epoch + 1} loss {losses[-1]:.4f}")
            val = topk_accuracy(scores(data["val_images"]), data["val_labels"], num_classes)["top1"]
            history.append({"epoch": epoch + 1, "train_loss": sum(losses) / max(1, len(losses)), "val_top1": val})
            if val > best["val_top1"]:
                best = {"val_top1": val, "epoch": epoch + 1, "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best.pop("state"))
    result = topk_accuracy(scores(data["test_images"]), data["test_labels"], num_classes)
    return {**result, **best, "steps": step, "history": history}


def _resolve_dataset_splits(config: EvalConfig, image_size: int):
    from synthgen.train.data import load_image_dataset, split_train_val

    spec = config.dataset
    source = resolve_source(spec.source)
    kw = dict(
        revision=spec.revision,
        image_column=spec.image_column,
        label_column=spec.label_column,
        image_size=spec.image_size or image_size,
        require_labels=True,
    )
    train = load_image_dataset(source, spec.train_split, limit=spec.train_limit, **kw)
    test = load_image_dataset(source, spec.test_split, limit=spec.test_limit, **kw)
    fit, val = split_train_val(train, spec.val_fraction, config.seed)
    return train, test, fit, val


def evaluate(config: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run ``config`` and return the report (see the module docstring)."""
    t0 = time.time()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    backbone, info = load_backbone(config.checkpoint, config.model)
    backbone = backbone.to(device)
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
        feats = {
            k: extract_dataset_features(backbone, ds.images, mean, std, device, config.feature_batch_size, config.amp)
            for k, ds in parts.items()
        }
        labels = {k: ds.labels.to(device) for k, ds in parts.items()}
        if config.protocol == "knn":
            result = knn_evaluate(feats, labels, num_classes, config.knn.k, config.knn.temperature)
        else:
            result = linear_probe(feats, labels, num_classes, config.linear, seed=config.seed)
        result["feature_dim"] = int(feats["fit"].shape[1])
    else:
        if isinstance(backbone, PixelFeatures):
            raise SynthgenError("fine-tuning needs a trainable model, not 'pixels'")
        data = {
            "fit_images": fit.images, "fit_labels": fit.labels,
            "val_images": val.images, "val_labels": val.labels,
            "test_images": test.images, "test_labels": test.labels,
        }  # fmt: skip
        result = finetune(
            backbone, data, num_classes, config.finetune, mean, std, device,
            seed=config.seed, amp=config.amp, progress=progress, feature_batch_size=config.feature_batch_size,
        )  # fmt: skip
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
        "device": device_description(device),
        "versions": library_versions(),
        "elapsed_s": round(time.time() - t0, 2),
    }


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return p
