"""Class ids for a class-conditioned pipeline (``prompts.kind: classes``): no text, one class per image.

Lomurno et al.'s tuning trials generate "a small dataset of 4000 images with uniform classes
distribution"; their final datasets keep "the class distribution identical to that of the real
data". ``distribution: balanced`` gives every class ``count // classes`` images (the first
``count % classes`` classes one more); ``distribution: dataset`` apportions ``count`` to the label
frequencies of a real dataset by largest remainders.

Order. Image ``i``'s class is fixed by the plan, not drawn: class ``c``'s ``j``-th image is due at
``(j + 0.5) / n_c`` of the way through the dataset and images are sorted by that time (ties by class
id). Every prefix then holds each class in its planned share, within one image -- what CAS at scale
``xk`` reads (the first ``k`` units) and what a ``--limit`` build makes. A balanced plan is simply
``i % classes``.

Records carry no prompt: ``label``/``class_id`` is the class id (the position in ``class_names``,
the dataset's ClassLabel) and ``meta["class_name"]`` its name. The class-conditioned generator maps
the name onto the pipeline's own class ids (synthgen/generate/classcond.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from synthgen.errors import RecipeError, SynthgenError
from synthgen.prompts.base import PromptRecord, check_index
from synthgen.recipe import ClassPrompts

__all__ = ["ClassSampler", "planned_counts", "interleave"]


def planned_counts(count: int, weights: Sequence[float]) -> list[int]:
    """``count`` images over classes in proportion to ``weights`` (largest remainders; ties to the
    lower class id). Equal weights: ``count // n`` each, the first ``count % n`` classes one more."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise SynthgenError("class weights must be non-negative with a positive sum")
    exact = count * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    left = int(count - base.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - base)))  # largest remainder first, then class id
    base[order[:left]] += 1
    return [int(c) for c in base]


def interleave(counts: Sequence[int]) -> np.ndarray:
    """The class of each image, classes spread evenly: class ``c``'s ``j``-th image at time
    ``(j + 0.5) / counts[c]``, sorted by time then class id."""
    counts = [int(c) for c in counts]
    if not sum(counts):
        return np.zeros(0, dtype=np.int64)
    times = np.concatenate([(np.arange(n) + 0.5) / n for n in counts if n])
    classes = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts) if n])
    return classes[np.lexsort((classes, times))]


def _dataset_labels(config: ClassPrompts) -> tuple[Optional[list[str]], np.ndarray, str]:
    """(ClassLabel names or None, label ids, description) of ``config.dataset``: the label column
    only, no image is decoded."""
    from synthgen.train.data import _detect_columns, _load_hf_split

    ds, resolved, _ = _load_hf_split(config.dataset, config.split, config.revision)
    desc = f"{config.dataset}[{config.split}]"
    _, label_column, _ = _detect_columns(ds, config.dataset, config.split, None, config.label_column, None)
    if label_column is None:
        raise SynthgenError(f"prompts.dataset: {desc} has no label column (no ClassLabel, no label/labels column)")
    import datasets

    feature = ds.features[label_column]
    names = [str(n) for n in feature.names] if isinstance(feature, datasets.ClassLabel) else None
    values = list(ds.with_format(None)[label_column])
    if any(v is None for v in values):
        raise SynthgenError(f"prompts.dataset: {desc} has empty (null) labels")
    if values and isinstance(values[0], str):  # string labels: names sorted, as the trainer reads them
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        values = [index[v] for v in values]
    labels = np.asarray(values, dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise SynthgenError(f"prompts.dataset: {desc} has negative label ids (unlabelled rows?)")
    return names, labels, desc


class ClassSampler:
    """``ClassSampler(config, count, seed)``: ``count`` class-conditioned records (``seed`` is unused:
    the order is planned, see the module doc)."""

    def __init__(self, config: ClassPrompts, count: int, seed: int = 0):
        if count < 0:
            raise RecipeError(f"count must be >= 0, got {count}")
        self.config = config
        self.count = int(count)
        self.seed = int(seed)
        need_dataset = config.classes is None or config.distribution == "dataset"
        if need_dataset and config.dataset is None:
            why = "classes is null" if config.classes is None else "distribution is dataset"
            raise RecipeError(f"prompts.dataset is needed when {why} (a labelled dataset)")
        names: Optional[list[str]] = None
        labels = None
        if need_dataset:
            names, labels, desc = _dataset_labels(config)
        if config.classes is not None:
            given = list(config.classes) if isinstance(config.classes, list) else self._table(config.classes)
            if labels is not None:
                if names is None:  # integer labels without names: positions must line up
                    if int(labels.max()) >= len(given):
                        raise SynthgenError(f"prompts.dataset: label {int(labels.max())} has no name in prompts.classes")
                else:
                    missing = [n for n in given if n not in names]
                    if missing:
                        raise SynthgenError(f"prompts.classes: {missing[0]!r} is not a class of {desc} ({', '.join(names[:10])})")
                    labels = np.asarray([given.index(names[v]) if names[v] in given else -1 for v in labels])
                    labels = labels[labels >= 0]
            names = given
        elif names is None:
            assert labels is not None
            names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
        if not names:
            raise SynthgenError("prompts: no classes")
        self.class_names: list[str] = names
        if config.distribution == "dataset":
            assert labels is not None
            frequencies = np.bincount(labels, minlength=len(names)).astype(np.float64)
            if frequencies.sum() == 0:
                raise SynthgenError("prompts.dataset has no rows of the chosen classes")
            self.counts = planned_counts(self.count, frequencies)
        else:
            self.counts = planned_counts(self.count, [1.0] * len(names))
        self._order = interleave(self.counts)

    @staticmethod
    def _table(name: str) -> list[str]:
        from synthgen.prompts.wordnet import load_classes

        infos, _ = load_classes(name)
        return [c.name for c in infos]

    def __len__(self) -> int:
        return self.count

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getitem__(self, index: int) -> PromptRecord:
        i = check_index(index, self.count)
        c = int(self._order[i])
        name = self.class_names[c]
        return PromptRecord(index=i, prompt=None, label=c, label_name=name, group=i, class_id=c, meta={"class_name": name})

    def __iter__(self):
        return (self[i] for i in range(self.count))

    def check_generator(self, generator: Any) -> None:
        """Refuse, before anything is built, a class the recipe's model does not know: read the
        class names of a local class-conditioned pipeline folder (a Hub model is checked when it
        loads, by the generator)."""
        folder = Path(str(generator.model)).expanduser()
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            return
        try:
            index = json.loads(index_file.read_text())
        except (OSError, ValueError):
            return
        if index.get("_class_name") != "ClassConditionedPipeline":
            raise RecipeError(
                f"prompts.kind: classes needs a class-conditioned pipeline; generator.model {generator.model} "
                f"is a {index.get('_class_name')} (use a folder saved by `synthgen classcond run`)"
            )
        check_class_names(self.class_names, index.get("class_names") or [], str(generator.model))


def check_class_names(wanted: Sequence[str], known: Sequence[str], model: str) -> None:
    """SynthgenError naming the first of ``wanted`` that is not among the model's ``known`` classes."""
    missing = [n for n in wanted if n not in set(known)]
    if missing:
        shown = ", ".join(list(known)[:10]) + (" ..." if len(known) > 10 else "")
        raise SynthgenError(
            f"class {missing[0]!r} is outside the label set of {model} ({len(known)} classes: {shown})"
        )
