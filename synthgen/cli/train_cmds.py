"""Trainer commands. ``synthgen cas`` lives here; each command is a function decorated with
``@app.command()`` (add more below, or in a sibling module imported at the end of this file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from synthgen.cli import app
from synthgen.errors import SynthgenError

console = Console()
err_console = Console(stderr=True)


def parse_scales(text: str | None) -> list[int] | None:
    """``"1,2,5"`` or ``"1-10"`` (or a mix) -> ``[1, 2, 5]`` / ``[1, ..., 10]``."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise SynthgenError(f"--scales takes integers like 1,2,3 or 1-10; got {text!r}") from None
    if not out or any(k < 1 for k in out):
        raise SynthgenError(f"--scales takes positive integers like 1,2,3 or 1-10; got {text!r}")
    return out


def _default_output(synthetic: str, real: str, seed: int) -> Path:
    name = Path(str(real).rstrip("/")).name or "real"
    fname = f"cas-{name}-seed{seed}.json"
    p = Path(os.path.expanduser(synthetic))
    if p.is_dir() and os.access(p, os.W_OK):
        return p / "cas" / fname
    return Path.cwd() / fname


@app.command()
def cas(
    synthetic: str = typer.Argument(..., help="Synthetic dataset: a local folder (e.g. from `synthgen build`), a parquet file, or a Hub id."),
    real: str = typer.Option(..., "--real", help="Real dataset (local folder/parquet or Hub id) with a training and a test split."),
    real_train_split: str = typer.Option("train", "--real-train-split"),
    real_test_split: str = typer.Option("test", "--real-test-split"),
    real_revision: Optional[str] = typer.Option(None, "--real-revision", help="Hub revision of the real dataset."),
    split: str = typer.Option("train", "--split", help="Split of the synthetic dataset."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (tag, branch, commit) of the synthetic dataset."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Synthetic image column [default: the first Image feature]."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Synthetic label column [default: the first ClassLabel]."),
    scales: Optional[str] = typer.Option(None, "--scales", help="Train on the first k x |real train| synthetic images for each k, e.g. 1,2,5 or 1-10."),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = typer.Option(None, "--model", help="Classifier [protocol: resnet20_w64, the 64-filter ResNet-20 of Lomurno et al.'s code; resnet20 = He et al.'s 0.27M net]; see synthgen.train.models.list_models()."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="[protocol: 100]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="[protocol: 256]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="[protocol: 1e-3]"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam, adamw or sgd [protocol: adam]"),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="[protocol: 0.1]"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Validation share carved from each run's training data [protocol: 0.1]."),
    plateau_patience: Optional[int] = typer.Option(None, "--plateau-patience", help="[protocol: 10]"),
    early_stopping_patience: Optional[int] = typer.Option(None, "--early-stopping-patience", help="[protocol: 25]"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random crop + flip [protocol: off]."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize every image to this [protocol: the real set's resolution]."),
    limit_real: Optional[int] = typer.Option(None, "--limit-real", help="Use the first N real training images."),
    limit_real_test: Optional[int] = typer.Option(None, "--limit-real-test", help="Use the first N real test images."),
    limit_synthetic: Optional[int] = typer.Option(None, "--limit-synthetic", help="Use the first N synthetic images."),
    amp: Optional[str] = typer.Option(None, "--amp", help="auto, bf16, fp16 or off [protocol: auto = bf16 on CUDA]."),
    compile: Optional[str] = typer.Option(None, "--compile", help="torch.compile mode: auto, off, default, reduce-overhead (CUDA graphs), max-autotune [protocol: auto = reduce-overhead on CUDA, off on CPU]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ... [default: auto]."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch [default: torch's]."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Result JSON [default: <synthetic folder>/cas/cas-<real>-seed<seed>.json, else ./]."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the real baseline even when it is cached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-epoch lines."),
) -> None:
    """Classification Accuracy Score: train a classifier on the synthetic set, test it on the real
    test split, next to the same classifier trained on the real training split (cached).

    Protocol defaults = Lomurno et al.: ResNet-20 (64 initial filters, as in their code), 100
    epochs, Adam 1e-3, label smoothing 0.1, batch 256, ReduceLROnPlateau(10, 0.1), early stopping
    (25) on the accuracy of a 10% validation split of the training data, no augmentation. Labels
    are matched by name.
    """
    from synthgen.train.cas import CASProtocol, cas_score, results_table
    from synthgen.provenance import write_json

    overrides = {
        "model": model, "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
        "label_smoothing": label_smoothing, "val_fraction": val_fraction, "plateau_patience": plateau_patience,
        "early_stopping_patience": early_stopping_patience, "augment": augment, "image_size": image_size,
        "limit_real": limit_real, "limit_real_test": limit_real_test, "limit_synthetic": limit_synthetic, "amp": amp,
        "compile": compile,
    }
    try:
        protocol = CASProtocol(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic.ValidationError
        errs = getattr(exc, "errors", None)
        if callable(errs):
            e = errs()[0]
            raise SynthgenError(f"bad CAS option {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
        raise
    scale_list = parse_scales(scales)
    if threads:
        import torch

        torch.set_num_threads(threads)
    result = cas_score(
        synthetic, real, protocol, seed, scale_list,
        synthetic_split=split, synthetic_revision=revision,
        real_train_split=real_train_split, real_test_split=real_test_split, real_revision=real_revision,
        synthetic_image_column=image_column, synthetic_label_column=label_column,
        device=device, use_cache=not no_cache, quiet=quiet, console=err_console,
    )
    if result["missing_classes"]:
        err_console.print(
            f"[yellow]warning[/yellow]: the synthetic set has no images of {len(result['missing_classes'])} real "
            f"class(es): {', '.join(result['missing_classes'][:10])}", highlight=False,
        )
    console.print(results_table(result))
    base = result["real_baseline"]
    console.print(
        f"real baseline: top-1 {base['top1']:.2f} top-5 {base['top5']:.2f} ({base['epochs_run']} epochs"
        f"{', cached' if base.get('cached') else ''}); device {result['environment']['device']}", highlight=False,
    )
    for r in result["runs"]:
        label = "synthetic" if r["scale"] is None else f"x{r['scale']}"
        console.print(
            f"{label}: {r['n_images']} images, top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}, "
            f"{r['epochs_run']} epochs, {r['wall_s']:.1f}s", highlight=False,
        )
    path = write_json(output or _default_output(synthetic, real, seed), {"command": "cas", **result})
    console.print(f"results: {path}", highlight=False)


# Sibling command modules (e.g. pretrain/evaluate) register themselves on ``app`` when imported.
try:  # pragma: no cover - depends on what else is installed in the tree
    from synthgen.cli import pretrain_cmds  # noqa: F401,E402
except ImportError as _exc:
    if "pretrain_cmds" not in str(_exc):
        raise
