"""The class-conditioning recipe (``kind: classcond`` in ``train/``): every stage's settings in one file.

::

    kind: classcond
    name: classcond-cifar10
    base_model: CompVis/stable-diffusion-v1-4   # any SD 1.x/2.x pipeline (Hub id, folder, builtin:tiny-sd)
    dataset: {source: ../shared/datasets/cifar10, split: train, test_split: test}
    encoder: {...}        # stage 1 (EncoderStageConfig; Lomurno et al.'s defaults)
    unet: {...}           # stage 3 (UNetStageConfig)
    tuning: {...}         # stages 2 and 4 (TuningConfig)
    final: {...}          # the x1..xk datasets and their CAS (FinalConfig)
    generation: cifar10-classcond   # the dataset recipe whose generator/output settings make the images

Images are made the same way in tuning trials and in the final datasets: with the ``generator`` and
``output`` sections of the dataset recipe ``generation`` (scheduler, precision, batch, stored size,
resize filter); each stage then sets the model, steps, guidance, count and class distribution.
Loaded with :func:`load_classcond_recipe` (a name in ``train/`` or a YAML file, ``--set`` overrides);
unknown keys and bad values are one line naming the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synthgen.classcond.config import EncoderStageConfig, UNetStageConfig
from synthgen.errors import RecipeError

__all__ = [
    "DatasetSection",
    "PrunerSpec",
    "TuningConfig",
    "FinalConfig",
    "ClassCondRecipe",
    "load_classcond_recipe",
    "classcond_recipe_from_dict",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DatasetSection(_Strict):
    """The labelled real dataset: a local folder or parquet file, or a Hub id."""

    source: str
    split: str = "train"  # stages 1 and 3 train on it; tuning validates on its held-out images
    test_split: str = "test"  # read by the final CAS only, never while tuning
    revision: Optional[str] = None
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    limit: Optional[int] = Field(None, ge=1)  # stages 1 and 3: the first N training images only


class PrunerSpec(_Strict):
    """Optuna's HyperbandPruner over classifier epochs (the resource)."""

    min_resource: int = Field(1, ge=1)
    max_resource: Optional[int] = Field(None, ge=1)  # null: the tuning protocol's epochs
    reduction_factor: int = Field(3, ge=2)
    bootstrap_count: int = Field(0, ge=0)


class TuningConfig(_Strict):
    """Stages 2 and 4: TPE over steps, guidance and a checkpoint epoch; each trial generates
    ``images`` label-balanced images and trains the CAS classifier on them, validated every epoch
    on the real held-out images of ``protocol`` (the pruner sees every epoch)."""

    images: int = Field(4000, ge=1)  # per trial (their hyp_opt.py: --num_imgs 4000)
    encoder_trials: int = Field(50, ge=1)  # stage 2 (their hyp_opt.py: 50 iterations)
    unet_trials: int = Field(40, ge=1)  # stage 4 (their hyp_opt.py: 40)
    steps: tuple[int, int] = (5, 50)  # stage 2; stage 4 searches [steps[0], best steps]
    guidance: tuple[float, float] = (0.0, 7.5)  # stage 2; stage 4 searches [guidance[0], 2 x best]
    # The first trial of stage 2 runs the paper's defaults (Stable Diffusion's 50 steps and guidance
    # 7.5, the last encoder epoch); stage 4's runs stage 2's best steps and guidance, last UNet epoch.
    defaults: tuple[int, float] = (50, 7.5)
    protocol: str = "cas-lomurno"  # a CAS protocol in train/ or a YAML file
    # --set overrides of the protocol. Their hyp_opt.py trains the tuning classifier with plateau
    # patience 25 and early-stopping patience 50 (their CAS runs use 10 and 25).
    protocol_overrides: list[str] = Field(default_factory=lambda: ["plateau.patience=25", "early_stopping.patience=50"])
    seed: int = Field(0, ge=0)  # image seeds (the same for every trial), classifier and TPE seeds
    storage: Literal["sqlite", "journal"] = "sqlite"  # sqlite: one process; journal: several processes
    max_retries: int = Field(2, ge=0)  # a trial whose process died is retried this many times
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    importance: Literal["ped-anova", "fanova"] = "ped-anova"  # fanova (their figure) needs scikit-learn

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with 1 <= low <= high (got {list(v)})")
        return v

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with 0 <= low <= high (got {list(v)})")
        return v

    @model_validator(mode="after")
    def _defaults_inside(self) -> "TuningConfig":
        steps, guidance = self.defaults
        if not (self.steps[0] <= steps <= self.steps[1] and self.guidance[0] <= guidance <= self.guidance[1]):
            raise ValueError(f"defaults {list(self.defaults)} lie outside steps {list(self.steps)} / guidance {list(self.guidance)}")
        return self


class FinalConfig(_Strict):
    """The tuned datasets: ``max(scales)`` scale units generated once, CAS on each prefix ``xk``."""

    scales: list[int] = Field(default_factory=lambda: list(range(1, 11)))
    distribution: Literal["balanced", "dataset"] = "dataset"  # the paper: the real class distribution
    protocol: str = "cas-lomurno"
    protocol_overrides: list[str] = Field(default_factory=list)
    seed: int = Field(0, ge=0)  # the dataset recipe's seed and the classifiers' seed

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("must be positive integers")
        return sorted(set(v))


class ClassCondRecipe(_Strict):
    kind: Literal["classcond"] = "classcond"
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    base_model: str
    base_revision: Optional[str] = None
    dataset: DatasetSection
    generation: str = "cifar10-classcond"  # a dataset recipe (name or file): its generator/output sections
    encoder: EncoderStageConfig = Field(default_factory=EncoderStageConfig)
    unet: UNetStageConfig = Field(default_factory=UNetStageConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    final: FinalConfig = Field(default_factory=FinalConfig)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def classcond_recipe_from_dict(data: dict, source: str = "recipe") -> ClassCondRecipe:
    from synthgen.recipe import format_validation_error

    if data.get("kind") != "classcond":
        raise RecipeError(f"{source} is not a class-conditioning recipe (it has no 'kind: classcond')")
    try:
        return ClassCondRecipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {format_validation_error(exc, ClassCondRecipe)}") from None


def load_classcond_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ClassCondRecipe:
    """A ``kind: classcond`` recipe from ``train/`` (by name) or a YAML file, with ``--set`` overrides."""
    from synthgen.train.config import load_train_recipe

    data, source = load_train_recipe(name_or_path, list(overrides))
    return classcond_recipe_from_dict(data, source)
