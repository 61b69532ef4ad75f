"""Training recipes: YAML files under ``train/`` validated with pydantic.

Two kinds of recipe share this module:

* a **pre-training** recipe (``synthgen pretrain``): ``dataset``, ``model``, ``objective`` (one of
  ``rotation``, ``simclr``, ``stablerep``, told apart by ``objective.kind``), ``optimizer``,
  ``schedule``;
* an **evaluation** recipe (``synthgen evaluate``): ``protocol`` (``linear``, ``knn`` or
  ``finetune``), ``checkpoint`` or ``model``, ``dataset`` and the protocol's section.

Unknown keys, wrong types and impossible values are rejected with one line naming the key
(``optimizer.lr: Input should be greater than 0 (got -1)``, ``schedule.epoch: unknown key``).

Dataset ``source`` is a local path or a Hub id. A relative path is resolved against the **current
working directory** (recipes under ``train/`` are written to be run from the repository root, e.g.
``../shared/datasets/cifar10``); anything that exists locally, or starts with ``.``, ``/`` or ``~``,
is a path, anything else of the form ``org/name`` is a Hub id read at ``revision``. An fsspec URL
(``s3://bucket/folder`` of a ``synthgen build``) is read with the environment's credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from synthgen.errors import RecipeError, SynthgenError
from synthgen.paths import TRAIN_RECIPES_DIR
from synthgen.recipe import apply_overrides, find_recipe_file, format_validation_error, read_yaml_mapping

__all__ = [
    "DatasetSpec",
    "ModelSpec",
    "AugmentSpec",
    "RotationObjective",
    "SimCLRObjective",
    "StableRepObjective",
    "OptimizerSpec",
    "ScheduleSpec",
    "PretrainConfig",
    "EvalDatasetSpec",
    "LinearProbeSpec",
    "KnnSpec",
    "FinetuneSpec",
    "EvalConfig",
    "list_train_recipes",
    "train_recipe_path",
    "load_train_recipe",
    "load_pretrain_config",
    "load_eval_config",
    "resolve_source",
    "config_hash",
]


def switch_words(on: str, off: str = "off") -> BeforeValidator:
    """For a setting spelled in words (``compile: off``): YAML 1.1 reads an unquoted ``off``/``on``
    (also ``no``/``yes``) as a boolean, so ``--set compile=off`` arrives as False. Take a boolean
    back as the setting's ``off`` word or the word ``on`` stands for."""

    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            return on if value else off
        return value

    return BeforeValidator(parse)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------------
# shared sections
# --------------------------------------------------------------------------------------------------
class SourceSpec(_Strict):
    """One source of a mixture: a split of a local folder/parquet file or a Hub id at a revision,
    with the number of rows to take (``size``) or the share of its rows (``fraction``, in (0, 1])."""

    source: str
    revision: Optional[str] = None
    split: str = "train"
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    group_column: Optional[str] = None
    size: Optional[int] = Field(None, ge=1)
    fraction: Optional[float] = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_amount(self) -> "SourceSpec":
        if self.size is not None and self.fraction is not None:
            raise ValueError("give size or fraction, not both")
        return self


class DatasetSpec(_Strict):
    """The training images: one split (``source``) or a mixture of several (``sources``).

    ``stream: true`` reads the parquet shards batch by batch with DataLoader workers instead of
    decoding the split into memory (data larger than memory; rotation and SimCLR only)."""

    source: Optional[str] = None  # a local folder/parquet file (relative to the cwd), a Hub id or an s3:// URL
    revision: Optional[str] = None  # Hub revision (tag, branch or commit)
    split: str = "train"
    image_column: Optional[str] = None  # detected (first Image feature) when null
    label_column: Optional[str] = None  # detected (first ClassLabel, else "label"/"labels")
    group_column: Optional[str] = None  # StableRep caption id; "group" is used when present
    image_size: Optional[int] = Field(None, ge=8)  # resize + centre crop at load time
    limit: Optional[int] = Field(None, ge=1)  # first N rows only
    sources: Optional[list[SourceSpec]] = Field(None, min_length=1)  # a mixture instead of one source
    stream: bool = False
    num_workers: int = Field(2, ge=0)  # DataLoader workers when streaming

    @model_validator(mode="after")
    def _one_kind(self) -> "DatasetSpec":
        if (self.source is None) == (self.sources is None):
            raise ValueError("give either source (one dataset) or sources (a mixture)")
        if self.sources is not None and self.stream:
            raise ValueError("stream applies to one source, not a mixture")
        return self


class ModelSpec(_Strict):
    """A backbone from :func:`synthgen.train.models.create_model` (``list_models()`` names)."""

    name: str = "vit_tiny"
    image_size: int = Field(32, ge=8)  # the resolution the network is built for
    pretrained: bool = False  # timm weights (needs the Hub cache)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed through to create_model


Normalization = Literal["dataset", "imagenet", "cifar", "half"]


class AugmentSpec(_Strict):
    """Per-image contrastive views (see :class:`synthgen.train.augment.ContrastiveAugment`)."""

    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    strength: float = Field(0.5, ge=0)  # colour-jitter strength s (0.5 CIFAR, 1.0 ImageNet)
    jitter_p: float = Field(0.8, ge=0, le=1)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.0, ge=0, le=1)
    flip_p: float = Field(0.5, ge=0, le=1)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("must satisfy 0 < low <= high <= 1")
        return v


class RotationObjective(_Strict):
    """Mormille & Atsumi / Gidaris et al.: predict the rotation (0/90/180/270) of each image.

    ``batch_size`` counts source images; each step sees all four rotations of each (4x as many).
    """

    kind: Literal["rotation"] = "rotation"
    batch_size: int = Field(80, ge=1)
    augment: Literal["none", "crop_flip"] = "none"  # crop_flip: CIFAR pad-4 crop + h-flip first


class SimCLRObjective(_Strict):
    """SimCLR: two augmented views per image, NT-Xent on an MLP projection."""

    kind: Literal["simclr"] = "simclr"
    batch_size: int = Field(256, ge=2)
    temperature: float = Field(0.5, gt=0)
    projection_dim: int = Field(128, ge=1)
    projection_hidden: Optional[int] = Field(None, ge=1)  # null: the backbone's feature width
    projection_layers: int = Field(2, ge=1)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)


class StableRepObjective(_Strict):
    """StableRep: multi-positive contrastive loss over images that share a caption (group)."""

    kind: Literal["stablerep"] = "stablerep"
    groups_per_batch: int = Field(64, ge=2)  # captions per batch (k); batch = k * images_per_group
    images_per_group: int = Field(6, ge=1)  # m images of each caption per batch
    short_groups: Literal["skip", "replace"] = "skip"
    temperature: float = Field(0.1, gt=0)
    projection_dim: int = Field(256, ge=1)
    projection_hidden: Optional[int] = Field(4096, ge=1)
    projection_layers: int = Field(3, ge=1)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)


Objective = Annotated[Union[RotationObjective, SimCLRObjective, StableRepObjective], Field(discriminator="kind")]


class OptimizerSpec(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: Optional[float] = Field(1e-3, gt=0)  # the absolute rate (null: from base_lr)
    # StableRep's rule (main_stablerep.py): lr = blr * captions * n_img / 256 * num_crop / 2, i.e. with
    # one crop per image lr = base_lr * (images per global batch) / 512
    base_lr: Optional[float] = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # StableRep's add_weight_decay: no decay on biases and 1-d parameters (norm layers)
    decay_exempt_bias_and_norm: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0)  # sgd only
    grad_clip: Optional[float] = Field(None, gt=0)  # max global grad norm

    @model_validator(mode="after")
    def _rate(self) -> "OptimizerSpec":
        if (self.lr is None) == (self.base_lr is None):
            raise ValueError("give lr (absolute) or base_lr (scaled by the batch), not both or neither")
        return self

    def resolved_lr(self, images_per_batch: int) -> float:
        return float(self.lr) if self.lr is not None else float(self.base_lr) * images_per_batch / 512


class ScheduleSpec(_Strict):
    """The rate schedule, sized to the steps actually run (``max_steps`` caps the run AND the schedule)."""

    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # stop after this many steps (demo runs)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up from 0
    warmup_epochs: Optional[float] = Field(None, ge=0)  # instead of warmup_steps: a share of epochs (StableRep: 0.5)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine decays to 0 at the last step

    def warmup(self, steps_per_epoch: int) -> int:
        if self.warmup_epochs is not None:
            return int(round(self.warmup_epochs * steps_per_epoch))
        return self.warmup_steps


class PretrainConfig(_Strict):
    name: str
    seed: int = 0
    dataset: DatasetSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    objective: Objective
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    # per-channel mean/std: of the training data ("dataset"), ImageNet's, CIFAR-10's, or 0.5 ("half")
    normalization: Normalization = "dataset"
    device: str = "auto"  # auto: cuda when available, else cpu
    amp: bool = True  # bf16/fp16 autocast on CUDA (ignored on CPU)
    compile: Annotated[Literal["off", "auto", "default", "reduce-overhead", "max-autotune"], switch_words(on="default")] = "off"
    channels_last: bool = True  # CUDA only
    log_every: int = Field(10, ge=1)  # steps between metrics records
    checkpoint_every: int = Field(1, ge=1)  # epochs between checkpoints (and at the end / max_steps)


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
class EvalDatasetSpec(_Strict):
    source: str
    revision: Optional[str] = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    image_size: Optional[int] = Field(None, ge=8)  # default: the model's image_size
    train_limit: Optional[int] = Field(None, ge=2)  # the first N rows of the train split only
    test_limit: Optional[int] = Field(None, ge=1)  # the first N rows of the test split only
    val_fraction: float = Field(0.1, gt=0, lt=1)  # carved (stratified) from train for model selection


class LinearProbeSpec(_Strict):
    """Logistic regression on frozen, standardised features; (weight decay, epoch) picked on val."""

    epochs: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)  # Adam
    batch_size: int = Field(1024, ge=1)
    weight_decays: list[float] = Field(default_factory=lambda: [0.0, 1e-5, 1e-4, 1e-3], min_length=1)
    patience: int = Field(20, ge=1)  # epochs without val improvement before stopping


class KnnSpec(_Strict):
    """Weighted k-NN (cosine similarity, weights exp(s / temperature)) as in InstDisc/DINO."""

    k: list[int] = Field(default_factory=lambda: [20, 200], min_length=1)
    temperature: float = Field(0.07, gt=0)

    @field_validator("k", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @field_validator("k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("every k must be >= 1")
        return v


class FinetuneSpec(_Strict):
    """Full fine-tuning: backbone + a new linear head, cross-entropy; best epoch picked on val."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(name="adamw", lr=1e-4, weight_decay=0.05))
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: Literal["none", "crop_flip"] = "crop_flip"
    max_steps: Optional[int] = Field(None, ge=1)  # cap (quick runs)


class EvalConfig(_Strict):
    name: str
    seed: int = 0
    protocol: Literal["linear", "knn", "finetune"]
    # a pre-training output folder or checkpoint file (relative to the cwd); null: use ``model``
    checkpoint: Optional[str] = None
    # without a checkpoint: a fresh (or timm-pretrained) backbone, or name "pixels" (raw pixels)
    model: Optional[ModelSpec] = None
    dataset: EvalDatasetSpec
    linear: LinearProbeSpec = Field(default_factory=LinearProbeSpec)
    knn: KnnSpec = Field(default_factory=KnnSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    # null: the checkpoint's normalisation (else "dataset")
    normalization: Optional[Normalization] = None
    feature_batch_size: int = Field(256, ge=1)
    device: str = "auto"
    amp: bool = True

    @model_validator(mode="after")
    def _backbone(self) -> "EvalConfig":
        if self.checkpoint is None and self.model is None:
            raise ValueError("give either checkpoint (a pre-training output) or model")
        if self.checkpoint is not None and self.model is not None:  # the checkpoint would silently win
            raise ValueError("give either checkpoint or model, not both (set the other to null)")
        return self


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def list_train_recipes() -> list[str]:
    return sorted(p.stem for p in TRAIN_RECIPES_DIR.glob("*.yaml"))


def train_recipe_path(name_or_path: str | Path) -> Path:
    """``rotation-vit`` -> ``train/rotation-vit.yaml``; anything with a .yaml suffix is a path."""
    return find_recipe_file(name_or_path, TRAIN_RECIPES_DIR, "training recipe")


def load_train_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """Read a training recipe (YAML mapping) and apply ``--set key=value`` overrides."""
    path = train_recipe_path(name_or_path)
    return apply_overrides(read_yaml_mapping(path, "training recipe"), list(overrides or [])), str(path)


def _validate(cls, data: dict[str, Any], source: str):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        msg = format_validation_error(exc, cls)
        for tag in ("rotation.", "simclr.", "stablerep."):  # drop the discriminator tag from keys
            msg = msg.replace(f"objective.{tag}", "objective.")
        raise RecipeError(f"{source}: {msg}") from None


def _recipe_data(recipe: str | Path | dict[str, Any], overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    if isinstance(recipe, dict):
        data, source = apply_overrides(json.loads(json.dumps(recipe)), list(overrides or [])), "recipe"
    else:
        data, source = load_train_recipe(recipe, overrides)
    if data.get("kind") == "cas":
        raise RecipeError(f"{source} is a CAS protocol; run it with `synthgen cas SYNTHETIC --real REAL --protocol ...`")
    return data, source


def load_pretrain_config(
    recipe: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> PretrainConfig:
    data, source = _recipe_data(recipe, overrides)
    if "protocol" in data and "objective" not in data:
        raise RecipeError(f"{source} is an evaluation recipe (it has 'protocol'); run it with `synthgen evaluate`")
    return _validate(PretrainConfig, data, source)


def load_eval_config(recipe: str | Path | dict[str, Any], overrides: list[str] | None = None) -> EvalConfig:
    data, source = _recipe_data(recipe, overrides)
    if "objective" in data and "protocol" not in data:
        raise RecipeError(f"{source} is a pre-training recipe (it has 'objective'); run it with `synthgen pretrain`")
    return _validate(EvalConfig, data, source)


def resolve_source(source: str, what: str = "dataset") -> str:
    """A local path (relative to the cwd) made absolute, or a Hub id or an fsspec URL (``s3://...``,
    read with the environment's credentials) returned unchanged."""
    from synthgen.dataset.storage import is_url

    if is_url(source):  # load_image_dataset reads fsspec URLs (file:// included) as they are
        return source
    expanded = os.path.expanduser(source)
    if os.path.exists(expanded):
        return str(Path(expanded).resolve())
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1) or source.count("/") != 1:
        raise SynthgenError(
            f"{what} {source!r} not found (relative paths are resolved against the current directory, {os.getcwd()})"
        )
    return source


def config_hash(config: BaseModel) -> str:
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
