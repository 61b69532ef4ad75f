"""The CAS command: ``synthgen cas`` (``pretrain`` and ``evaluate`` are in pretrain_cmds.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from synthgen.cli import app
from synthgen.cli.output import console, err_console, refuse_folder_as_report
from synthgen.errors import SynthgenError


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


def _default_output(synthetic: str, real: str, seed: int, *, protocol: str = "cas-lomurno", split: str = "train",
                    real_test_split: str = "test", scales: list[int] | None = None) -> Path:
    """The result file a run writes without --output. Runs that score something else never share
    it: its name holds the real set, the protocol, any non-default split, the scales and the seed,
    and, outside the synthetic folder, the synthetic set's name."""
    def stem(text: str) -> str:
        return Path(str(text).rstrip("/")).name or "data"

    parts = [stem(real), Path(protocol).stem]
    if split != "train":
        parts.append(f"synthetic-{split}")
    if real_test_split != "test":
        parts.append(f"scored-on-{real_test_split}")
    if scales:
        parts.append("x" + "_".join(str(k) for k in scales))
    fname = f"cas-{'-'.join(parts)}-seed{seed}.json"
    p = Path(os.path.expanduser(synthetic))
    if p.is_dir() and os.access(p, os.W_OK):
        return p / "cas" / fname
    return Path.cwd() / f"cas-{stem(synthetic)}-vs-{fname.removeprefix('cas-')}"


@app.command()
def cas(
    synthetic: str = typer.Argument(..., help="Synthetic dataset: a local folder (e.g. from `synthgen build`), a parquet file, or a Hub id."),
    real: str = typer.Option(..., "--real", help="Real dataset (local folder/parquet or Hub id) with a training and a test split."),
    protocol: str = typer.Option("cas-lomurno", "--protocol", "-p", help="A CAS protocol in train/ (cas-lomurno, cas-carved-val) or a YAML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a protocol field, e.g. --set epochs=50 --set model=resnet20 (repeatable; values are YAML)."),
    scales: Optional[str] = typer.Option(None, "--scales", help="Train on k scale units of synthetic images for each k, e.g. 1,2,5 or 1-10: the first k units of one shuffle seeded by --seed (scales nest)."),
    seed: int = typer.Option(0, "--seed", help="Seed of each classifier (initialisation, batch order, a carved validation split) and of the --scales shuffle."),
    split: str = typer.Option("train", "--split", help="Split of the synthetic dataset."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (tag, branch, commit) of the synthetic dataset."),
    real_revision: Optional[str] = typer.Option(None, "--real-revision", help="Hub revision of the real dataset."),
    real_split: str = typer.Option("train", "--real-split", help="Split of the real dataset that the baseline fits and validates on."),
    real_test_split: str = typer.Option("test", "--real-test-split", help="Split of the real dataset that scores every classifier (e.g. validation for ImageNet, whose test split has no labels)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch [default: torch's choice]."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Result JSON [default: <synthetic folder>/cas/cas-<real>-<protocol>[-<splits>][-x<scales>]-seed<seed>.json when that folder is writable, else ./cas-<synthetic>-vs-<real>-... in the working folder]."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the real baseline even when it is cached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-epoch lines."),
    worst_classes: int = typer.Option(10, "--worst-classes", min=0, help="List this many classes with the largest real - synthetic top-1 gap (the largest scale's run); 0: none."),
) -> None:
    """Classification Accuracy Score: train a classifier on the synthetic set, test it on the real
    test split, next to the same classifier trained on real images (cached).

    The default protocol (train/cas-lomurno.yaml) is Lomurno et al.'s code: ResNet-20 with 64
    filters, Adam 1e-3, label smoothing 0.1, batch 256, Keras' plateau schedule and early stopping on
    the accuracy of 10,000 real held-out training images; x1 = 40,000 images. Labels are matched by name.
    """
    from synthgen.provenance import write_json
    from synthgen.train.cas import cas_score, class_gaps_table, load_cas_protocol, results_table
    from synthgen.train.data import naming_split_setting

    refuse_folder_as_report(output, "--output")
    proto, info = load_cas_protocol(protocol, list(set_ or []))
    scale_list = parse_scales(scales)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    with naming_split_setting("choose the splits with --split, --real-split and --real-test-split"):
        result = cas_score(
            synthetic, real, proto, seed, scale_list, protocol_info=info,
            synthetic_split=split, synthetic_revision=revision, real_revision=real_revision,
            real_train_split=real_split, real_test_split=real_test_split,
            device=device, use_cache=not no_cache, quiet=quiet, console=err_console,
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports and writes
    if result["missing_classes"]:
        err_console.print(
            f"[yellow]warning[/yellow]: the synthetic set has no images of {len(result['missing_classes'])} real "
            f"class(es): {', '.join(result['missing_classes'][:10])}", highlight=False, soft_wrap=True,
        )
    for r in result["runs"]:
        lacks = [n for n in r.get("missing_classes", []) if n not in result["missing_classes"]]
        if r["scale"] is not None and lacks:
            err_console.print(
                f"[yellow]warning[/yellow]: scale x{r['scale']} ({r['n_images']} images) has no images of {len(lacks)} "
                f"class(es) the synthetic set has: {', '.join(lacks[:10])}", highlight=False, soft_wrap=True,
            )
    console.print(results_table(result))
    gaps = class_gaps_table(result, worst_classes) if worst_classes else None
    if gaps is not None:
        console.print(gaps)
    base = result["real_baseline"]
    console.print(
        f"real baseline: top-1 {base['top1']:.2f} top-5 {base['top5']:.2f} ({base['epochs_run']} epochs"
        f"{', cached' if base.get('cached') else ''}); protocol {info['file']} ({info['hash']}); "
        f"device {result['environment']['device']}", highlight=False, soft_wrap=True,
    )
    for r in result["runs"]:
        label = "synthetic" if r["scale"] is None else f"x{r['scale']}"
        console.print(
            f"{label}: {r['n_images']} images, top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}, "
            f"{r['epochs_run']} epochs, {r['wall_s']:.1f}s", highlight=False, soft_wrap=True,
        )
    path = write_json(output or _default_output(synthetic, real, seed, protocol=protocol, split=split,
                                                    real_test_split=real_test_split, scales=scale_list), {"command": "cas", **result})
    console.print(f"results: {path}", highlight=False, soft_wrap=True)

