"""Classification Accuracy Score (CAS): train on synthetic images, test on real ones.

:func:`cas_score` trains the protocol's classifier on a synthetic dataset and reports its top-1 and
top-5 accuracy on the REAL test split, next to the same classifier trained on the real training
split (the "real baseline"; cached on disk, so each protocol/seed/device pays for it once).

Default protocol (:class:`CASProtocol`) = Lomurno et al. (CIFAR-10 Table 2): ResNet-20 (the
64-filter width of their code, ``resnet20_w64``), 100 epochs, Adam lr 1e-3, label smoothing 0.1,
batch 256, ReduceLROnPlateau(patience 10, factor 0.1, min lr 1e-5) and early stopping (patience 25)
on the validation accuracy, with best weights restored, no augmentation, images at the real set's
resolution. The validation split is carved (10%, stratified, seeded) from the TRAINING data of each
run: from the real training split for the baseline, from the synthetic images for a synthetic run.
The real test split is only ever used for the final score (unlike the published code, which tuned
on it).

Labels are matched BY NAME: synthetic class ``"cat"`` is trained as the real class ``"cat"``
whatever its index (names compared exactly, then case/underscore/hyphen-insensitively); names
absent from the real set are an error before any training.

``scales=[1, 2, ...]``: a run per scale k on the FIRST ``k * len(real train)`` synthetic images
(their Table 2 columns x1..x10). A synthetic set too small for a requested scale is an error
before any training (not a silent skip), naming the largest scale it can serve.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from synthgen.errors import SynthgenError
from synthgen.train import classify as _classify
from synthgen.train.classify import TrainConfig, compile_mode, evaluate_classifier, resolve_device
from synthgen.train.data import ImageTensorDataset, load_image_dataset, split_train_val
from synthgen.train.models import create_model

__all__ = ["CASProtocol", "cas_score", "train_and_score", "match_labels", "results_table", "BASELINE_CACHE_VERSION"]

BASELINE_CACHE_VERSION = 2


class CASProtocol(BaseModel):
    """How a CAS classifier is trained; defaults = Lomurno et al. (ResNet-20 on CIFAR-10).

    Where the paper's text is silent, the defaults follow their published training code: the
    ResNet-20 there has 64 initial filters (``resnet20_w64``, 4.29M parameters; their CIFAR-10 log
    records 4,291,530), and the plateau schedule and early stopping watch the validation ACCURACY
    (best weights restored, learning rate floored at 1e-5). ``model="resnet20"`` gives He et al.'s
    0.27M-parameter network, which is 16x cheaper but reaches far lower accuracy here.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = "lomurno2024-resnet20"
    model: str = "resnet20_w64"
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=2)
    optimizer: str = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    monitor: str = "val_acc"
    plateau_patience: int | None = 10
    plateau_factor: float = Field(0.1, gt=0, lt=1)
    min_lr: float = Field(1e-5, ge=0)
    early_stopping_patience: int | None = 25
    val_fraction: float = Field(0.1, ge=0, lt=1)  # 0: no validation split (no plateau/early stopping)
    augment: bool = False
    image_size: int | None = None  # None: the real set's resolution
    limit_real: int | None = Field(None, ge=1)  # first N rows of the real training split
    limit_real_test: int | None = Field(None, ge=1)  # first N rows of the real test split
    limit_synthetic: int | None = Field(None, ge=1)  # first N rows of the synthetic split
    amp: str = "auto"
    # torch.compile mode of the classifier: auto (reduce-overhead = CUDA graphs on CUDA, off on CPU) |
    # off | default | reduce-overhead | max-autotune. On an H100 it halves a baseline run (161 s eager,
    # 85 s compiled, ~20 s of it compiling): benchmarks/results/cas-baseline-resnet20_w64-cuda-*.json
    compile: str = "auto"
    eval_batch_size: int = Field(1024, ge=1)

    @field_validator("compile")
    @classmethod
    def _compile(cls, v: str) -> str:
        try:
            compile_mode(v)
        except SynthgenError as exc:
            raise ValueError(str(exc)) from None
        return v

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            monitor=self.monitor,
            plateau_patience=self.plateau_patience,
            plateau_factor=self.plateau_factor,
            min_lr=self.min_lr,
            early_stopping_patience=self.early_stopping_patience,
            augment=self.augment,
            amp=self.amp,
            compile=self.compile,
            eval_batch_size=self.eval_batch_size,
            seed=seed,
        )


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def match_labels(synthetic_names: Sequence[str], real_names: Sequence[str]) -> torch.Tensor:
    """``map[i]`` = the real class index of synthetic class ``i``, matched by name."""
    exact = {n: i for i, n in enumerate(real_names)}
    loose = {_norm(n): i for i, n in enumerate(real_names)}
    out, unmatched = [], []
    for n in synthetic_names:
        j = exact.get(n, loose.get(_norm(n)))
        if j is None:
            unmatched.append(n)
        out.append(-1 if j is None else j)
    if unmatched:
        shown = ", ".join(repr(n) for n in unmatched[:20]) + (f" (+{len(unmatched) - 20} more)" if len(unmatched) > 20 else "")
        raise SynthgenError(
            f"{len(unmatched)} synthetic label name(s) not in the real set: {shown}; "
            f"real classes: {', '.join(real_names[:20])}{' ...' if len(real_names) > 20 else ''}"
        )
    return torch.tensor(out, dtype=torch.long)


def _load(source, split, revision, image_size, limit, image_column, label_column, role) -> ImageTensorDataset:
    if isinstance(source, ImageTensorDataset):
        ds = source
        if limit is not None and limit < len(ds):
            ds = ds.subset(slice(0, limit))
    else:
        ds = load_image_dataset(
            str(source), split, revision=revision, image_size=image_size, limit=limit,
            image_column=image_column, label_column=label_column, require_labels=True,
        )
    if ds.labels is None:
        raise SynthgenError(f"the {role} dataset {ds.describe()} has no labels")
    if ds.class_names is None:
        raise SynthgenError(
            f"the {role} dataset {ds.describe()} has integer labels without class names "
            "(CAS matches classes by name; make the label column a ClassLabel)"
        )
    return ds


def train_and_score(
    train_ds: ImageTensorDataset,
    test_ds: ImageTensorDataset,
    protocol: CASProtocol,
    seed: int,
    num_classes: int,
    device,
    quiet: bool = True,
    console=None,
    desc: str = "train",
    label_map: torch.Tensor | None = None,
) -> dict:
    """One run of ``protocol``: carve the validation split from ``train_ds``, train, score on
    ``test_ds``. :func:`cas_score` makes two of these (real baseline, synthetic)."""
    t0 = time.perf_counter()
    if protocol.val_fraction > 0:
        fit, val = split_train_val(train_ds, protocol.val_fraction, seed)
    else:
        fit, val = train_ds, None
    torch.manual_seed(seed)
    model = create_model(protocol.model, num_classes, image_size=train_ds.image_size[0])
    res = _classify.train_classifier(
        model, fit, val, protocol.train_config(seed), device=device, label_map=label_map, quiet=quiet, console=console, desc=desc
    )
    ev = evaluate_classifier(
        res.model, test_ds, mean=res.mean, std=res.std, device=device, batch_size=protocol.eval_batch_size, amp=protocol.amp
    )
    return {
        "top1": round(100.0 * ev["top1"], 4),
        "top5": round(100.0 * ev["top5"], 4),
        "test_loss": ev["loss"],
        "n_train": len(fit),
        "n_val": 0 if val is None else len(val),
        "n_test": ev["n"],
        **res.summary(),
        "history": res.history,
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def _baseline_key(real_train: ImageTensorDataset, real_test: ImageTensorDataset, protocol: CASProtocol, seed: int, device) -> str:
    p = protocol.model_dump()
    p.pop("limit_synthetic", None)
    p.pop("name", None)
    key = {
        "v": BASELINE_CACHE_VERSION,
        "train": {k: real_train.source.get(k) for k in ("id", "revision", "split", "fingerprint", "subset")},
        "test": {k: real_test.source.get(k) for k in ("id", "revision", "split", "fingerprint", "subset")},
        "shape": list(real_train.images.shape),
        "protocol": p,
        "seed": seed,
        "device": torch.device(device).type,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cas_score(
    synthetic: str | ImageTensorDataset,
    real: str | tuple[ImageTensorDataset, ImageTensorDataset],
    protocol: CASProtocol | None = None,
    seed: int = 0,
    scales: Sequence[int] | None = None,
    *,
    synthetic_split: str = "train",
    synthetic_revision: str | None = None,
    real_train_split: str = "train",
    real_test_split: str = "test",
    real_revision: str | None = None,
    synthetic_image_column: str | None = None,
    synthetic_label_column: str | None = None,
    device: str | torch.device | None = None,
    use_cache: bool = True,
    quiet: bool = True,
    console=None,
) -> dict[str, Any]:
    """Score ``synthetic`` by CAS against ``real`` (a source with train/test splits, or a
    ``(train, test)`` pair of datasets). Returns a JSON-able dict with ``real`` (the baseline run),
    ``runs`` (one per scale, or one on the whole synthetic set), the datasets, protocol, seed and
    device. Accuracies are percentages. Every input check happens before any training."""
    from synthgen.paths import cache_dir
    from synthgen.provenance import environment

    protocol = protocol or CASProtocol()
    dev = resolve_device(device)
    t0 = time.perf_counter()
    # ---- load and check everything first
    if isinstance(real, tuple):
        real_train = _load(real[0], real_train_split, None, None, protocol.limit_real, None, None, "real training")
        real_test = _load(real[1], real_test_split, None, None, protocol.limit_real_test, None, None, "real test")
    else:
        real_train = _load(real, real_train_split, real_revision, protocol.image_size, protocol.limit_real, None, None, "real training")
        real_test = _load(real, real_test_split, real_revision, protocol.image_size, protocol.limit_real_test, None, None, "real test")
    if real_test.class_names != real_train.class_names:
        raise SynthgenError("the real training and test splits have different class names")
    size = real_train.image_size
    if size[0] != size[1]:
        raise SynthgenError(f"real images are {size[0]}x{size[1]}; CAS expects square images (pass image_size)")
    if real_test.image_size != size:
        raise SynthgenError(f"real test images are {real_test.image_size}, training images {size}")
    syn = _load(
        synthetic, synthetic_split, synthetic_revision, size[0], protocol.limit_synthetic,
        synthetic_image_column, synthetic_label_column, "synthetic",
    )
    if syn.image_size != size:
        raise SynthgenError(f"synthetic images are {syn.image_size}, real ones {size}; resize them to the real resolution")
    label_map = match_labels(syn.class_names, real_train.class_names)
    present = torch.unique(label_map[torch.unique(syn.labels)]).tolist()
    missing = [n for i, n in enumerate(real_train.class_names) if i not in set(present)]
    # relabel the synthetic set with the real class ids, so that everything downstream (the
    # stratified validation split included) is independent of the synthetic class order
    syn_names = list(syn.class_names)
    syn = ImageTensorDataset(
        images=syn.images, labels=label_map[syn.labels], groups=syn.groups,
        class_names=list(real_train.class_names), source=syn.source,
    )
    n_real = len(real_train)
    scale_list = [int(k) for k in scales] if scales else []
    for k in scale_list:
        if k < 1:
            raise SynthgenError(f"scales must be positive integers, got {k}")
        if k * n_real > len(syn):
            raise SynthgenError(
                f"scale x{k} needs {k * n_real} synthetic images (x{k} the {n_real} real training images) but "
                f"{syn.describe()} has {len(syn)}; the largest scale it serves is x{len(syn) // n_real}"
            )
    num_classes = len(real_train.class_names)

    # ---- the real baseline (cached)
    key = _baseline_key(real_train, real_test, protocol, seed, dev)
    cache_file = cache_dir() / "cas" / f"baseline-{key}.json"
    real_run = None
    if use_cache and cache_file.exists():
        try:
            real_run = json.loads(cache_file.read_text())
            real_run["cached"] = True
        except (OSError, ValueError):
            real_run = None
    if real_run is None:
        real_run = train_and_score(real_train, real_test, protocol, seed, num_classes, dev, quiet, console, "real")
        real_run["cached"] = False
        if use_cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: v for k, v in real_run.items() if k != "cached"}, default=str))
            tmp.replace(cache_file)

    # ---- the synthetic runs
    runs = []
    for k in scale_list or [None]:
        part = syn if k is None else syn.subset(slice(0, k * n_real))
        desc = "synthetic" if k is None else f"synthetic x{k}"
        r = train_and_score(part, real_test, protocol, seed, num_classes, dev, quiet, console, desc)
        r["scale"] = k
        r["n_images"] = len(part)
        runs.append(r)

    return {
        "synthetic": {**syn.source, "rows": len(syn), "class_names": syn_names},
        "label_map": {n: real_train.class_names[int(j)] for n, j in zip(syn_names, label_map)},
        "real": {
            "train": {**real_train.source, "rows": len(real_train)},
            "test": {**real_test.source, "rows": len(real_test)},
            "class_names": real_train.class_names,
        },
        "missing_classes": missing,
        "protocol": protocol.model_dump(),
        "seed": seed,
        "image_size": size[0],
        "environment": environment(dev),
        "real_baseline": real_run,
        "runs": runs,
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def results_table(result: dict, name: str | None = None):
    """A rich table in the layout of Lomurno et al.'s Table 2: Dataset | Real | x1 | x2 | ... (top-1 %)."""
    from rich.table import Table

    table = Table(title="CAS top-1 accuracy (%) on the real test split")
    table.add_column("Dataset")
    table.add_column("Real", justify="right")
    runs = result["runs"]
    for r in runs:
        table.add_column("Synthetic" if r["scale"] is None else f"×{r['scale']}", justify="right")
    dataset = name or str(result["real"]["train"].get("id", "")).rstrip("/").split("/")[-1]
    table.add_row(dataset, f"{result['real_baseline']['top1']:.2f}", *[f"{r['top1']:.2f}" for r in runs])
    return table
