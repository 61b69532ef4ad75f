"""Class-conditioned Stable Diffusion commands: ``synthgen classcond train | tune | finetune | run``.

Each takes a ``kind: classcond`` recipe (``train/classcond-cifar10.yaml``, ``classcond-tiny``, or a
YAML file) and a run folder; each stage resumes where it stopped. The work is in
:mod:`synthgen.classcond`; this module parses options and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from synthgen.cli import app
from synthgen.cli.output import console, err_console

classcond_app = typer.Typer(
    help="Lomurno et al.'s class-conditioned Stable Diffusion: train the class encoder, tune generation "
    "for CAS with Optuna, fine-tune the UNet, and build the tuned datasets.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(classcond_app, name="classcond")

RECIPE_HELP = "A class-conditioning recipe under train/ (classcond-cifar10, classcond-tiny) or a YAML file."
SET_HELP = "Override a recipe field, e.g. --set tuning.images=2000 (repeatable; values are YAML)."
RUN_DIR_HELP = "The run folder [default: runs/<recipe name>]."
QUIET_EPOCHS_HELP = "No per-epoch lines."
DEVICE_HELP = "cpu, cuda, cuda:1 ... for training, generation and the classifier [default: the recipe's, auto]."


def _recipe(recipe: str, set_: Optional[List[str]]):
    from synthgen.classcond.recipe import load_classcond_recipe

    return load_classcond_recipe(recipe, list(set_ or []))


def _run_dir(run_dir: Optional[Path], recipe) -> Path:
    return run_dir or Path("runs") / recipe.name


def _epoch_line(info) -> None:
    err_console.print(f"[dim]{info.stage}[/dim] epoch {info.epoch}/{info.epochs} loss {info.loss:.5f} "
                      f"{info.images_per_s:.1f} images/s {info.seconds:.1f}s", highlight=False, soft_wrap=True)


def _trial_line(summary: dict) -> None:
    params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["params"].items())
    how = f"pruned at epoch {summary['pruned_at']}" if summary["state"] == "pruned" else f"val acc {summary['value']:.4f}"
    err_console.print(f"[dim]trial {summary['number']}[/dim] ({params}): {how}; generation {summary['generation_s']:.1f}s, "
                      f"classifier {summary['train_s']:.1f}s ({summary['finished']}/{summary['target']} finished)",
                      highlight=False, soft_wrap=True)


def _stage_done(what: str, result) -> None:
    losses = result.losses
    last = result.last_epoch
    state = "already done" if result.resumed_from >= last else (f"resumed after epoch {result.resumed_from}" if result.resumed_from else "trained")
    console.print(f"{what}: epochs 1-{last}, loss {losses.get(last, float('nan')):.5f} ({state}); checkpoints in {result.stage_dir}",
                  markup=False, highlight=False, soft_wrap=True)


@classcond_app.command()
def train(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-r", help=RUN_DIR_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
    device: Optional[str] = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:1 ... (cpu trains on the CPU even with a GPU) "
        "[default: the recipe's: the CPU with encoder.cpu: true, else auto]."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_EPOCHS_HELP),
) -> None:
    """Stage 1: train the class encoder (UNet and VAE frozen), a checkpoint per epoch; resumes."""
    from synthgen.classcond.run import train_stage

    r = _recipe(recipe, set_)
    result = train_stage(_run_dir(run_dir, r), r, device=device, on_epoch_end=None if quiet else _epoch_line)
    _stage_done("stage 1 (class encoder)", result)


@classcond_app.command()
def tune(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    stage: str = typer.Option("encoder", "--stage", help="encoder (stage 2: encoder epoch) or unet (stage 4: UNet epoch)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-r", help=RUN_DIR_HELP),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="Finished trials to reach [default: the recipe's]."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-trial lines."),
) -> None:
    """Stage 2 or 4: tune steps, guidance and a checkpoint epoch for CAS (Optuna TPE + Hyperband).

    The objective is the classifier's best accuracy on real held-out TRAINING images; the test split
    is never read. The study is kept in the run folder and resumes (a crashed trial is retried);
    with tuning.storage: journal several processes may tune one study at once.
    """
    from synthgen.classcond.tune import tune_stage

    r = _recipe(recipe, set_)
    result = tune_stage(_run_dir(run_dir, r), r, stage, trials=trials, device=device, on_trial=None if quiet else _trial_line)
    if result.retried:
        err_console.print(f"retried the interrupted trial(s) {', '.join(map(str, result.retried))}", markup=False, highlight=False)
    if not result.best:
        console.print(f"{result.finished} trials finished ({result.pruned} pruned); no best yet: "
                      f"{result.no_best_reason}; {result.folder}",
                      markup=False, highlight=False, soft_wrap=True)
        return
    params = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.best["params"].items())
    console.print(f"best ({result.finished} trials, {result.pruned} pruned, {result.failed} failed): {params} -> "
                  f"val acc {result.best['value']:.4f} (trial {result.best['trial']}); {result.folder}/best.json",
                  markup=False, highlight=False, soft_wrap=True)


@classcond_app.command()
def finetune(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-r", help=RUN_DIR_HELP),
    encoder_epoch: Optional[int] = typer.Option(None, "--encoder-epoch", help="The encoder epoch to fix [default: stage 2's best]."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
    device: Optional[str] = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:1 ... (cpu trains on the CPU even with a GPU) "
        "[default: the recipe's: the CPU with unet.cpu: true, else auto]."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_EPOCHS_HELP),
) -> None:
    """Stage 3: fine-tune the UNet (full, or LoRA with unet.method=lora) with the encoder fixed; resumes."""
    from synthgen.classcond.run import finetune_stage

    r = _recipe(recipe, set_)
    result = finetune_stage(_run_dir(run_dir, r), r, encoder_epoch=encoder_epoch, device=device,
                            on_epoch_end=None if quiet else _epoch_line)
    _stage_done(f"stage 3 (UNet, {r.unet.method})", result)


@classcond_app.command()
def run(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-r", help=RUN_DIR_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-epoch, per-trial or progress lines."),
) -> None:
    """All stages: class encoder, tuning, UNet fine-tuning, tuning again, then the tuned x1..xk
    datasets and their CAS; running it again resumes from the stage that was interrupted.

    Writes checkpoints (encoder/, unet/), the studies with best.json and their plots (tune-encoder/,
    tune-unet/), the tuned pipeline (pipeline/) and settings (tuned.json), the final dataset
    (dataset/) and the CAS-vs-scale curve (cas/).
    """
    from synthgen.classcond.run import run_classcond

    r = _recipe(recipe, set_)
    folder = _run_dir(run_dir, r)
    run_classcond(folder, r, device=device, say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True),
                  on_trial=None if quiet else _trial_line, on_epoch_end=None if quiet else _epoch_line,
                  progress=not quiet, console=err_console)
