"""Turn prompt records into images, reproducibly, and never store a black or broken image.

Seeds. Image ``i`` of a recipe with seed ``s`` is generated from its own ``torch.Generator`` seeded
with ``image_seed(s, i, attempt)``; the pipeline receives one generator per image, so an image's
initial noise (and the per-step noise of ancestral schedulers) depends only on its own seed, not on
its neighbours in the batch or on the batch size. Generators live on the CPU on every device
(diffusers draws the noise on the CPU and moves it), so the starting noise of a seed is the same on
CPU, CUDA and MPS; the denoised pixels still depend on the device's arithmetic.

Rejection rule. An image (the pipeline's float output in [0, 1], before uint8 conversion) is
rejected when

* any value is non-finite (NaN or inf: e.g. a float16 overflow), or
* it is black: its brightest value, converted to uint8 like every stored pixel
  (``round(x * 255)``), is at most 1 -- every channel of every pixel would be stored as 0 or 1.
  That is what the Stable Diffusion safety checker returns, and what a collapsed decode gives, or
* the pipeline flags it in ``nsfw_content_detected`` (the safety checker blacked it out); with
  ``generator.safety_checker: false`` the pipeline is loaded without its checker and nothing is flagged.

A rejected image is regenerated with the next attempt's seed ``image_seed(s, i, attempt + 1)`` --
the seed actually used is the one recorded -- up to ``cfg.max_retries`` times; an image still
rejected after that raises :class:`SynthgenError` naming its index.

Regeneration. A stored row's ``(prompt, seed)`` plus the recipe's generation settings reproduce its
pixels: :meth:`ImageGenerator.generate_one` runs exactly the same call for one image.

The call. For Stable Diffusion pipelines the text embeddings come from a per-prompt cache
(``embeddings.py``), the pipeline returns latents, and ``decode.py`` decodes them in chunks, runs
the safety checker, computes the rejection statistics and converts to uint8 on the device. On a
CPU in float32 this gives the same pixels as the pipeline's own ``output_type="np"`` call (tested).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from synthgen.errors import SynthgenError
from synthgen.generate.decode import LatentDecoder, rejection_stats, to_uint8
from synthgen.generate.embeddings import PromptEmbeddings
from synthgen.generate.pipeline import LoadedPipeline
from synthgen.generate.stepcache import reset_step_cache
from synthgen.generate.seeds import image_seed
from synthgen.prompts.base import PromptRecord
from synthgen.recipe import GeneratorConfig, OutputConfig

logger = logging.getLogger(__name__)

#: an image whose brightest uint8 level (round(max * 255)) is at most this is black (module doc)
BLACK_MAX_LEVEL = 1
#: the rejection reason of an image the pipeline's safety checker flagged (generator.safety_checker)
FLAGGED = "flagged by safety checker"
#: generators are created on this device whatever the pipeline's device (see the module doc)
GENERATOR_DEVICE = "cpu"

RESIZE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass
class GeneratedImage:
    index: int  # the image's global index (PromptRecord.index)
    image: Image.Image  # RGB, at the stored size
    seed: int  # the seed that produced ``image`` (image_seed(recipe_seed, index, retries))
    retries: int = 0  # regenerations needed (0: the first attempt was kept)
    rejected_reasons: list[str] = field(default_factory=list)  # why each rejected attempt failed
    prompt: Optional[str] = None


@dataclass
class GenerationStats:
    """Counters for the build manifest."""

    images: int = 0  # images returned
    attempts: int = 0  # images the pipeline produced (kept + rejected)
    retried_images: int = 0  # images that needed at least one regeneration
    retries: int = 0  # regenerations in total
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    failed: int = 0  # images still rejected after max_retries (the build stops)

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "attempts": self.attempts,
            "retried_images": self.retried_images,
            "retries": self.retries,
            "rejected": dict(sorted(self.rejected.items())),
            "failed": self.failed,
        }


def rejection_reason(array: np.ndarray, nsfw: bool = False) -> Optional[str]:
    """Why a float image (H, W, C in [0, 1]) must not be stored, or None if it is fine."""
    finite = bool(np.isfinite(array).all())
    return _reason(finite, float(array.max()) if finite and array.size else None, nsfw)


def _reason(finite: bool, largest: Optional[float], nsfw: bool) -> Optional[str]:
    """The rejection rule (module doc) on an image's statistics; ``largest`` None: an empty image."""
    if not finite:
        return "non-finite values"
    if nsfw:
        return FLAGGED
    if largest is None or round(largest * 255) <= BLACK_MAX_LEVEL:
        return "black image"
    return None


def to_pil(array: np.ndarray) -> Image.Image:
    """uint8 or float [0, 1] (H, W, C) -> RGB PIL image, rounding like diffusers' ``numpy_to_pil``."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float32), 0.0, 1.0)
        arr = (arr * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def resize_to_stored(image: Image.Image, output: OutputConfig) -> Image.Image:
    """Resize to ``output.image_size`` (square) with ``output.resize_filter`` when it differs."""
    size = output.image_size
    if size is None or image.size == (size, size):
        return image
    return image.resize((size, size), RESIZE_FILTERS[output.resize_filter])


class ImageGenerator:
    """Generates the images of prompt records with a loaded pipeline and a recipe's settings.

    A class-conditioned pipeline gets :class:`~synthgen.generate.classcond.ClassConditionedGenerator`
    (class ids instead of prompts): ``ImageGenerator(loaded, ...)`` picks it from the pipeline's class.
    """

    def __new__(cls, loaded: LoadedPipeline, *args: Any, **kwargs: Any):
        if cls is ImageGenerator and loaded.pipeline_class == "ClassConditionedPipeline":
            from synthgen.generate.classcond import ClassConditionedGenerator

            cls = ClassConditionedGenerator
        return super().__new__(cls)

    def __init__(
        self, loaded: LoadedPipeline, cfg: GeneratorConfig, output: OutputConfig, recipe_seed: int
    ) -> None:
        self.loaded = loaded
        self.pipe = loaded.pipe
        self.cfg = cfg
        self.output = output
        self.recipe_seed = int(recipe_seed)
        self.stats = GenerationStats()
        # Stable Diffusion pipelines: cached text embeddings, latents decoded by synthgen (decode.py)
        self.latent_path = hasattr(self.pipe, "encode_prompt") and loaded.pipeline_class == "StableDiffusionPipeline"
        self.embeddings = PromptEmbeddings(self.pipe, loaded.device, cfg.prompt_cache)
        self.decoder = LatentDecoder(self.pipe, loaded.device, cfg.vae_decode_chunk)
        self._truncation_noted = False

    # ---------------------------------------------------------------------------------------- core
    def _generators(self, seeds: Sequence[int]) -> list:
        import torch

        return [torch.Generator(device=GENERATOR_DEVICE).manual_seed(int(s)) for s in seeds]

    def run_pipeline(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[np.ndarray, list[Optional[str]]]:
        """One pipeline call: uint8 images (N, H, W, 3) and why each must not be stored (None: fine)."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        cfg = self.cfg
        kwargs: dict[str, Any] = dict(
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            num_images_per_prompt=1,
            generator=self._generators(seeds),
        )
        self._note_truncation(prompts)
        with self._quiet():
            if self.latent_path:
                kwargs["prompt_embeds"] = self.embeddings(prompts)
                kwargs["negative_prompt_embeds"] = self.embeddings([cfg.negative_prompt or ""] * len(prompts))
                kwargs["output_type"] = "latent"
            else:
                kwargs["prompt"] = list(prompts)
                if cfg.negative_prompt is not None:
                    kwargs["negative_prompt"] = [cfg.negative_prompt] * len(prompts)
                kwargs["output_type"] = "pt"
            reset_step_cache(self.pipe.unet)
            out = self._denoise(kwargs)
            images = out.images if hasattr(out, "images") else out[0]
            if self.latent_path:  # in the quiet block: the safety checker warns on every image it flags
                images, nsfw = self.decoder(images)
            else:
                nsfw = getattr(out, "nsfw_content_detected", None)
        flags = [bool(f) for f in nsfw] if nsfw is not None else [False] * len(prompts)
        if len(images) != len(prompts) or len(flags) != len(prompts):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(prompts)} prompts")
        finite, largest = rejection_stats(images)
        reasons = [_reason(f, m, n) for f, m, n in zip(finite, largest, flags)]
        return to_uint8(images), reasons

    def _denoise(self, kwargs: dict[str, Any]):
        """The pipeline call itself (the benchmark times it separately from encoding and decoding)."""
        return self.pipe(**kwargs)

    @staticmethod
    @contextlib.contextmanager
    def _quiet():
        """Mute diffusers' and transformers' per-batch warnings meanwhile.

        Long prompts (e.g. "c, d_c" with a WordNet definition) exceed CLIP's 77 tokens; diffusers
        warns about it on every batch and transformers' tokenizer about "indexing errors", which
        buries the progress bar. The truncation is expected and documented in the dataset card;
        :meth:`_note_truncation` says so once, in our words.
        """
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        levels = dlog.get_verbosity(), tlog.get_verbosity()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        try:
            yield
        finally:
            dlog.set_verbosity(levels[0])
            tlog.set_verbosity(levels[1])

    def _note_truncation(self, prompts: Sequence[str]) -> None:
        """Log once per generator that some prompts exceed the text encoder's context."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        limit = getattr(tokenizer, "model_max_length", None)
        if self._truncation_noted or tokenizer is None or not isinstance(limit, int) or limit > 100_000:
            return
        import transformers.utils.logging as tlog

        level = tlog.get_verbosity()
        tlog.set_verbosity_error()
        try:
            longest = max(len(ids) for ids in tokenizer(list(prompts))["input_ids"])
        finally:
            tlog.set_verbosity(level)
        if longest > limit:
            self._truncation_noted = True
            logger.warning(
                "note: some prompts are longer than the text encoder's %d tokens (up to %d here); the "
                "pipeline truncates them, as the dataset card says, and the prompt column keeps the full text",
                limit, longest,
            )

    def _finish(self, array: np.ndarray) -> Image.Image:
        return resize_to_stored(to_pil(array), self.output)

    def condition_of(self, record: PromptRecord) -> Any:
        """What the pipeline is called with for ``record``: its text prompt."""
        if record.prompt is None:
            raise SynthgenError(
                f"image {record.index} has no text prompt (class-conditioned records need a class-conditioned pipeline)"
            )
        return record.prompt

    def describe(self, record: PromptRecord) -> str:
        return f"prompt {record.prompt!r}"

    # ---------------------------------------------------------------------------------------- API
    def generate(self, records: Sequence[PromptRecord]) -> list[GeneratedImage]:
        """Images for ``records`` (same order), in chunks of ``cfg.batch_size``, retrying rejects."""
        for rec in records:
            self.condition_of(rec)  # every record can be generated, before any is
        results: list[GeneratedImage] = []
        bs = self.cfg.batch_size
        for start in range(0, len(records), bs):
            results.extend(self._generate_chunk(records[start : start + bs]))
        return results

    def _generate_chunk(self, records: Sequence[PromptRecord]) -> list[GeneratedImage]:
        done: dict[int, GeneratedImage] = {}
        reasons: dict[int, list[str]] = {i: [] for i in range(len(records))}
        pending = list(range(len(records)))  # positions in ``records`` still to (re)generate
        attempt = 0
        while pending:
            seeds = [image_seed(self.recipe_seed, records[p].index, attempt) for p in pending]
            arrays, rejections = self.run_pipeline([self.condition_of(records[p]) for p in pending], seeds)
            self.stats.attempts += len(pending)
            still = []
            for p, seed, array, reason in zip(pending, seeds, arrays, rejections):
                if reason is None:
                    done[p] = GeneratedImage(
                        index=records[p].index,
                        image=self._finish(array),
                        seed=seed,
                        retries=attempt,
                        rejected_reasons=reasons[p],
                        prompt=records[p].prompt,
                    )
                    continue
                self.stats.rejected[reason] += 1
                reasons[p].append(f"attempt {attempt} (seed {seed}): {reason}")
                logger.info("image %d rejected (%s), seed %d", records[p].index, reason, seed)
                still.append(p)
            if still and attempt >= self.cfg.max_retries:
                self.stats.failed += len(still)
                worst = records[still[0]]
                more = f" (and {len(still) - 1} more)" if len(still) > 1 else ""
                why = reasons[still[0]][-1].split(": ", 1)[1]
                hint = ""
                if why == FLAGGED:
                    hint = "; raise generator.max_retries or set generator.safety_checker: false"
                raise SynthgenError(
                    f"image {worst.index}{more} still rejected after {attempt + 1} attempt(s) "
                    f"(generator.max_retries={self.cfg.max_retries}): {why}; {self.describe(worst)}{hint}"
                )
            pending = still
            attempt += 1
        out = [done[p] for p in range(len(records))]
        self.stats.images += len(out)
        for g in out:
            if g.retries:
                self.stats.retried_images += 1
                self.stats.retries += g.retries
        return out

    def generate_one(self, prompt: str, seed: int) -> Image.Image:
        """The stored-size image of ``prompt`` from ``seed`` -- regenerates a dataset row's pixels.

        No rejection or retry: a stored row's seed is already the one that was kept.
        """
        arrays, _ = self.run_pipeline([prompt], [seed])
        return self._finish(arrays[0])

    regenerate = generate_one

    def regenerate_row(self, row: dict) -> Image.Image:
        """A dataset row's pixels again, from what the row recorded (its prompt and seed)."""
        return self.generate_one(row["prompt"], row["seed"])

    def counters(self) -> dict[str, Any]:
        """Retry/rejection counters for the build manifest."""
        return self.stats.as_dict()
