"""Dataset commands: build, recipes, prompts, preview, regenerate."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from synthgen.cli import app

console = Console()
err_console = Console(stderr=True)

recipes_app = typer.Typer(help="List and show the built-in dataset recipes (recipes/*.yaml).", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

SET_HELP = "Override a recipe field, e.g. --set generator.guidance_scale=2 (repeatable; values are YAML)."


def _load(recipe: str, overrides: Optional[List[str]], limit: Optional[int]):
    from synthgen.recipe import load_recipe

    return load_recipe(recipe, overrides or [], limit=limit)


def default_out(name: str) -> Path:
    return Path("outputs") / name


@app.command()
def build(
    recipe: str = typer.Argument(..., help="A built-in recipe name (see `synthgen recipes list`) or a YAML file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Dataset folder [default: outputs/<recipe name>]."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Generate at most N images (a quick partial build)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (images, shards, prompts, folder) and write nothing."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder built from another recipe."),
    num_workers: int = typer.Option(1, "--num-workers", help="Split the shards between this many processes/nodes."),
    worker_index: int = typer.Option(0, "--worker-index", help="Which share of the shards this process builds (0-based)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build (or resume) a dataset from a recipe into a Hugging Face-style folder of parquet shards.

    Re-running the same command resumes: finished shards are kept, unfinished ones redone. Several
    processes may build one folder at once (e.g. one per GPU with CUDA_VISIBLE_DEVICES): shards are
    claimed with file locks.
    """
    from synthgen.dataset import build_dataset, plan_build

    r = _load(recipe, set_, limit)
    folder = out or default_out(r.name)
    if dry_run:
        _print_plan(plan_build(r, folder, overwrite=overwrite))
        return
    result = build_dataset(
        r, folder, overwrite=overwrite, progress=not quiet, num_workers=num_workers, worker_index=worker_index
    )
    status = "complete" if result.complete else "partial (other shards pending)"
    console.print(
        f"[green]{result.folder}[/green]: {status}; {result.rows_planned:,} images planned, "
        f"{result.shards_written} shard(s) written, {result.shards_skipped} already done, "
        f"{result.retries} image(s) regenerated, {result.seconds:.1f} s"
    )


def _print_plan(build) -> None:
    r = build.recipe
    gen = r.generator
    table = Table(title=f"plan: {r.name}", show_header=False)
    table.add_row("folder", f"{build.folder} ({build.state})")
    table.add_row("images", f"{r.count:,}")
    table.add_row("shards", f"{build.plan.num_shards} x {build.plan.per_shard} ({len(build.done)} done)")
    table.add_row("split", r.output.split)
    table.add_row("classes", str(len(build.sampler.class_names)) if build.sampler.class_names else "none")
    table.add_row("model", f"{gen.model} @ {gen.revision or 'default'}")
    table.add_row(
        "generation",
        f"{gen.scheduler or 'pipeline default'}, {gen.steps} steps, guidance {gen.guidance_scale}, "
        f"{gen.width}x{gen.height}, dtype {gen.dtype}, batch {gen.batch_size}",
    )
    size = f"{r.output.image_size}px ({r.output.resize_filter})" if r.output.image_size else "generated size"
    table.add_row("stored", f"{r.output.image_format}, {size}")
    table.add_row("settings hash", r.settings_hash())
    console.print(table)
    preview = Table(title="first prompts")
    for col in ("index", "label", "group", "prompt"):
        preview.add_column(col)
    for i in range(min(5, len(build.sampler))):
        rec = build.sampler[i]
        preview.add_row(str(rec.index), rec.label_name or "", str(rec.group), rec.prompt or "")
    console.print(preview)
    console.print("dry run: nothing was written")


@recipes_app.command("list")
def recipes_list() -> None:
    """List the built-in recipes."""
    from synthgen.recipe import list_recipes, load_recipe

    table = Table()
    for col in ("name", "images", "sampler", "model", "description"):
        table.add_column(col)
    for name in list_recipes():
        r = load_recipe(name)
        table.add_row(name, f"{r.count:,}", r.prompts.kind, r.generator.model, r.description.split("\n")[0])
    console.print(table)


@recipes_app.command("show")
def recipes_show(
    recipe: str = typer.Argument(..., help="Recipe name or YAML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help=SET_HELP),
) -> None:
    """Print a recipe with every default filled in (what a build would use)."""
    import yaml

    r = _load(recipe, set_, None)
    console.print(yaml.safe_dump(r.resolved(), sort_keys=False, allow_unicode=True), end="", markup=False, highlight=False)


@app.command()
def prompts(
    recipe: str = typer.Argument(..., help="Recipe name or YAML file."),
    n: int = typer.Option(20, "-n", help="How many prompts to show."),
    start: int = typer.Option(0, "--start", help="First image index."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help=SET_HELP),
    tsv: bool = typer.Option(False, "--tsv", help="Tab-separated lines instead of a table (for pipes)."),
) -> None:
    """Show the prompts a recipe gives its images (index, label, group, prompt)."""
    from synthgen.prompts import build_sampler

    sampler = build_sampler(_load(recipe, set_, None))
    indices = range(max(0, start), min(len(sampler), start + n))
    if tsv:
        for i in indices:
            rec = sampler[i]
            print(f"{rec.index}\t{rec.label_name or ''}\t{rec.group}\t{rec.prompt or ''}")
        return
    table = Table()
    for col in ("index", "label", "group", "prompt"):
        table.add_column(col)
    for i in indices:
        rec = sampler[i]
        table.add_row(str(rec.index), rec.label_name or "", str(rec.group), rec.prompt or "")
    console.print(table)


@app.command()
def preview(
    folder: Path = typer.Argument(..., help="A dataset folder written by `synthgen build`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write [default: FOLDER/preview.png]."),
    n: int = typer.Option(16, "-n", help="How many images."),
    columns: int = typer.Option(4, "--columns", help="Images per row."),
    cell: int = typer.Option(192, "--cell", help="Cell size in pixels."),
) -> None:
    """Write an image grid PNG of the first images, each with its prompt."""
    from synthgen.preview import write_preview

    path = write_preview(folder, out or folder / "preview.png", n=n, columns=columns, cell=cell)
    console.print(f"wrote {path}")


@app.command()
def regenerate(
    folder: Path = typer.Argument(..., help="A dataset folder written by `synthgen build`."),
    index: int = typer.Argument(..., help="Global index of the row to regenerate."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG to write."),
) -> None:
    """Regenerate one image from its row (prompt, seed) and the folder's settings, and compare."""
    import io

    import numpy as np
    from PIL import Image

    from synthgen.dataset import read_row, regenerate_row

    image = regenerate_row(folder, index)
    image.save(out)
    stored = np.asarray(Image.open(io.BytesIO(read_row(folder, index)["image"]["bytes"])).convert("RGB"))
    diff = np.abs(stored.astype(int) - np.asarray(image.convert("RGB")).astype(int)).max()
    console.print(f"wrote {out}; max pixel difference from the stored image: {diff}")
