"""ImageNet-SD prompts (Sariyildiz et al., "Fake it till you make it", CVPR 2023).

Each image gets a class, a template and, where the template uses ``{b}``, a background scene:

- class: ``label = i % num_classes`` (balanced and interleaved: every prefix of the dataset of
  length ``k * num_classes`` holds exactly ``k`` images of each class);
- template: ``templates[stable_uint64(seed, i, "template") % len(templates)]``;
- background: ``backgrounds[stable_uint64(seed, i, "background") % len(backgrounds)]``.

Templates use ``{c}`` (class lemma), ``{h}`` (WordNet hypernym), ``{d}`` (WordNet definition, kept
whole; Stable Diffusion's CLIP text encoder truncates the prompt at 77 tokens) and ``{b}``
(background, e.g. a Places365 scene). The paper's four prompts are ``{c}``, ``{c}, {h}``,
``{c}, {d}`` and ``{c}, {h} inside {b}``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Optional

from synthgen.errors import RecipeError, SynthgenError
from synthgen.prompts.base import PromptRecord, check_index, stable_uint64
from synthgen.prompts.tables import (
    TABLE_HEADER,
    ClassInfo,
    build_class_table,
    read_class_table,
    read_text_list,
    read_wnid_list,
    resolve_data_file,
)
from synthgen.recipe import WordNetPrompts

_FIELD_META = {"c": "lemma", "h": "hypernym", "d": "definition", "b": "background"}


def load_classes(classes: str) -> tuple[list[ClassInfo], Path]:
    """A shipped table name, a class-table TSV, or a text file of WordNet ids (built from WordNet)."""
    path = resolve_data_file(classes, "class table", (".tsv",))
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline().rstrip("\r\n")
    if tuple(first.split("\t")) == TABLE_HEADER:
        return read_class_table(path), path
    if first.startswith("wnid"):
        raise SynthgenError(f"{path}: a class table starts with the header {' '.join(TABLE_HEADER)} (tab-separated)")
    wnids, names = read_wnid_list(path)
    return build_class_table(wnids, names), path


def load_backgrounds(backgrounds: str) -> tuple[list[str], Path]:
    path = resolve_data_file(backgrounds, "background list", (".txt",))
    return read_text_list(path, "background list"), path


class WordNetSampler:
    """``WordNetSampler(config, count, seed)``: ImageNet-SD prompts, one class per ``i % classes``."""

    def __init__(self, config: WordNetPrompts, count: int, seed: int):
        if count < 0:
            raise RecipeError(f"count must be >= 0, got {count}")
        self.config = config
        self.count = int(count)
        self.seed = int(seed)
        self.classes, self.classes_path = load_classes(config.classes)
        self.class_names: Optional[list[str]] = [c.name for c in self.classes]
        self.templates = list(config.templates)
        self._fields = [
            {f for _, f, _, _ in string.Formatter().parse(t) if f is not None} for t in self.templates
        ]
        used = set().union(*self._fields)
        self.backgrounds: Optional[list[str]] = None
        self.backgrounds_path: Optional[Path] = None
        if "b" in used:
            self.backgrounds, self.backgrounds_path = load_backgrounds(config.backgrounds)
        for key, column in (("h", "hypernym"), ("d", "definition")):
            if key in used:
                empty = next((c for c in self.classes if not getattr(c, column)), None)
                if empty is not None:
                    raise RecipeError(
                        f"a template uses {{{key}}} but class {empty.wnid} ({empty.name}) has no {column} "
                        f"in {self.classes_path}"
                    )

    def __len__(self) -> int:
        return self.count

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> PromptRecord:
        i = check_index(index, self.count)
        label = i % len(self.classes)
        info = self.classes[label]
        t = stable_uint64(self.seed, i, "template") % len(self.templates)
        template = self.templates[t]
        fields = self._fields[t]
        values = {"c": info.lemma, "h": info.hypernym, "d": info.definition, "b": ""}
        meta = {"wnid": info.wnid, "template": template}
        if "b" in fields:
            assert self.backgrounds is not None
            values["b"] = self.backgrounds[stable_uint64(self.seed, i, "background") % len(self.backgrounds)]
        for key in sorted(fields):
            meta[_FIELD_META[key]] = values[key]
        return PromptRecord(
            index=i,
            prompt=template.format(**values),
            label=label,
            label_name=info.name,
            group=i,
            meta=meta,
        )

    def __iter__(self):
        return (self[i] for i in range(self.count))
