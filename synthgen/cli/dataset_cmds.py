"""Dataset commands: build, verify, recipes, prompts, preview, regenerate."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from typer._click.exceptions import NoSuchOption
from typer.core import TyperCommand

from synthgen.cli import app, error_line
from synthgen.cli.output import console, err_console, write_plain

recipes_app = typer.Typer(
    help="List and show dataset recipes (built-in, and your own folders: --recipes / SYNTHGEN_RECIPES).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(recipes_app, name="recipes")

RECIPE_HELP = ("A recipe name (see `synthgen recipes list`) or a YAML file; a file path has a folder part "
               "or a .yaml suffix (./demo, demo.yaml).")
SET_HELP = "Override a recipe field, e.g. --set generator.guidance_scale=2 (repeatable; values are YAML)."
#: exit status of a build that finished its share while other shards are still unbuilt
EXIT_PARTIAL = 3


def _load(recipe: str, overrides: Optional[List[str]]):
    from synthgen.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def default_out(name: str) -> Path:
    return Path("outputs") / name


@app.command()
def build(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    out: Optional[str] = typer.Option(
        None, "--out", "-o",
        help="Dataset folder, or an fsspec URL such as s3://bucket/name (credentials from the environment) "
        "[default: outputs/<recipe name>].",
    ),
    limit: Optional[int] = typer.Option(
        None, "--limit", "-n",
        help="Build only the first N images of the recipe's plan; a later build without --limit completes it "
        "[default: all].",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (images, shards, prompts, folder) and write nothing; the recipe and the "
        "executor options are checked as for a build."
    ),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a folder built from another recipe, or started with another model or precision."),
    executor: str = typer.Option(
        "auto", "--executor",
        help="Where shards run: local (this process), ranks (the processes torchrun, accelerate launch, srun or a "
        "Slurm array started: RANK/WORLD_SIZE/LOCAL_RANK, SLURM_*), ray (Ray tasks), or auto (ranks when "
        "those variables are set, else local).",
    ),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="Ray cluster to run on (host:port, ray://host:10001 or auto) [default: RAY_ADDRESS, else a local Ray]."
    ),
    share_only: bool = typer.Option(
        False, "--share-only", help="Make only this rank's share of the shards (no help with others'); exit 3 if other shares are unfinished."
    ),
    num_workers: Optional[int] = typer.Option(
        None, "--num-workers", help="An explicit static split instead of rank variables: this many processes (with --worker-index)."
    ),
    worker_index: Optional[int] = typer.Option(
        None, "--worker-index", help="Which share this process makes (0-based); implies --share-only."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub", help="After a complete build, publish it to this Hub dataset repo (namespace/name); see `synthgen push`."
    ),
    tag: Optional[str] = typer.Option(None, "--tag", help="With --push-to-hub: tag the pushed revision, e.g. v1.0.0."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
) -> None:
    """Build (or resume, or extend) a dataset from a recipe into a Hugging Face-style folder of parquet shards.

    Re-running the same command resumes: finished shards are checked (size, sha256, rows) and kept,
    unfinished or damaged ones redone. A resume may change settings that do not change images
    (generator.batch_size, generator.device, ...); any other change is refused, naming the key.
    Under torchrun, accelerate launch, srun or a Slurm array each process takes its share of the
    shards (by rank, on its own GPU), then helps with the rest; the last one writes the manifest.
    Exit status 3: this process's share is done (--share-only, --worker-index) but other shards are not
    (0 under torchrun or accelerate launch, which would stop the other ranks on a non-zero exit).
    """
    from synthgen.dataset import build_dataset, plan_build

    r = _load(recipe, set_)
    folder = out or str(default_out(r.name))
    if push_to_hub is not None or tag is not None or private:
        _check_push_request(push_to_hub, tag, limit, folder)
    if dry_run:
        from synthgen.dataset.executors import resolve_executor

        # the same checks a build makes before it writes anything (executor name, worker split, rank variables)
        resolve_executor(executor, ray_address=ray_address, num_workers=num_workers, worker_index=worker_index,
                         share_only=share_only)
        _print_plan(plan_build(r, folder, overwrite=overwrite, limit=limit))
        return
    result = build_dataset(
        r, folder, limit=limit, overwrite=overwrite, progress=not quiet, executor=executor, ray_address=ray_address,
        num_workers=num_workers, worker_index=worker_index, share_only=share_only,
    )
    for name, why in result.rebuilt.items():
        err_console.print(f"note: rebuilt shard {name}: its file did not match its marker ({why})", markup=False, highlight=False)
    if result.dataset_complete:
        status = "complete"
    elif result.complete:
        status = f"first {result.rows_target:,} images built (run without --limit to complete it)"
    else:
        status = "partial"
    worker = result.worker
    who = f"rank {worker['rank']}/{worker['world_size']}: " if worker.get("world_size", 1) > 1 else ""
    console.print(
        f"{who}{result.folder}: {status}; {result.rows_planned:,} images planned, "
        f"{result.shards_written} shard(s) written, {result.shards_skipped} already done, "
        f"{result.retries} image(s) regenerated, {result.seconds:.1f} s",
        markup=False, highlight=False,
    )
    if not result.complete:
        shown = ", ".join(result.left[:4]) + (f" and {len(result.left) - 4} more" if len(result.left) > 4 else "")
        static = num_workers is not None or worker_index is not None
        if not static and "TORCHELASTIC_RUN_ID" in os.environ:
            # torchrun (and accelerate launch) stop every other rank when one exits non-zero: the
            # ranks still making their shares would be killed mid-shard; exit 0 and let them finish
            err_console.print(f"note: {len(result.left)} shard(s) left ({shown}) to the other ranks, which are "
                              "still running; the last to finish writes the manifest", markup=False, highlight=False)
            return
        error_line(
            f"the dataset is unfinished: {len(result.left)} shard(s) left ({shown}); they belong to other "
            f"{'workers' if static else 'ranks'} (this is {who.rstrip(': ') or 'rank 0/1'}): run those again, or "
            "finish what is left with the same command"
            + (" without --num-workers/--worker-index" if static else " and --executor local")
        )
        raise typer.Exit(EXIT_PARTIAL)
    if push_to_hub is not None and result.dataset_complete and worker.get("rank", 0) == 0:
        from synthgen.hub import push_dataset

        pushed = push_dataset(result.folder, push_to_hub, tag=tag, private=private)
        done = f"committed {pushed.commit[:12]}" if pushed.new_commit else f"already held this content at {pushed.commit[:12]}"
        console.print(f"{pushed.repo_id}: {done}" + (f", tagged {pushed.tag}" if pushed.tag else "") + f"\n{pushed.url}",
                      markup=False, highlight=False)


def _check_push_request(repo_id: Optional[str], tag: Optional[str], limit: Optional[int], folder: str) -> None:
    """--push-to-hub's arguments and token, checked before anything is generated."""
    from synthgen.errors import SynthgenError
    from synthgen.hub.publish import check_push_args, require_token

    if repo_id is None:
        raise SynthgenError("--tag and --private go with --push-to-hub REPO_ID")
    if limit is not None:
        raise SynthgenError("--push-to-hub publishes a complete dataset; drop --limit (or push later with `synthgen push`)")
    if "://" in folder and not folder.startswith("file://"):
        raise SynthgenError("--push-to-hub publishes a local folder; build into one, or push it later with `synthgen push`")
    check_push_args(repo_id, tag, None, False)
    require_token()


def _print_plan(build) -> None:
    r = build.recipe
    gen = r.generator
    table = Table(title=f"plan: {r.name}", show_header=False)
    table.add_row("folder", f"{build.folder} ({build.state})")
    images = f"{r.count:,}" if build.limit is None or build.limit >= r.count else f"first {build.target_rows:,} of {r.count:,}"
    table.add_row("images", images)
    table.add_row("shards", f"{len(build.targets)} of {build.plan.num_shards} x {build.plan.per_shard} ({len(build.done)} done)")
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
    stored = (build.stored or {}).get("settings_hash")
    table.add_row("settings hash", stored or "set when the model loads (it includes the model's resolved revision)")
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
    """List the recipes: built-in ones and those in your recipe folders.

    A recipe file that does not load is listed with its error (and the exit status is 1); the
    others are listed as usual. `synthgen recipes show NAME` prints a whole recipe.
    """
    from synthgen.errors import SynthgenError
    from synthgen.paths import RECIPES_DIR
    from synthgen.recipe import load_recipe, recipe_files

    table = Table()
    for col in ("name", "images", "sampler", "model", "from", "description"):
        table.add_column(col)
    broken = []
    for name, path in recipe_files().items():
        source = "built-in" if path.parent == RECIPES_DIR else str(path.parent)
        try:
            r = load_recipe(path)
        except SynthgenError as exc:
            broken.append(str(exc))
            table.add_row(name, "-", "-", "-", source, "[red]does not load (see the error below)[/red]")
            continue
        first_sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z])", r.description.strip(), maxsplit=1)[0]
        table.add_row(name, f"{r.count:,}", r.prompts.kind, r.generator.model, source, first_sentence)
    console.print(table)
    for message in broken:
        error_line(message)
    if broken:
        raise typer.Exit(1)


@recipes_app.command("show")
def recipes_show(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
) -> None:
    """Print a recipe with every default filled in (what a build would use), as YAML."""
    import yaml

    r = _load(recipe, set_)
    write_plain(yaml.safe_dump(r.resolved(), sort_keys=False, allow_unicode=True, width=float("inf")))


@app.command()
def prompts(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    n: int = typer.Option(20, "-n", help="How many prompts to show."),
    start: int = typer.Option(0, "--start", help="First image index."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
    tsv: bool = typer.Option(False, "--tsv", help="Tab-separated lines instead of a table (for pipes)."),
) -> None:
    """Show the prompts a recipe gives its images (index, label, group, prompt)."""
    from synthgen.errors import SynthgenError
    from synthgen.prompts import build_sampler

    if n < 0 or start < 0:
        raise typer.BadParameter("-n and --start must not be negative")
    sampler = build_sampler(_load(recipe, set_))
    if start >= len(sampler):
        raise SynthgenError(f"--start {start} is past the recipe's last image ({len(sampler):,} images: 0..{len(sampler) - 1})")
    indices = range(max(0, start), min(len(sampler), start + n))
    if tsv:
        for i in indices:
            rec = sampler[i]
            write_plain(f"{rec.index}\t{rec.label_name or ''}\t{rec.group}\t{rec.prompt or ''}\n")
        return
    table = Table()
    for col in ("index", "label", "group", "prompt"):
        table.add_column(col)
    for i in indices:
        rec = sampler[i]
        table.add_row(str(rec.index), rec.label_name or "", str(rec.group), rec.prompt or "")
    console.print(table)


FOLDER_HELP = ("A dataset folder written by `synthgen build`, or its fsspec URL such as s3://bucket/name "
               "(credentials from the environment, as for build).")


@app.command()
def preview(
    folder: str = typer.Argument(..., help=FOLDER_HELP),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="PNG to write, always a local file [default: FOLDER/preview.png; ./preview.png for a URL]."
    ),
    n: int = typer.Option(16, "-n", help="How many images."),
    columns: int = typer.Option(4, "--columns", help="Images per row."),
    cell: int = typer.Option(192, "--cell", help="Cell size in pixels."),
) -> None:
    """Write an image grid PNG of the first images, each with its prompt."""
    from synthgen.dataset.storage import open_store
    from synthgen.preview import write_preview

    store = open_store(folder, reading=True)
    default = store.local / "preview.png" if store.local is not None else Path("preview.png")
    path = write_preview(store, out or default, n=n, columns=columns, cell=cell)
    console.print(f"wrote {path}", markup=False, highlight=False)


class RowIndexCommand(TyperCommand):
    """Reads a negative row index (``regenerate DIR -1``) as a bad INDEX, where click would report
    the unknown option ``-1``."""

    def parse_args(self, ctx, args):
        given = list(args)  # the parser consumes ``args``
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as exc:
            negative = next((a for a in given if re.fullmatch(r"-\d+", a)), None)
            if negative is None or exc.option_name != negative[:2]:
                raise
            index = next(p for p in self.params if p.name == "index")
            raise typer.BadParameter(f"{negative} is negative: row indices start at 0", ctx=ctx, param=index) from None


@app.command(cls=RowIndexCommand)
def regenerate(
    folder: str = typer.Argument(..., help=FOLDER_HELP),
    index: int = typer.Argument(..., min=0, help="Global index of the row to regenerate (the first row is 0)."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG to write, a local file (its folder is created if missing)."),
) -> None:
    """Regenerate one image from its row (prompt, seed) and the folder's settings, and compare.

    When the row's shard was made with torch.compile (generator.compile on CUDA), the UNet and VAE
    decoder are compiled again, as the build did: the same kernels for the same pixels, at the cost
    of the compile time (minutes) for this one image. A shard made without it is regenerated eagerly.
    """
    from synthgen.preview import regenerate_to_file

    diff = regenerate_to_file(folder, index, out)
    console.print(f"wrote {out}; max pixel difference from the stored image: {diff}", markup=False, highlight=False)


@app.command()
def verify(
    folder: str = typer.Argument(..., help=FOLDER_HELP),
    decode: bool = typer.Option(True, "--decode/--no-decode", help="Decode every image (slower, thorough)."),
) -> None:
    """Check a dataset folder: checksums, rows and indices of every shard, every image, stray files.

    FOLDER may be an object store (s3://..., gs://...): the same checks, read through fsspec.
    Exit status 1 when there is any problem (each printed on its own line). On a terminal a
    progress bar counts the rows checked.
    """
    from synthgen.dataset import read_manifest, verify_dataset
    from synthgen.dataset.job import progress_bar
    from synthgen.dataset.verify import format_report
    from synthgen.errors import SynthgenError

    total = None
    if err_console.is_terminal:  # a script's stderr holds the problem lines only
        try:
            total = int(read_manifest(folder).get("rows") or 0)
        except (SynthgenError, TypeError, ValueError):
            total = None  # verify_dataset says what is wrong with the folder
    with progress_bar(bool(total), f"verify {folder}", total or 0) as bar:
        report = verify_dataset(folder, decode=decode, progress=bar.advance)
    lines = format_report(report)
    for line in lines[:-1]:
        err_console.print(line, markup=False, highlight=False)
    console.print(lines[-1], markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(1)
