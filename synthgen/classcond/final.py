"""The final step: the tuned pipeline, its x1..xk datasets and their CAS.

With stage 4's best settings (steps, guidance, UNet epoch, and stage 2's encoder epoch) the run

1. saves the tuned pipeline to ``run_dir/pipeline/`` (``save_pretrained``: safetensors, loadable with
   ``synthgen.ClassConditionedPipeline.from_pretrained``; its ``training`` config names the epochs)
   and the tuned settings to ``run_dir/tuned.json``;
2. builds ``max(scales)`` scale units of images into ``run_dir/dataset/`` with ``synthgen build``'s
   engine (the ``generation`` dataset recipe, ``prompts.kind: classes`` in the final class
   distribution, classes interleaved so that every prefix keeps it) -- resumable like any build;
3. scores CAS at each scale ``xk`` on ``k`` units (``synthgen cas --scales``: the first ``k`` units of
   one seeded shuffle of the images), writing
   ``run_dir/cas/cas.json`` and the CAS-vs-scale curve (PNG and JSON).

A scale unit is the protocol's: ``scale_unit``, or the real images its baseline fits on (40,000 for
``cas-lomurno``, Lomurno et al.'s ``x_train[:40000]``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from synthgen.errors import OutputFolderError, SynthgenError

__all__ = ["final_stage", "save_tuned_pipeline", "tuned_settings"]


def tuned_settings(run_dir: Path) -> dict:
    """Stage 4's best settings with stage 2's encoder epoch."""
    from synthgen.classcond.tune import read_best

    best2, best4 = read_best(run_dir, "encoder"), read_best(run_dir, "unet")
    p = best4["params"]
    return {
        "encoder_epoch": int(p["encoder_epoch"]),
        "unet_epoch": int(p["unet_epoch"]),
        "steps": int(p["steps"]),
        "guidance": float(p["guidance"]),
        "stage2": {"params": best2["params"], "value": best2["value"], "trial": best2["trial"]},
        "stage4": {"params": best4["params"], "value": best4["value"], "trial": best4["trial"]},
    }


def save_tuned_pipeline(run_dir: Path, tuned: dict) -> Path:
    """``run_dir/pipeline``: the pipeline at the tuned epochs (written once; refused if an earlier
    one was saved for other epochs)."""
    from synthgen.classcond.assemble import load_run_pipeline
    from synthgen.generate.classcond import is_class_conditioned

    folder = Path(run_dir) / "pipeline"
    want = {"encoder_epoch": tuned["encoder_epoch"], "unet_epoch": tuned["unet_epoch"]}
    if is_class_conditioned(folder):
        have = json.loads((folder / "model_index.json").read_text()).get("training") or {}
        if {k: have.get(k) for k in want} != want:
            raise SynthgenError(
                f"{folder} holds the pipeline of other tuned epochs ({ {k: have.get(k) for k in want} }, now {want}); "
                "remove pipeline/, dataset/ and cas/ from the run folder to make the final datasets again"
            )
        return folder
    pipe = load_run_pipeline(run_dir, encoder_epoch=tuned["encoder_epoch"], unet_epoch=tuned["unet_epoch"])
    tmp = folder.with_name(f".pipeline.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder


def final_stage(run_dir: str | os.PathLike, recipe, *, real=None, device: Optional[str] = None,
                progress: bool = True, console=None) -> dict:
    """Build the tuned datasets and score them (see the module doc); returns the CAS result."""
    from synthgen.classcond.generation import final_dataset_recipe
    from synthgen.classcond.report import write_scale_report
    from synthgen.classcond.runfolder import RunFolder
    from synthgen.dataset.build import build_dataset
    from synthgen.train.cas import cas_score, load_cas_protocol, load_real_splits
    from synthgen.train.checkpoint import atomic_write_text

    run_dir = Path(run_dir)
    info = RunFolder(run_dir).read_info()
    tuned = tuned_settings(run_dir)
    f, d = recipe.final, recipe.dataset
    protocol, protocol_info = load_cas_protocol(f.protocol, f.protocol_overrides)
    real_source = real if real is not None else d.source
    splits = load_real_splits(real_source, protocol, revision=d.revision, train_split=d.split, with_test=False, seed=f.seed)
    unit = protocol.scale_unit or splits.scale_base
    count = max(f.scales) * unit
    tuned = {**tuned, "scale_unit": unit, "images": count, "scales": f.scales}
    pipeline_dir = save_tuned_pipeline(run_dir, tuned)
    dataset_recipe = final_dataset_recipe(
        recipe, pipeline_dir=pipeline_dir, steps=tuned["steps"], guidance=tuned["guidance"], count=count,
        class_names=info["class_names"], resolution=info["resolution"], stored_size=splits.train.image_size[0],
        device=device,
    )
    try:
        build = build_dataset(dataset_recipe, run_dir / "dataset", progress=progress)
    except OutputFolderError as exc:  # its advice (--overwrite, --out) is build's, not this command's
        why = str(exc).split("; use --overwrite")[0]
        raise SynthgenError(f"{why}; remove dataset/ and cas/ from the run folder to make the final datasets "
                            "again with these settings") from None
    # written once the dataset folder holds these settings: tuned.json describes dataset/
    atomic_write_text(run_dir / "tuned.json", json.dumps(tuned, indent=2) + "\n")
    if not build.dataset_complete:
        raise SynthgenError(f"the final dataset in {run_dir / 'dataset'} is not complete (shards left: "
                            f"{', '.join(build.left[:3])}); run the same command again")
    cas = cas_score(str(run_dir / "dataset"), real_source, protocol, seed=f.seed, scales=f.scales,
                    protocol_info=protocol_info, real_train_split=d.split, real_test_split=d.test_split,
                    real_revision=d.revision, device=device, console=console)
    out = run_dir / "cas"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "cas.json", json.dumps(cas, indent=2, default=str) + "\n")
    write_scale_report(cas, out)
    return cas
