"""Trainer commands: ``synthgen pretrain`` and ``synthgen evaluate``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from synthgen.cli import app
from synthgen.cli.output import console, err_console, refuse_folder_as_report


PRETRAIN_SET_HELP = "Override a recipe field, e.g. --set optimizer.lr=3e-4 (repeatable; values are YAML)."
EVAL_SET_HELP = ("Override a recipe field, e.g. --set linear.lr=1e-3 or --set dataset.train_limit=1000 "
                 "(repeatable; values are YAML).")


@app.command()
def pretrain(
    recipe: str = typer.Argument(..., help="A training recipe under train/ (e.g. rotation-vit, stablerep-vit, simclr) or a YAML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=PRETRAIN_SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder [default: runs/pretrain/<recipe name>]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1, ... [default: the recipe's, auto]."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Fail if --out already holds a checkpoint instead of resuming it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Pre-train a backbone (rotation prediction, SimCLR or StableRep) and save a checkpoint.

    Relative dataset paths in the recipe are resolved against the current directory. Running the
    same recipe into the same --out resumes from its checkpoint.
    """
    from synthgen.train.config import load_pretrain_config
    from synthgen.train.pretrain import pretrain as run_pretrain

    overrides = list(set_ or [])
    if device:
        overrides.append(f"device={device}")
    config = load_pretrain_config(recipe, overrides)
    out_dir = out or Path("runs") / "pretrain" / config.name
    result = run_pretrain(config, out_dir, resume=not no_resume, progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    m = result.metrics
    if result.resumed_from_step is not None and result.resumed_from_step >= m["total_steps"]:
        console.print(f"already done: {out_dir} finished its {m['total_steps']} steps; nothing to train")
    elif result.resumed_from_step is not None:
        console.print(f"resumed from step {result.resumed_from_step}")
    first = f"{m['first_loss']:.4f}" if m.get("first_loss") is not None else "-"
    final = f"{m['final_loss']:.4f}" if m.get("final_loss") is not None else "-"
    console.print(
        f"{config.name}: {m['step']}/{m['total_steps']} steps on {m['images']} images, "
        f"loss {first} -> {final}, {m['elapsed_s']}s on {m['device']}"
    )
    console.print(f"checkpoint: {result.out_dir}", soft_wrap=True)


@app.command()
def evaluate(
    recipe: Optional[str] = typer.Argument(
        None, help="An evaluation recipe under train/ (linear-probe-cifar10, knn-cifar10, finetune-cifar10) or a YAML "
        "file; without one, give --dataset and --checkpoint (or --model)."
    ),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", help="A `synthgen pretrain` output folder."),
    model: Optional[str] = typer.Option(None, "--model", help="Without a checkpoint: a model name (random init), or 'pixels'."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="A labelled dataset: local folder/parquet (relative to the cwd), Hub id, or fsspec URL (s3://bucket/folder)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of --dataset."),
    protocol: Optional[str] = typer.Option(None, "--protocol", "-p", help="linear, knn or finetune [default: the recipe's, else linear]."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=EVAL_SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report JSON file [default: <checkpoint folder>/eval/<name>.json, or runs/eval/<name>.json]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1, ... [default: the recipe's, auto]."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Evaluate a backbone on a labelled dataset: linear probe, k-NN or fine-tuning; top-1/top-5 on test.

    Either a recipe, or --dataset with --checkpoint (or --model). Options given override the recipe.
    """
    from synthgen.train.config import load_eval_config
    from synthgen.train.evaluate import evaluate as run_evaluate, write_report

    refuse_folder_as_report(out, "--out")
    if checkpoint is not None and model is not None:
        # one would silently replace the other: --model alone evaluates a randomly initialised network
        raise typer.BadParameter("give --checkpoint or --model, not both (--model evaluates that network without a checkpoint)")
    if recipe is None:
        if dataset is None or (checkpoint is None and model is None):
            # a usage error (exit status 2), like a missing argument
            raise typer.BadParameter("give an evaluation recipe, or --dataset with --checkpoint (or --model)")
        stem = Path(dataset.rstrip("/")).name or "dataset"
        data: dict = {
            "name": f"{protocol or 'linear'}-{stem}",
            "protocol": protocol or "linear",
            "dataset": {"source": dataset},
        }
        source: object = data
    else:
        source = recipe
    overrides: list[str] = []
    if checkpoint is not None:
        overrides += [f"checkpoint={json.dumps(checkpoint)}", "model=null"]
    if model is not None:
        overrides += ["checkpoint=null", f"model={{name: {json.dumps(model)}}}"]
    if dataset is not None and recipe is not None:
        overrides.append(f"dataset.source={json.dumps(dataset)}")
    if revision is not None:
        overrides.append(f"dataset.revision={json.dumps(revision)}")
    if protocol is not None and recipe is not None:
        overrides.append(f"protocol={protocol}")
    if device is not None:
        overrides.append(f"device={device}")
    overrides += list(set_ or [])
    config = load_eval_config(source, overrides)
    report = run_evaluate(config, progress=not quiet)
    if out is None:
        if config.checkpoint is not None:
            out = Path(report["backbone"]["checkpoint"]) / "eval" / f"{config.name}.json"
        else:
            out = Path("runs") / "eval" / f"{config.name}.json"
    path = write_report(report, out)
    top5 = f", top-5 {report['top5']:.4f}" if report.get("top5") is not None else ""
    extra = f" (k={report['result']['selected_k']})" if config.protocol == "knn" else ""
    console.print(
        f"{config.name}: {config.protocol}{extra} top-1 {report['top1']:.4f}{top5} on "
        f"{report['datasets']['sizes']['test']} test images ({report['device']})"
    )
    console.print(f"report: {path}")
