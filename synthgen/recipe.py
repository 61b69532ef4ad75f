"""Dataset recipes: a YAML file that says what to generate, validated with pydantic.

A recipe is ``name``, ``seed``, ``count`` and three sections: ``prompts`` (which sampler and its
settings), ``generator`` (which diffusers pipeline and how to run it) and ``output`` (how images are
stored). Unknown keys, wrong types and impossible values are rejected with one line naming the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from synthgen.errors import RecipeError
from synthgen.paths import RECIPES_DIR, recipe_folders  # noqa: F401  (RECIPES_DIR: re-exported)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Fields that change how fast or where a dataset is made, never what it holds (beyond the
    # rounding of batched kernels): left out of the content and settings hashes, so a build
    # resumes across them. Every other field -- a new one included -- changes the dataset.
    RUNTIME: ClassVar[frozenset[str]] = frozenset()
    # Fields that decide the plan (rows, shards) but not an image's pixels.
    LAYOUT: ClassVar[frozenset[str]] = frozenset()

    def content(self) -> dict[str, Any]:
        """The fields that decide the dataset, as plain data: everything but ``RUNTIME``."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.RUNTIME:
                continue
            value = getattr(self, name)
            out[name] = value.content() if isinstance(value, _Strict) else value
        return json.loads(json.dumps(out))  # plain JSON data (copies lists)

    def pixel_settings(self) -> dict[str, Any]:
        """The fields that decide an image's pixels: neither ``RUNTIME`` nor ``LAYOUT``."""
        return {k: v for k, v in self.content().items() if k not in self.LAYOUT}


# --------------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------------
class WordNetPrompts(_Strict):
    """ImageNet-SD prompts (Sariyildiz et al.): class name, hypernym, definition, background."""

    kind: Literal["wordnet"] = "wordnet"
    # A class table shipped in prompts/ (``imagenet1k``, ``imagenet100``, ``cifar10``), a path to a
    # class-table TSV, or a path to a text file of WordNet ids (a table is then built from WordNet).
    classes: str = "imagenet1k"
    # Templates use {c} (class name), {h} (hypernym), {d} (definition), {b} (background scene).
    # Each image's template is drawn from this list, reproducibly from the seed and its index.
    templates: list[str] = Field(default_factory=lambda: ["{c}, {h} inside {b}"], min_length=1)
    # Backgrounds b: a list shipped in prompts/ (``places365``) or a path to a text file.
    backgrounds: str = "places365"

    @field_validator("templates")
    @classmethod
    def _known_fields(cls, templates: list[str]) -> list[str]:
        import string

        for template in templates:
            for _, field, _, _ in string.Formatter().parse(template):
                if field is not None and field not in {"c", "h", "d", "b"}:
                    raise ValueError(
                        f"template {template!r} uses {{{field}}}; allowed fields are {{c}} {{h}} {{d}} {{b}}"
                    )
        return templates


class CaptionPrompts(_Strict):
    """StableRep prompts: real captions, ``images_per_caption`` images each sharing a group id."""

    kind: Literal["captions"] = "captions"
    # A local TSV/CSV/TXT/parquet file, or ``hf://datasets/ORG/NAME`` (a Hub dataset).
    source: str
    column: Optional[str] = None  # caption column for CSV/parquet/Hub; first column of a TSV
    split: str = "train"  # for Hub datasets
    revision: Optional[str] = None  # for Hub datasets
    images_per_caption: int = Field(10, ge=1)
    dedup: bool = True
    min_words: int = Field(1, ge=0)
    max_words: Optional[int] = Field(None, ge=1)
    shuffle: bool = False  # shuffle caption order (reproducibly, from the recipe seed)


class CombinatorialPrompts(_Strict):
    """Mormille & Atsumi prompts: one value from each named axis, e.g. category, size, color, view."""

    kind: Literal["combinatorial"] = "combinatorial"
    vocabulary: str = "combinatorial"  # a vocabulary shipped in prompts/ or a path to a YAML file
    separator: str = ", "
    # Axis whose value is the image's label (a ClassLabel column), or null for no labels.
    label_axis: Optional[str] = "category"


class ClassPrompts(_Strict):
    """Class ids for a class-conditioned pipeline (Lomurno et al.): no text prompt, one class per image."""

    kind: Literal["classes"] = "classes"
    # Class names in class-id order: a list, a class table shipped in prompts/ (``cifar10``) or a
    # class-table TSV; null: the class names of ``dataset`` (its ClassLabel column).
    classes: Union[list[str], str, None] = None
    # balanced: equal counts per class (the first count % classes get one more); dataset: in
    # proportion to the labels of ``dataset`` (largest remainders). Classes are interleaved, so every
    # prefix of the dataset (a CAS scale, a --limit build) keeps the planned proportions.
    distribution: Literal["balanced", "dataset"] = "balanced"
    dataset: Optional[str] = None  # a labelled dataset: a local folder or parquet file, or a Hub id
    split: str = "train"
    revision: Optional[str] = None  # for Hub datasets
    label_column: Optional[str] = None  # default: the first ClassLabel column, else label/labels

    @field_validator("classes")
    @classmethod
    def _names(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("needs at least one class name")
            if len(set(value)) != len(value):
                raise ValueError("class names must be unique")
            if any(not str(v).strip() for v in value):
                raise ValueError("class names must not be empty")
        return value


PromptsConfig = Annotated[
    Union[WordNetPrompts, CaptionPrompts, CombinatorialPrompts, ClassPrompts], Field(discriminator="kind")
]


# --------------------------------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------------------------------
SCHEDULERS = (
    "ddim",
    "pndm",
    "ddpm",
    "euler",
    "euler_ancestral",
    "dpm_solver_multistep",
    "dpm_solver_singlestep",
    "unipc",
    "lms",
    "heun",
)


class GeneratorConfig(_Strict):
    """How images are generated: which pipeline, which scheduler, how many steps, which guidance."""

    # Speed and placement only (see _Strict.RUNTIME): a build resumes across a change of these.
    RUNTIME: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "device", "max_retries", "attention_slicing", "vae_decode_chunk", "prompt_cache"}
    )

    # A Hub id (``stabilityai/stable-diffusion-2``), a local folder, or ``builtin:tiny-sd`` (a tiny
    # random-weight pipeline synthgen builds from configs: for demos and tests, never for quality).
    model: str
    revision: Optional[str] = None
    scheduler: Optional[str] = "ddim"  # null keeps the pipeline's own scheduler
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0)
    negative_prompt: Optional[str] = None
    height: int = Field(512, ge=8, le=4096)
    width: int = Field(512, ge=8, le=4096)
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "auto"  # auto: bf16 on CUDA (else fp16), fp32 elsewhere
    batch_size: int = Field(8, ge=1, le=4096)
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    max_retries: int = Field(3, ge=0, le=100)  # regenerations of black / non-finite / flagged images
    # true: keep the pipeline's own safety checker (when it has one) and regenerate what it flags;
    # false: load and run without it, since the SD checker flags benign ImageNet classes (swimwear,
    # brassiere, ...) on seed after seed and so stops a build. Content, not RUNTIME: it decides
    # which seed's image a row keeps
    safety_checker: bool = True
    attention_slicing: bool = False
    # torch.compile the UNet and the VAE decoder (batch dimension dynamic: one compile per image
    # size); auto: on CUDA only
    compile: Union[bool, Literal["auto"]] = "auto"

    # --- GPU speed (issue 10; benchmarks/bench_sd.py measures each one's speed and pixel effect).
    # "auto" means on for CUDA devices and off elsewhere: on a CPU these do not help, or cost time.
    attention: Literal["sdpa", "xformers"] = "sdpa"  # xformers: needs CUDA and a build matching torch
    channels_last: Union[bool, Literal["auto"]] = "auto"  # UNet and VAE weights/activations in NHWC
    fuse_qkv: Union[bool, Literal["auto"]] = "auto"  # one matmul for attention's Q, K, V (diffusers)
    # images per VAE decode call; auto: as many as half the free GPU memory holds (CPU: the batch)
    vae_decode_chunk: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = "auto"
    prompt_cache: int = Field(1024, ge=0)  # text embeddings of this many distinct prompts kept; 0: none
    # DeepCache step caching: the UNet's deep blocks run every Nth step only and are reused in
    # between (changes pixels: an approximation); 1 = off
    step_cache_interval: int = Field(1, ge=1, le=100)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: Optional[str]) -> Optional[str]:
        if name is not None and name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        return name

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8")
        return value


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
class OutputConfig(_Strict):
    LAYOUT: ClassVar[frozenset[str]] = frozenset({"split", "images_per_shard"})
    # How shards are written, never what they hold (see _Strict.RUNTIME): a build resumes across them.
    RUNTIME: ClassVar[frozenset[str]] = frozenset({"writer", "shards_in_flight"})

    split: str = Field("train", pattern=r"^[A-Za-z0-9_]+$")
    images_per_shard: int = Field(1000, ge=1)
    image_size: Optional[int] = Field(None, ge=1)  # stored size (square); null keeps generated size
    resize_filter: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bicubic"
    image_format: Literal["png", "jpeg", "webp"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    # pipelined: background threads encode and write shard k while the generator makes shard k+1
    # (the same bytes as serial: generate a shard, then write it, in turn)
    writer: Literal["pipelined", "serial"] = "pipelined"
    # pipelined: generated shards waiting for or being written at once; the generator waits when
    # the writer is this far behind (memory: at most shards_in_flight + 1 shards of images)
    shards_in_flight: int = Field(1, ge=1, le=8)


# --------------------------------------------------------------------------------------------------
# recipe
# --------------------------------------------------------------------------------------------------
class Recipe(_Strict):
    RUNTIME: ClassVar[frozenset[str]] = frozenset({"description"})

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**63)
    count: int = Field(gt=0)  # images to generate
    prompts: PromptsConfig
    generator: GeneratorConfig
    output: OutputConfig = Field(default_factory=OutputConfig)

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain data, every default filled in (what the manifest stores)."""
        return self.model_dump(mode="json")

    def recipe_hash(self) -> str:
        """Hash of everything that decides the dataset (not RUNTIME fields such as batch size or
        device); a changed hash means another dataset, which a folder refuses to resume into."""
        return _hash(self.content())

    def generation_settings(self, model: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The settings that decide an image's pixels besides its prompt and seed.

        ``model`` is the loaded pipeline's provenance: its resolved revision (a Hub commit or a
        content fingerprint) and dtype join the settings, so images of a model that changed, or
        ran in another precision, never share a settings hash.
        """
        settings = {**self.generator.pixel_settings(), **self.output.pixel_settings()}
        if self.output.image_format == "png":
            settings["jpeg_quality"] = None  # lossless: the quality setting is unused
        if model is not None:
            settings["model_revision"] = model["model_revision"]
            settings["resolved_dtype"] = model["dtype"]
        return settings

    def settings_hash(self, model: Optional[dict[str, Any]] = None) -> str:
        return _hash(self.generation_settings(model))[:16]


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def recipe_files(folders: Path | Sequence[Path] | None = None) -> dict[str, Path]:
    """Recipe name -> file, over ``folders`` (default: ``$SYNTHGEN_RECIPES``, then built-ins);
    an earlier folder's recipe hides a later one of the same name."""
    found: dict[str, Path] = {}
    for folder in _folder_list(folders):
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def list_recipes() -> list[str]:
    return list(recipe_files())


def is_path_like(text: str) -> bool:
    """A recipe argument names a file when it has a folder part or a YAML suffix (``./demo``,
    ``demo.yaml``, ``~/r/x``); otherwise it is a recipe name, whatever the current folder holds."""
    return "/" in text or os.sep in text or text.startswith(("~", ".")) or Path(text).suffix in {".yaml", ".yml"}


def find_recipe_file(
    name_or_path: str | Path, folder: Path | Sequence[Path], what: str = "recipe"
) -> Path:
    """A bare name (``demo``) resolves to ``<folder>/demo.yaml`` in the first of ``folder`` that
    holds it; a path-like argument (see :func:`is_path_like`) is a file."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or is_path_like(text):
        path = Path(text).expanduser()
        if path.is_dir():
            raise RecipeError(f"{path} is a folder, not a {what} file (a YAML file, or a {what} name)")
        if not path.is_file():
            raise RecipeError(f"{what} file not found: {path}")
        return path
    known = recipe_files(folder)
    if text in known:
        return known[text]
    hint = f"; for the file in this folder write ./{text}" if Path(text).is_file() else ""
    missing = [str(f) for f in _folder_list(folder) if not f.is_dir()]
    if missing:  # e.g. a typo in SYNTHGEN_RECIPES
        hint += f"; recipe folder(s) not found: {', '.join(missing)}"
    close = difflib.get_close_matches(text, list(known), n=2, cutoff=0.6)
    if close and not hint:
        raise RecipeError(f"unknown {what} {text!r} (did you mean {' or '.join(close)}?)")
    raise RecipeError(f"unknown {what} {text!r}: not one of {', '.join(known) or '(none found)'}{hint}")


def _folder_list(folders: Path | Sequence[Path] | None) -> list[Path]:
    if folders is None:
        return recipe_folders()
    return [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]


def recipe_path(name_or_path: str | Path) -> Path:
    return find_recipe_file(name_or_path, recipe_folders(), "recipe")


def read_yaml_mapping(path: Path, what: str = "recipe") -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping; malformed YAML is one line with its position."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} is a YAML mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``generator.guidance_scale=2`` -> (["generator", "guidance_scale"], 2); values are YAML."""
    if "=" not in text:
        raise RecipeError(f"--set expects KEY=VALUE (e.g. generator.guidance_scale=2), got {text!r}")
    key, value = text.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise RecipeError(f"--set: bad key {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return keys, parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {'.'.join(keys)}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe (a quick partial build is ``build_dataset(limit=)``)."""
    path = recipe_path(name_or_path)
    data = apply_overrides(read_yaml_mapping(path), overrides or [])
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {format_validation_error(exc, Recipe)}") from None


_PROMPT_KINDS = {"wordnet", "captions", "combinatorial", "classes"}  # PromptsConfig's discriminator tags


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation can hold (through Optional, Union, Annotated, list, dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _tag_values(model: type[BaseModel]) -> set[Any]:
    return {v for f in model.model_fields.values() if typing.get_origin(f.annotation) is Literal
            for v in typing.get_args(f.annotation)}


def _did_you_mean(model: type[BaseModel], loc: Sequence[Any]) -> str:
    """`` (did you mean train_limit?)`` for an unknown key ``loc[-1]`` close to a field where it stands."""
    models = [model]
    for part in loc[:-1]:
        inner = [m for cls in models if part in cls.model_fields for m in _models_in(cls.model_fields[part].annotation)]
        # not a field: a union's tag (keep the member it names), a list index or a dict key (keep them all)
        models = inner or [cls for cls in models if part in _tag_values(cls)] or models
    names = sorted({name for cls in models for name in cls.model_fields})
    close = difflib.get_close_matches(str(loc[-1]), names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def format_validation_error(exc: ValidationError, model: Optional[type[BaseModel]] = None) -> str:
    """One line naming the key of each problem: ``generator.steps: must be >= 1 (got -3)``; an
    unknown key of ``model`` also names the known keys close to it."""
    parts = []
    for err in exc.errors():
        # Drop the discriminator tag pydantic puts in the path (prompts.wordnet.classes -> prompts.classes)
        loc = [str(p) for p in err["loc"]]
        hint = _did_you_mean(model, err["loc"]) if model is not None and err["type"] == "extra_forbidden" else ""
        if loc[:1] == ["prompts"] and len(loc) > 1 and loc[1] in _PROMPT_KINDS:
            del loc[1]
        key = ".".join(loc) or "recipe"
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key" + hint
        elif kind == "missing":
            msg = "missing required key"
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            got = f"got {err['input']!r}" if "input" in err else ""
            if got and kind not in {"union_tag_invalid", "model_type"} and got not in msg:
                msg += f" ({got})"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)
