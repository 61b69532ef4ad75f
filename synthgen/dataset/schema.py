"""The columns of a synthgen dataset: the image and everything needed to regenerate it."""

from __future__ import annotations

from typing import Optional, Sequence

from datasets import ClassLabel, Features, Image, Value

# Provenance columns, in order. ``prompt`` + ``seed`` + the manifest's settings (``settings_hash``)
# regenerate the image; ``meta`` is the sampler's JSON (template, hypernym, background, axes, ...).
PROVENANCE_COLUMNS = ("index", "prompt", "label", "group", "seed", "retries", "settings_hash", "meta")


def dataset_features(class_names: Optional[Sequence[str]]) -> Features:
    columns = {
        "image": Image(),
        "index": Value("int64"),
        "prompt": Value("string"),
    }
    if class_names is not None:
        columns["label"] = ClassLabel(names=list(class_names))
    columns.update(
        {
            "group": Value("int64"),
            "seed": Value("int64"),
            "retries": Value("int32"),
            "settings_hash": Value("string"),
            "meta": Value("string"),
        }
    )
    return Features(columns)
