"""How the class-conditioned images are made, in tuning trials and in the final datasets alike.

Both take the ``generator`` and ``output`` sections of the recipe's ``generation`` dataset recipe
(scheduler, dtype, batch, speed settings, stored size, resize filter) and set what each stage
decides: the model, steps, guidance, image size (the run's training resolution), the stored size
(the real images' resolution, so that CAS compares like with like), the count and the classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

__all__ = ["generation_template", "trial_generation", "final_dataset_recipe"]


def generation_template(recipe):
    """The dataset recipe named by ``recipe.generation`` (a :class:`synthgen.recipe.Recipe`)."""
    from synthgen.recipe import load_recipe

    return load_recipe(recipe.generation)


def trial_generation(recipe, resolution: int, stored_size: int, device: Optional[str] = None):
    """(GeneratorConfig, OutputConfig) of tuning trials (steps and guidance set per trial)."""
    template = generation_template(recipe)
    update: dict[str, Any] = {"model": "classcond-run", "height": resolution, "width": resolution}
    if device is not None:
        update["device"] = device
    generator = template.generator.model_copy(update=update)
    output = template.output.model_copy(update={"image_size": stored_size})
    return generator, output


def final_dataset_recipe(recipe, *, pipeline_dir: Path, steps: int, guidance: float, count: int, class_names: list[str],
                         resolution: int, stored_size: int, device: Optional[str] = None):
    """The dataset recipe of the final ``x1..xk`` datasets: the ``generation`` recipe with the tuned
    pipeline, steps and guidance, ``count`` images in the final class distribution."""
    from synthgen.recipe import recipe_from_dict

    from synthgen.train.config import resolve_source

    template = generation_template(recipe)
    data = template.resolved()
    d = recipe.dataset
    source = resolve_source(d.source, "dataset.source")  # a local path made absolute
    data.update(
        name=f"{recipe.name}-tuned",
        description=(f"Class-conditioned Stable Diffusion tuned for CAS by `synthgen classcond run` "
                     f"({recipe.name}): {count} images, {recipe.final.distribution} class distribution."),
        seed=recipe.final.seed,
        count=count,
        prompts={"kind": "classes", "classes": list(class_names), "distribution": recipe.final.distribution,
                 "dataset": source if recipe.final.distribution == "dataset" else None,
                 "split": d.split, "revision": d.revision, "label_column": d.label_column},
    )
    data["generator"].update(model=str(Path(pipeline_dir).resolve()), revision=None, steps=int(steps),
                             guidance_scale=float(guidance), height=resolution, width=resolution)
    if device is not None:
        data["generator"]["device"] = device
    data["output"]["image_size"] = stored_size
    return recipe_from_dict(data, source=f"{recipe.generation} (tuned for {recipe.name})")
