"""The generator path for class-conditioned pipelines (``synthgen.ClassConditionedPipeline``).

A folder saved by :class:`~synthgen.classcond.pipeline.ClassConditionedPipeline` names that class in
its ``model_index.json``; ``load_pipeline`` sees it and loads the folder with synthgen's own class
(:func:`load_class_conditioned`) -- diffusers does not know the class, and no remote code is ever
run. :class:`ImageGenerator` then hands such a pipeline to :class:`ClassConditionedGenerator`, which
calls it with class ids instead of prompts:

* a record's class is its ``meta["class_name"]`` (the class sampler's) mapped by name onto the
  pipeline's class ids, so a dataset's label ids and the pipeline's may differ in order; a name the
  pipeline does not know is refused;
* one ``torch.Generator`` per image, seeded exactly as for text pipelines (``image_seed``), so a row's
  class, seed and the recipe's settings regenerate its pixels (:meth:`ClassConditionedGenerator.regenerate_row`);
* the pipeline returns latents and the engine's decoder (``decode.py``) makes the pixels, rejects
  black or non-finite images and retries them with the next seed, as for text pipelines.

Provenance: the folder's content fingerprint is the model revision in every row's settings hash, so
it covers the class encoder's and the UNet's weights; the checkpoint epochs the pipeline was
assembled from (its ``training`` config) go to the manifest's model record as ``class_conditioning``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from synthgen.errors import SynthgenError
from synthgen.generate.generator import ImageGenerator, _reason
from synthgen.generate.decode import rejection_stats, to_uint8
from synthgen.generate.stepcache import reset_step_cache
from synthgen.prompts.base import PromptRecord

__all__ = [
    "PIPELINE_CLASS",
    "is_class_conditioned",
    "download_class_conditioned",
    "load_class_conditioned",
    "conditioning_record",
    "ClassConditionedGenerator",
]

PIPELINE_CLASS = "ClassConditionedPipeline"


def download_class_conditioned(repo_id: str, revision: Optional[str] = None, *, local_files_only: bool = False,
                               token: Any = None, cache_dir: Any = None) -> Optional[str]:
    """The snapshot folder of the Hub class-conditioned pipeline ``repo_id``, or None when the repo
    holds another kind of pipeline. diffusers' own download takes a component from a library it does
    not know (``synthgen``) for custom code the repo must hold, and refuses; synthgen's pipelines hold
    configs and safetensors only, fetched as they are (nothing that runs code)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    where = {"revision": revision, "local_files_only": local_files_only, "token": token, "cache_dir": cache_dir}
    index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", **where)).read_text())
    if index.get("_class_name") != PIPELINE_CLASS:
        return None
    return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"], **where)


def is_class_conditioned(folder: str | Path) -> bool:
    """Whether the pipeline folder's ``model_index.json`` names :data:`PIPELINE_CLASS`."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return index.get("_class_name") == PIPELINE_CLASS


def load_class_conditioned(folder: Path, model: str, dtype: Any):
    """A saved class-conditioned pipeline, loaded by its class (safetensors only; one-line errors)."""
    from synthgen.classcond.pipeline import ClassConditionedPipeline
    from synthgen.generate.pipeline import _dtype_kwarg, quiet_loading

    try:
        with quiet_loading():
            return ClassConditionedPipeline.from_pretrained(folder, use_safetensors=True, **{_dtype_kwarg(): dtype})
    except SynthgenError:
        raise
    except (OSError, ValueError, TypeError, AttributeError, ImportError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SynthgenError(f"cannot load class-conditioned model {model!r} from {folder}: {first[:300]}") from None


def conditioning_record(pipe: Any) -> dict[str, Any]:
    """What the manifest records of a class-conditioned pipeline ({} for any other pipeline):
    its classes and where its weights came from (run, encoder and UNet epochs, base model)."""
    if type(pipe).__name__ != PIPELINE_CLASS:
        return {}
    return {"class_names": list(pipe.class_names), "training": dict(pipe.config.training or {})}


class ClassConditionedGenerator(ImageGenerator):
    """:class:`ImageGenerator` for a class-conditioned pipeline: records' classes in, images out."""

    def __init__(self, loaded, cfg, output, recipe_seed: int) -> None:
        super().__init__(loaded, cfg, output, recipe_seed)
        if cfg.negative_prompt is not None:
            raise SynthgenError("generator.negative_prompt: a class-conditioned pipeline takes no text; remove it")
        self.class_ids = {name: i for i, name in enumerate(self.pipe.class_names)}

    def condition_of(self, record: PromptRecord) -> int:
        """The pipeline's class id for ``record`` (its class name looked up in the pipeline's classes)."""
        name = record.meta.get("class_name", record.label_name) if record.meta else record.label_name
        if name is None:
            raise SynthgenError(
                f"image {record.index} has no class (a class-conditioned pipeline needs prompts.kind: classes)"
            )
        return self.class_id(name)

    def class_id(self, name: str) -> int:
        try:
            return self.class_ids[name]
        except KeyError:
            from synthgen.prompts.classes import check_class_names

            check_class_names([name], list(self.class_ids), self.loaded.model)
            raise

    def describe(self, record: PromptRecord) -> str:
        return f"class {record.meta.get('class_name', record.label_name)!r}"

    def run_pipeline(self, class_ids: Sequence[int], seeds: Sequence[int]) -> tuple[np.ndarray, list[Optional[str]]]:
        """One pipeline call: uint8 images (N, H, W, 3) and why each must not be stored (None: fine)."""
        if len(class_ids) != len(seeds):
            raise ValueError("one seed per class id")
        cfg = self.cfg
        kwargs: dict[str, Any] = dict(
            class_ids=list(class_ids),
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            generator=self._generators(seeds),
            output_type="latent",
        )
        with self._quiet():
            reset_step_cache(self.pipe.unet)
            out = self._denoise(kwargs)
        images, _ = self.decoder(out.images)
        finite, largest = rejection_stats(images)
        reasons = [_reason(f, m, False) for f, m in zip(finite, largest)]
        return to_uint8(images), reasons

    def generate_class(self, class_id: int, seed: int):
        """The stored-size image of the pipeline's class ``class_id`` from ``seed`` (no retries)."""
        arrays, _ = self.run_pipeline([class_id], [seed])
        return self._finish(arrays[0])

    def regenerate_row(self, row: dict):
        """A dataset row's pixels again, from its class name and seed."""
        meta = row.get("meta")
        meta = json.loads(meta) if isinstance(meta, str) else (meta or {})
        name = meta.get("class_name")
        if name is None:
            raise SynthgenError(f"row {row.get('index')} has no class name in its meta column; it was not made by a class-conditioned pipeline")
        return self.generate_class(self.class_id(name), row["seed"])
