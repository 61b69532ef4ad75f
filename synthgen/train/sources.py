"""Mixtures of training sources: several datasets, each with a size or a fraction, as one split.

Mormille & Atsumi pre-train on real ImageNet plus 250k, 500k or 1M synthetic images; a recipe says
so with ``dataset.sources``::

    dataset:
      sources:
        - {source: /data/imagenet, split: train}                        # all rows
        - {source: org/combinatorial-sd, revision: v1.0.0, size: 500000}

Each source's rows are drawn at random (seeded) when ``size``/``fraction`` asks for fewer than it
has; labels are matched BY NAME onto one class list (the first source's classes, then new names
in order); group ids are offset per source so that groups never merge across sources. The rows
taken from each source are recorded (``MixtureRows``) in the run's metrics.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from synthgen.errors import SynthgenError
from synthgen.train.data import ImageTensorDataset, load_image_dataset, naming_split_setting

__all__ = ["load_mixture", "concat_datasets"]


def concat_datasets(parts: Sequence[ImageTensorDataset], source: dict) -> ImageTensorDataset:
    """Row-wise concatenation; labels relabelled by class name, groups offset per part."""
    if not parts:
        raise SynthgenError("a mixture needs at least one source")
    sizes = {p.image_size for p in parts}
    if len(sizes) > 1:
        raise SynthgenError(f"mixture sources have different image sizes {sorted(sizes)}; set dataset.image_size")
    labelled = [p.labels is not None for p in parts]
    if any(labelled) and not all(labelled):
        which = [p.describe() for p in parts if p.labels is None]
        raise SynthgenError(f"some mixture sources have labels and some do not ({', '.join(which)} has none)")
    labels = None
    names: list[str] | None = None
    if all(labelled):
        if all(p.class_names is not None for p in parts):
            names = []
            for p in parts:
                names += [n for n in p.class_names if n not in names]
            index = {n: i for i, n in enumerate(names)}
            labels = torch.cat([torch.tensor([index[n] for n in p.class_names])[p.labels] for p in parts])
        else:
            labels = torch.cat([p.labels for p in parts])
    groups = None
    if all(p.groups is not None for p in parts):
        out, offset = [], 0
        for p in parts:
            out.append(p.groups + offset)
            offset += int(p.groups.max()) + 1 if len(p.groups) else 0
        groups = torch.cat(out)
    return ImageTensorDataset(images=torch.cat([p.images for p in parts]), labels=labels, groups=groups,
                              class_names=names, source=source)


def load_mixture(specs, *, image_size: int | None, group_column: str | None = None, require_labels: bool = False,
                 seed: int = 0) -> tuple[ImageTensorDataset, list[dict[str, Any]]]:
    """Load every source of ``specs`` (:class:`~synthgen.train.config.SourceSpec`), take its share and
    concatenate; returns the dataset and one record per source (id, revision, commit, rows available
    and used)."""
    from synthgen.train.config import resolve_source

    parts, rows = [], []
    for i, spec in enumerate(specs):
        with naming_split_setting(f"set `split` of dataset.sources[{i}] in the recipe"):
            ds = load_image_dataset(
                resolve_source(spec.source), spec.split, revision=spec.revision, image_column=spec.image_column,
                label_column=spec.label_column, group_column=spec.group_column or group_column,
                image_size=image_size, require_labels=require_labels,
            )
        n = len(ds)
        want = n
        if spec.size is not None:
            if spec.size > n:
                raise SynthgenError(f"dataset.sources.{i}: size {spec.size} but {ds.describe()} has {n} rows")
            want = spec.size
        elif spec.fraction is not None:
            want = max(1, math.floor(n * spec.fraction))
        if want < n:
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + i))[:want]
            ds = ds.subset(torch.sort(pick).values)
        parts.append(ds)
        rows.append({**ds.source, "rows_available": n, "rows_used": len(ds),
                     "size": spec.size, "fraction": spec.fraction})
    mixed = concat_datasets(parts, {"id": "mixture", "sources": rows})
    return mixed, rows
