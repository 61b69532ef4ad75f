"""``run``: Lomurno et al.'s whole pipeline on one run folder, resuming where it stopped.

1. ``train``        -- the class encoder (:func:`~synthgen.classcond.train_encoder.train_class_encoder`);
2. ``tune-encoder`` -- steps, guidance, encoder epoch (:func:`~synthgen.classcond.tune.tune_stage`);
3. ``finetune``     -- the UNet with stage 2's encoder epoch (:func:`~synthgen.classcond.finetune.finetune_unet`);
4. ``tune-unet``    -- steps, guidance, UNet epoch;
5. ``final``        -- the tuned pipeline, its x1..xk datasets and their CAS (:func:`~synthgen.classcond.final.final_stage`).

Every stage resumes by itself (checkpoints per epoch, trials in the study, shards in the build) and
returns at once when it is complete, so running ``run`` again continues from the stage that was
interrupted; ``stages.json`` records which stages have finished. ``recipe.json`` keeps the recipe
the run was last called with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from synthgen.errors import SynthgenError

__all__ = ["STAGE_ORDER", "run_classcond", "train_stage", "finetune_stage", "dataset_source"]

STAGE_ORDER = ("train", "tune-encoder", "finetune", "tune-unet", "final")


def dataset_source(recipe) -> str:
    """The recipe's dataset source with a local path made absolute (run.json records it)."""
    from synthgen.train.config import resolve_source

    return resolve_source(recipe.dataset.source, "dataset.source")


def _on_device(config, device: Optional[str]):
    """The stage config for ``device`` (cpu, cuda, cuda:1, auto; None: the recipe's). accelerate
    trains on the current CUDA device, so a single process makes ``cuda:N`` current."""
    if device is None:
        return config
    import torch

    from synthgen.train.runtime import resolve_device

    dev = resolve_device(device)  # an unknown or unavailable device is one line
    if dev.type == "cuda" and dev.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(dev)
    return config.model_copy(update={"cpu": dev.type == "cpu"})


def train_stage(run_dir, recipe, *, device: Optional[str] = None, on_epoch_end=None):
    from synthgen.classcond.train_encoder import train_class_encoder

    d = recipe.dataset
    config = _on_device(recipe.encoder, device)
    return train_class_encoder(run_dir, recipe.base_model, dataset_source(recipe), split=d.split,
                               dataset_revision=d.revision, base_revision=recipe.base_revision,
                               image_column=d.image_column, label_column=d.label_column, limit=d.limit,
                               config=config, on_epoch_end=on_epoch_end)


def finetune_stage(run_dir, recipe, *, encoder_epoch: Optional[int] = None, device: Optional[str] = None,
                   on_epoch_end=None):
    from synthgen.classcond.finetune import finetune_unet
    from synthgen.classcond.tune import read_best

    if encoder_epoch is None:
        encoder_epoch = int(read_best(run_dir, "encoder")["params"]["encoder_epoch"])
    config = _on_device(recipe.unet, device)
    return finetune_unet(run_dir, encoder_epoch=encoder_epoch, config=config, on_epoch_end=on_epoch_end)


def _mark(run_dir: Path, stage: str, summary: dict) -> None:
    from synthgen.train.checkpoint import atomic_write_text

    path = run_dir / "stages.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    done[stage] = summary
    atomic_write_text(path, json.dumps(done, indent=2, default=str) + "\n")


def run_classcond(run_dir: str | os.PathLike, recipe, *, real=None, device: Optional[str] = None,
                  say: Callable[[str], None] = lambda s: None, on_trial=None, on_epoch_end=None,
                  progress: bool = True, console=None) -> dict:
    """All stages of ``recipe`` in ``run_dir`` (see the module doc); returns the final CAS result.
    ``say(line)`` is told what each stage did."""
    from synthgen.classcond.final import final_stage
    from synthgen.classcond.tune import tune_stage
    run_dir = Path(run_dir)
    if real is None:
        dataset_source(recipe)  # a missing dataset is one line before anything is written
    result = train_stage(run_dir, recipe, device=device, on_epoch_end=on_epoch_end)
    from synthgen.train.checkpoint import atomic_write_text

    atomic_write_text(run_dir / "recipe.json", json.dumps(recipe.model_dump(mode="json"), indent=2) + "\n")
    say(_stage_line(1, "train", f"encoder epochs 1-{result.last_epoch}, loss {result.losses.get(result.last_epoch, float('nan')):.4f}",
                    result.resumed_from, result.last_epoch))
    _mark(run_dir, "train", {"epochs": result.last_epoch, "losses": result.losses})

    tuned = _tuned(tune_stage(run_dir, recipe, "encoder", real=real, device=device, on_trial=on_trial), 2)
    say(f"stage 2 (tune-encoder): best {tuned.best['params']} -> val acc {tuned.best['value']:.4f} "
        f"({tuned.finished} trials, {tuned.pruned} pruned; {tuned.ran} run now)")
    _mark(run_dir, "tune-encoder", tuned.best)

    result = finetune_stage(run_dir, recipe, device=device, on_epoch_end=on_epoch_end)
    say(_stage_line(3, "finetune", f"UNet epochs 1-{result.last_epoch} ({recipe.unet.method}), loss "
                    f"{result.losses.get(result.last_epoch, float('nan')):.4f}", result.resumed_from, result.last_epoch))
    _mark(run_dir, "finetune", {"epochs": result.last_epoch, "losses": result.losses})

    tuned = _tuned(tune_stage(run_dir, recipe, "unet", real=real, device=device, on_trial=on_trial), 4)
    say(f"stage 4 (tune-unet): best {tuned.best['params']} -> val acc {tuned.best['value']:.4f} "
        f"({tuned.finished} trials, {tuned.pruned} pruned; {tuned.ran} run now)")
    _mark(run_dir, "tune-unet", tuned.best)

    cas = final_stage(run_dir, recipe, real=real, device=device, progress=progress, console=console)
    scales = ", ".join(f"x{r['scale']} {r['top1']:.2f}%" for r in cas["runs"])
    say(f"final: CAS top-1 {scales} (real baseline {cas['real_baseline']['top1']:.2f}%); pipeline {run_dir / 'pipeline'}, "
        f"dataset {run_dir / 'dataset'}, CAS results {run_dir / 'cas'}")
    below = gaps_line(cas)
    if below:
        say(below)
    _mark(run_dir, "final", {"real_top1": cas["real_baseline"]["top1"],
                             "runs": [{"scale": r["scale"], "top1": r["top1"]} for r in cas["runs"]]})
    return cas


def gaps_line(cas: dict) -> str:
    """The line naming the (at most 5) classes furthest below the real baseline at the largest
    scale; classes at or above it are not below it and are left out ("" when none is below)."""
    from synthgen.train.cas import class_gaps

    gaps = [g for g in class_gaps(cas, top=None) if g["gap"] > 0][:5]
    if not gaps:
        return ""
    worst = ", ".join(f"{g['class']} {g['synthetic']:.1f}% (real {g['real']:.1f}%)" for g in gaps)
    return f"final: classes furthest below the real baseline at x{max(r['scale'] for r in cas['runs'])}: {worst}"


def _tuned(tuned, number: int):
    """The stage's result, or a stop when it has no best yet: the next stage needs its parameters."""
    if not tuned.best:
        raise SynthgenError(f"stage {number} (tune-{tuned.stage}): {tuned.finished} trials finished "
                            f"({tuned.pruned} pruned), no best yet: {tuned.no_best_reason}; run again when "
                            f"they are done; {tuned.folder}")
    return tuned


def _stage_line(number: int, name: str, what: str, resumed_from: int, last: int) -> str:
    how = "already done" if resumed_from >= last else (f"resumed after epoch {resumed_from}" if resumed_from else "trained")
    return f"stage {number} ({name}): {what} ({how})"
