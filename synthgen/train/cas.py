"""Classification Accuracy Score (CAS): train on synthetic images, test on real ones.

A CAS **protocol** is a YAML file in ``train/`` (``kind: cas``), validated by :class:`CASProtocol`
and overridable with ``--set key=value``. ``cas-lomurno`` (the default) is exact to Lomurno et al.'s
published code: their ResNet-20 with 64 initial filters and Keras initialisers, Adam 1e-3 (Keras'
epsilon 1e-7: torch adds it after bias correction, the same from ~4k steps on), label smoothing 0.1,
batch 256, Keras' ReduceLROnPlateau (patience 10) and early stopping (patience 25, best weights restored) on
the validation accuracy, inputs rescaled to [0, 1]; the real baseline fits on the first 40,000 real
training images and validates on the next 10,000, and a synthetic run at scale xk fits on
k x 40,000 synthetic images (the first k x 40,000 of one seeded shuffle: scales nest) and validates
on those SAME real held-out training images. The real
test split only scores. ``cas-carved-val`` keeps the earlier split (45k/5k carved per run).

Two levels of API:

* :func:`train_cas_classifier` - ONE classifier: fit images (synthetic or real, labels already in
  the real class ids), validation images, a protocol and extra callbacks (e.g. Optuna pruning) in;
  per-epoch history and final metrics out. It reads no test split unless ``test`` is given.
  :func:`load_real_splits` gives the real fit / validation (/ test) splits of a protocol and
  :func:`relabel_to_real` maps a synthetic set's labels onto the real class ids by name.
* :func:`cas_score` - the whole table: the real baseline (cached on disk per protocol, seed, device
  and data) and one synthetic run per scale, each scored on the real test split, overall and per
  class (``class_top1``; the test rows per class are in ``real.test.class_counts``).
  :func:`class_gaps` lists the classes a synthetic run serves worst against the real baseline.

Labels are matched BY NAME (exactly, then case/underscore/hyphen-insensitively); names absent from
the real set are an error before any training.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from synthgen.errors import SynthgenError
from synthgen.train.callbacks import Callback, EarlyStopping, ReduceLROnPlateau
from synthgen.train.classify import TrainConfig, evaluate_classifier, train_classifier
from synthgen.train.config import switch_words
from synthgen.train.data import ImageTensorDataset, load_image_dataset, match_labels, relabel_by_name, split_train_val
from synthgen.train.models import create_model, keras_init_
from synthgen.train.runtime import Runtime, compile_mode

__all__ = [
    "DEFAULT_PROTOCOL",
    "CASProtocol",
    "PlateauSpec",
    "EarlyStoppingSpec",
    "load_cas_protocol",
    "protocol_callbacks",
    "RealSplits",
    "CASRun",
    "load_real_splits",
    "relabel_to_real",
    "train_cas_classifier",
    "cas_score",
    "match_labels",
    "results_table",
    "class_top1",
    "class_gaps",
    "class_gaps_table",
    "BASELINE_CACHE_VERSION",
]

DEFAULT_PROTOCOL = "cas-lomurno"
BASELINE_CACHE_VERSION = 4  # 4: per-class top-1 (class_top1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class PlateauSpec(_Strict):
    """Keras' ReduceLROnPlateau (see :class:`synthgen.train.callbacks.ReduceLROnPlateau`)."""

    monitor: str = "val_acc"
    mode: Literal["min", "max"] = "max"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(10, ge=1)
    min_lr: float = Field(0.0, ge=0)
    min_delta: float = Field(1e-4, ge=0)
    cooldown: int = Field(0, ge=0)


class EarlyStoppingSpec(_Strict):
    """Keras' EarlyStopping (see :class:`synthgen.train.callbacks.EarlyStopping`)."""

    monitor: str = "val_acc"
    mode: Literal["min", "max"] = "max"
    patience: int = Field(25, ge=1)
    min_delta: float = Field(0.0, ge=0)
    restore_best: bool = True


class CASProtocol(TrainConfig):
    """A CAS protocol: the classifier's training (:class:`TrainConfig`) plus data split and schedule."""

    kind: Literal["cas"] = "cas"
    name: str = DEFAULT_PROTOCOL
    model: str = "resnet20_w64"
    # torch: each layer's own initialisation; keras: Lomurno et al.'s Keras initialisers (see keras_init_)
    model_init: Literal["torch", "keras"] = "torch"
    normalization: Literal["dataset", "unit", "cifar", "imagenet", "half"] = "unit"
    real_fit: Optional[int] = Field(40000, ge=1)  # the first N real training images fit the baseline (null: all)
    real_val: Optional[int] = Field(10000, ge=1)  # the next N are the real held-out validation images
    # real: every run validates on the real held-out images; carve: each run carves val_fraction of its
    # own training data; none: no validation (no plateau schedule, no early stopping)
    validation: Literal["real", "carve", "none"] = "real"
    val_fraction: float = Field(0.1, gt=0, lt=1)  # carve only
    scale_unit: Optional[int] = Field(None, ge=1)  # synthetic images per x1 (null: as many as the baseline's real images)
    plateau: Optional[PlateauSpec] = Field(default_factory=PlateauSpec)
    early_stopping: Optional[EarlyStoppingSpec] = Field(default_factory=EarlyStoppingSpec)
    image_size: Optional[int] = Field(None, ge=8)  # null: the real set's resolution
    limit_real_test: Optional[int] = Field(None, ge=1)  # the first N rows of the real test split
    limit_synthetic: Optional[int] = Field(None, ge=1)  # the first N rows of the synthetic split
    amp: Annotated[str, switch_words(on="auto")] = "auto"  # auto | bf16 | fp16 | off
    compile: Annotated[str, switch_words(on="default")] = "auto"  # auto (CUDA graphs on CUDA, eager on CPU) | off | default | reduce-overhead | max-autotune

    @field_validator("compile")
    @classmethod
    def _compile(cls, v: str) -> str:
        try:
            compile_mode(v)
        except SynthgenError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("amp")
    @classmethod
    def _amp(cls, v: str) -> str:
        if v not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"must be auto, bf16, fp16 or off (got {v!r})")
        return v

    @model_validator(mode="after")
    def _split(self) -> "CASProtocol":
        if self.validation == "real" and self.real_val is None:
            raise ValueError("validation: real needs real_val (the number of real held-out images)")
        if self.validation != "real" and self.real_val is not None:
            raise ValueError(f"real_val is only used with validation: real (validation is {self.validation!r}); set it to null")
        return self


def load_cas_protocol(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> tuple[CASProtocol, dict]:
    """A protocol from ``train/`` (by name) or a YAML file, with ``--set`` overrides; returns it and
    its provenance: file, the file's sha256, the overrides and the hash of the resolved values."""
    from synthgen.train.config import _validate, train_recipe_path
    from synthgen.recipe import apply_overrides, read_yaml_mapping

    path = train_recipe_path(name_or_path or DEFAULT_PROTOCOL)
    data = read_yaml_mapping(path, "CAS protocol")
    if data.get("kind") != "cas":
        raise SynthgenError(f"{path} is not a CAS protocol (it has no 'kind: cas')")
    data = apply_overrides(data, list(overrides))
    protocol = _validate(CASProtocol, data, str(path))
    return protocol, {
        "file": str(path),
        "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "overrides": list(overrides),
        "hash": protocol_hash(protocol),
    }


def protocol_hash(protocol: CASProtocol) -> str:
    return hashlib.sha256(json.dumps(protocol.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def protocol_callbacks(protocol: CASProtocol, model: nn.Module) -> list[Callback]:
    """The protocol's plateau schedule and early stopping (the optimizer is attached by the loop)."""
    out: list[Callback] = []
    if protocol.validation == "none":
        return out
    if protocol.plateau is not None:
        p = protocol.plateau
        out.append(ReduceLROnPlateau(None, p.monitor, p.mode, p.factor, p.patience, p.min_lr, p.min_delta, p.cooldown))
    if protocol.early_stopping is not None:
        e = protocol.early_stopping
        out.append(EarlyStopping(e.monitor, e.mode, e.patience, e.min_delta, restore_best=model if e.restore_best else None))
    return out


# --------------------------------------------------------------------------------------------------
# labels and data


def relabel_to_real(syn: ImageTensorDataset, real_class_names: Sequence[str]) -> ImageTensorDataset:
    """``syn`` with its labels mapped to the real class ids by name (the class names become the real ones)."""
    return relabel_by_name(syn, real_class_names, what="synthetic", target="real set")


def _load(source, split, revision, image_size, limit, image_column, label_column, role) -> ImageTensorDataset:
    if isinstance(source, ImageTensorDataset):
        ds = source
        if limit is not None and limit < len(ds):
            ds = ds.subset(slice(0, limit))
    else:
        ds = load_image_dataset(str(source), split, revision=revision, image_size=image_size, limit=limit,
                                image_column=image_column, label_column=label_column, require_labels=True)
    if ds.labels is None:
        raise SynthgenError(f"the {role} dataset {ds.describe()} has no labels")
    if ds.class_names is None:
        raise SynthgenError(f"the {role} dataset {ds.describe()} has integer labels without class names "
                            "(CAS matches classes by name; make the label column a ClassLabel)")
    return ds


@dataclass
class RealSplits:
    """The real images of a protocol: ``fit`` trains the baseline (with ``validation: carve`` its
    validation share is carved from it per run), ``val`` validates every run (None with
    ``validation: carve/none``), ``test`` scores (None unless asked for)."""

    train: ImageTensorDataset
    fit: ImageTensorDataset
    val: Optional[ImageTensorDataset]
    test: Optional[ImageTensorDataset] = None

    @property
    def class_names(self) -> list[str]:
        return list(self.train.class_names)

    @property
    def scale_base(self) -> int:
        """Images per scale x1 when the protocol leaves ``scale_unit`` null: the baseline's real
        training images (fit, plus the share it carves with ``validation: carve``)."""
        return len(self.fit)


def load_real_splits(real, protocol: CASProtocol, *, revision: str | None = None, train_split: str = "train",
                     test_split: str = "test", with_test: bool = False, seed: int = 0) -> RealSplits:
    """Load ``real`` (a source with train/test splits, or a ``(train, test)`` pair of datasets) and cut
    the protocol's fit / validation images from its TRAINING split. The test split is only loaded
    when ``with_test``."""
    p = protocol
    need = None if p.real_fit is None else p.real_fit + (p.real_val or 0)
    pair = isinstance(real, tuple)
    train = _load(real[0] if pair else real, train_split, None if pair else revision, p.image_size, need, None, None, "real training")
    size = train.image_size
    if size[0] != size[1]:
        raise SynthgenError(f"real images are {size[0]}x{size[1]}; CAS expects square images (set image_size)")
    if p.validation == "real":
        n_fit = p.real_fit if p.real_fit is not None else len(train) - p.real_val
        if n_fit < 2 or n_fit + p.real_val > len(train):
            raise SynthgenError(f"the protocol fits on {p.real_fit} and validates on {p.real_val} real training images, "
                                f"but {train.describe()} has {len(train)}; lower real_fit/real_val")
        fit, val = train.subset(slice(0, n_fit)), train.subset(slice(n_fit, n_fit + p.real_val))
    else:
        # carve: each run (train_cas_classifier) carves its validation share from its own images
        fit, val = (train if p.real_fit is None else train.subset(slice(0, p.real_fit))), None
    test = None
    if with_test:
        test = _load(real[1] if pair else real, test_split, None if pair else revision, p.image_size, p.limit_real_test,
                     None, None, "real test")
        if test.class_names != train.class_names:  # string labels are numbered per split: match by name
            test = relabel_by_name(test, train.class_names, what=f"real test split {test_split!r}",
                                   target=f"real training split {train_split!r}")
        if test.image_size != size:
            raise SynthgenError(f"real test images are {test.image_size}, training images {size}")
    return RealSplits(train=train, fit=fit, val=val, test=test)


# --------------------------------------------------------------------------------------------------
# one classifier


@dataclass
class CASRun:
    """One trained CAS classifier: ``history`` (a row per epoch), ``metrics`` (best validation
    accuracy and its epoch, epochs run, sizes; test top-1/top-5 in percent when scored, and
    ``class_top1``: top-1 in percent per class name)."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def to_json(self) -> dict:
        return {**self.metrics, "history": self.history}


def train_cas_classifier(
    fit: ImageTensorDataset,
    val: Optional[ImageTensorDataset],
    protocol: CASProtocol | str | None = None,
    *,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    runtime: Runtime | None = None,
    device: str | None = None,
    test: Optional[ImageTensorDataset] = None,
    quiet: bool = True,
    console=None,
    desc: str = "train",
) -> CASRun:
    """Train one classifier of ``protocol`` on ``fit``, validating on ``val`` every epoch.

    ``fit`` and ``val`` carry labels in the same (real) class ids and class names (use
    :func:`relabel_to_real` for a synthetic set); with ``validation: carve`` pass ``val=None`` and the
    protocol's share is carved from ``fit``. ``callbacks`` run after the protocol's own (plateau,
    early stopping) with ``on_epoch_end(epoch, row)``: ``row["val_acc"]`` is the fraction correct on
    ``val``; returning True stops the run (Optuna pruning). ``test`` (optional) is scored once at the
    end with the restored best weights; nothing else reads it.
    """
    if protocol is None or isinstance(protocol, str):
        protocol = load_cas_protocol(protocol)[0]
    t0 = time.perf_counter()
    if protocol.validation == "carve" and val is None:
        fit, val = split_train_val(fit, protocol.val_fraction, seed)
    if protocol.validation == "none":
        val = None
    if fit.class_names is None:
        raise SynthgenError(f"{fit.describe()} has no class names")
    rt = runtime or Runtime.create(device, amp=protocol.amp, compile=protocol.compile)
    torch.manual_seed(seed)
    model = create_model(protocol.model, len(fit.class_names), image_size=fit.image_size[0])
    if protocol.model_init == "keras":
        keras_init_(model)
    own = protocol_callbacks(protocol, model) if val is not None else []
    res = train_classifier(model, fit, val, protocol, runtime=rt, callbacks=[*own, *callbacks], seed=seed,
                           quiet=quiet, console=console, desc=desc)
    stopper = next((c for c in own if isinstance(c, EarlyStopping)), None)
    metrics: dict[str, Any] = {"n_train": len(fit), "n_val": 0 if val is None else len(val), **res.summary()}
    if val is not None:
        best = stopper.best_epoch if stopper is not None and stopper.best_epoch else max(res.history, key=lambda h: h["val_acc"])["epoch"]
        metrics["best_epoch"] = best
        metrics["best_val_acc"] = res.history[best - 1]["val_acc"]
    if test is not None:
        ev = evaluate_classifier(res.model, test, mean=res.mean, std=res.std, runtime=rt, batch_size=protocol.eval_batch_size)
        metrics.update({"top1": round(100.0 * ev["top1"], 4), "top5": round(100.0 * ev["top5"], 4), "test_loss": ev["loss"], "n_test": ev["n"],
                        "class_top1": class_top1(ev, fit.class_names)})
    metrics["wall_s"] = round(time.perf_counter() - t0, 3)
    return CASRun(model=res.model, history=res.history, metrics=metrics, mean=res.mean, std=res.std)


# --------------------------------------------------------------------------------------------------
# the whole table


def _baseline_key(real: RealSplits, protocol: CASProtocol, seed: int, device: torch.device) -> str:
    p = protocol.model_dump(mode="json")
    for k in ("name", "limit_synthetic", "scale_unit"):
        p.pop(k, None)
    key = {
        "v": BASELINE_CACHE_VERSION,
        "train": {k: real.train.source.get(k) for k in ("id", "revision", "sha", "split", "fingerprint", "subset")},
        "test": {k: real.test.source.get(k) for k in ("id", "revision", "sha", "split", "fingerprint", "subset")},
        "shape": list(real.train.images.shape),
        "protocol": p,
        "seed": seed,
        "device": device.type,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def class_top1(ev: dict, names: Sequence[str]) -> dict[str, Optional[float]]:
    """Per class name, top-1 (%) on the rows of that class (None: the split has none), from
    :func:`~synthgen.train.classify.classification_metrics`' ``class_hits`` / ``class_rows``."""
    return {n: round(100.0 * h / r, 4) if r else None for n, h, r in zip(names, ev["class_hits"], ev["class_rows"])}


def class_gaps(result: dict, top: Optional[int] = 10) -> list[dict]:
    """The classes a :func:`cas_score` result's synthetic run serves worst against the real baseline:
    ``{"class", "real", "synthetic", "gap"}`` (top-1 %, gap = real - synthetic), largest gap first,
    at most ``top`` (None: all). The run is the largest scale's (or the only one). Classes without
    test rows are left out; a result from before per-class scores gives []."""
    run = max(result["runs"], key=lambda r: r["scale"] or 0)
    real, syn = result["real_baseline"].get("class_top1"), run.get("class_top1")
    if not real or not syn:
        return []
    rows = [{"class": n, "real": real[n], "synthetic": syn[n], "gap": round(real[n] - syn[n], 4)}
            for n in real if real[n] is not None and syn.get(n) is not None]
    rows.sort(key=lambda r: (-r["gap"], r["class"]))
    return rows if top is None else rows[:top]


def _missing_classes(labels: torch.Tensor, names: Sequence[str]) -> list[str]:
    present = set(torch.unique(labels).tolist())
    return [n for i, n in enumerate(names) if i not in present]


def _environment(device: torch.device) -> dict:
    from synthgen.provenance import environment

    env = environment(device)
    env.pop("host", None)  # results are shared; the machine's name is not needed to read them
    return env


def cas_score(
    synthetic: str | ImageTensorDataset,
    real: str | tuple[ImageTensorDataset, ImageTensorDataset],
    protocol: CASProtocol | str | None = None,
    seed: int = 0,
    scales: Sequence[int] | None = None,
    *,
    protocol_info: dict | None = None,
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
    """Score ``synthetic`` by CAS against ``real``. Returns a JSON-able dict with ``real_baseline``,
    ``runs`` (one per scale, or one on the whole synthetic set), the datasets (with resolved Hub
    commits), the protocol (values, file, hash), seed and environment. Accuracies are percentages.
    Every input check happens before any training."""
    from synthgen.paths import cache_dir

    if protocol is None or isinstance(protocol, str):
        protocol, protocol_info = load_cas_protocol(protocol)
    info = dict(protocol_info or {"file": None, "hash": protocol_hash(protocol)})
    rt = Runtime.create(device, amp=protocol.amp, compile=protocol.compile)
    t0 = time.perf_counter()
    # ---- load and check everything first
    real_splits = load_real_splits(real, protocol, revision=real_revision, train_split=real_train_split,
                                   test_split=real_test_split, with_test=True, seed=seed)
    names = real_splits.class_names
    size = real_splits.train.image_size
    syn = _load(synthetic, synthetic_split, synthetic_revision, size[0], protocol.limit_synthetic,
                synthetic_image_column, synthetic_label_column, "synthetic")
    if syn.image_size != size:
        raise SynthgenError(f"synthetic images are {syn.image_size}, real ones {size}; resize them to the real resolution")
    syn_names = list(syn.class_names)
    label_map = match_labels(syn_names, names)
    syn = relabel_to_real(syn, names)
    missing = _missing_classes(syn.labels, names)
    unit = protocol.scale_unit or real_splits.scale_base
    scale_list = [int(k) for k in scales] if scales else []
    for k in scale_list:
        if k < 1:
            raise SynthgenError(f"scales must be positive integers, got {k}")
        if k * unit > len(syn):
            largest = len(syn) // unit
            serves = (f"the largest scale it serves is x{largest}" if largest else
                      f"that is less than one scale unit ({unit} images); score it without --scales, or set scale_unit")
            raise SynthgenError(f"scale x{k} needs {k * unit} synthetic images (x{k} of {unit}) but "
                                f"{syn.describe()} has {len(syn)}; {serves}")
    # Scale xk fits on the first k*unit rows of ONE seeded permutation of the synthetic rows (so the
    # scales nest), as Lomurno et al.'s load_data_syn shuffles its image list before take(k * 40000):
    # a class-sorted set (an imagefolder export) would otherwise give x1 a few classes only. The run
    # without --scales fits on every row. A class a scale's rows lack is recorded (warned by the CLI).
    order = torch.randperm(len(syn), generator=torch.Generator().manual_seed(seed)) if scale_list else None
    scale_rows = {k: torch.sort(order[: k * unit]).values for k in scale_list}
    sampling = None if order is None else {
        "method": "torch.randperm(rows, generator=torch.Generator().manual_seed(seed)); scale xk fits on "
                  "the first k*scale_unit entries (sorted back to stored order)",
        "seed": seed, "rows": len(syn),
        "sha256": hashlib.sha256(order.numpy().astype("<i8").tobytes()).hexdigest(),
    }

    # ---- the real baseline (cached)
    key = _baseline_key(real_splits, protocol, seed, rt.device)
    cache_file = cache_dir() / "cas" / f"baseline-{key}.json"
    real_run = None
    if use_cache and cache_file.exists():
        try:
            real_run = json.loads(cache_file.read_text())
            real_run["cached"] = True
        except (OSError, ValueError):
            real_run = None
    if real_run is None:
        run = train_cas_classifier(real_splits.fit, real_splits.val, protocol, seed=seed, runtime=rt, test=real_splits.test,
                                   quiet=quiet, console=console, desc="real")
        real_run = {**run.to_json(), "cached": False}
        if use_cache and rt.is_main:
            from synthgen.train.checkpoint import atomic_write_text

            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_file, json.dumps({k: v for k, v in real_run.items() if k != "cached"}, default=str))

    # ---- the synthetic runs
    runs = []
    for k in scale_list or [None]:
        part = syn if k is None or k * unit == len(syn) else syn.subset(scale_rows[k])
        run = train_cas_classifier(part, real_splits.val, protocol, seed=seed, runtime=rt, test=real_splits.test, quiet=quiet,
                                   console=console, desc="synthetic" if k is None else f"synthetic x{k}")
        runs.append({**run.to_json(), "scale": k, "n_images": len(part), "missing_classes": _missing_classes(part.labels, names)})

    val_src = None if real_splits.val is None else {**real_splits.val.source, "rows": len(real_splits.val)}
    return {
        "synthetic": {**syn.source, "rows": len(syn), "class_names": syn_names},
        "label_map": {n: names[int(j)] for n, j in zip(syn_names, label_map)},
        "real": {
            "train": {**real_splits.train.source, "rows": len(real_splits.train)},
            "fit": {**real_splits.fit.source, "rows": len(real_splits.fit)},
            "validation": val_src,
            "test": {**real_splits.test.source, "rows": len(real_splits.test),
                     "class_counts": dict(zip(names, torch.bincount(real_splits.test.labels, minlength=len(names)).tolist()))},
            "class_names": names,
        },
        "missing_classes": missing,
        "scale_sampling": sampling,
        "protocol": {**info, "values": protocol.model_dump(mode="json")},
        "scale_unit": unit,
        "seed": seed,
        "image_size": size[0],
        "runtime": rt.settings(),
        "environment": _environment(rt.device),
        "real_baseline": real_run,
        "runs": runs,
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def results_table(result: dict, name: str | None = None):
    """A rich table in the layout of Lomurno et al.'s Table 2: Dataset | Real | x1 | x2 | ... (top-1 %)."""
    from rich.table import Table

    table = Table(title=f"CAS top-1 accuracy (%) on the real test split ({result['protocol']['values']['name']})")
    table.add_column("Dataset")
    table.add_column("Real", justify="right")
    runs = result["runs"]
    for r in runs:
        table.add_column("Synthetic" if r["scale"] is None else f"×{r['scale']}", justify="right")
    dataset = name or str(result["synthetic"].get("id", "")).rstrip("/").split("/")[-1]
    table.add_row(dataset, f"{result['real_baseline']['top1']:.2f}", *[f"{r['top1']:.2f}" for r in runs])
    return table


def class_gaps_table(result: dict, top: int = 10):
    """A rich table of :func:`class_gaps`: the classes furthest below the real baseline (None when
    the result has no per-class scores)."""
    from rich.table import Table

    rows = class_gaps(result, top)
    if not rows:
        return None
    run = max(result["runs"], key=lambda r: r["scale"] or 0)
    which = "synthetic" if run["scale"] is None else f"×{run['scale']}"
    table = Table(title=f"Classes furthest below the real baseline ({which}; top-1 % on the real test split)")
    for name in ("Class", "Real", "Synthetic", "Gap"):
        table.add_column(name, justify="left" if name == "Class" else "right")
    for r in rows:
        table.add_row(r["class"], f"{r['real']:.2f}", f"{r['synthetic']:.2f}", f"{r['gap']:+.2f}")
    return table
