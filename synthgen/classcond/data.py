"""The labelled real images a run adapts to, and their cached latents.

Images come from :func:`synthgen.train.data.load_image_dataset` (a local folder or parquet file, or a
Hub id), which must have labels. The run records where they came from (``run.json``), so the UNet
stage re-reads the same split when the cached latents are missing.
"""

from __future__ import annotations

from typing import Any, Optional

from synthgen.classcond.latents import LatentSet, load_or_encode_latents
from synthgen.classcond.runfolder import RunFolder
from synthgen.errors import SynthgenError

__all__ = ["load_labelled_images", "run_latents"]


def load_labelled_images(
    dataset: str,
    split: str = "train",
    *,
    revision: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    limit: Optional[int] = None,
):
    """``(ImageTensorDataset, class_names, description)`` of a labelled split (SynthgenError otherwise)."""
    from synthgen.train.data import load_image_dataset

    ds = load_image_dataset(
        dataset, split, revision=revision, image_column=image_column, label_column=label_column, limit=limit,
        require_labels=True,
    )
    n_classes = ds.num_classes or 0
    class_names = list(ds.class_names) if ds.class_names is not None else [str(i) for i in range(n_classes)]
    if int(ds.labels.max()) >= len(class_names):
        raise SynthgenError(f"{dataset}[{split}]: label {int(ds.labels.max())} has no class name ({len(class_names)} names)")
    description = {
        "source": dataset,
        "id": ds.source.get("id"),
        "split": split,
        "revision": revision,
        "image_column": image_column,
        "label_column": label_column,
        "limit": limit,
        "rows": len(ds),
        "fingerprint": ds.source.get("fingerprint"),
    }
    return ds, class_names, description


def run_latents(
    run: RunFolder,
    info: dict[str, Any],
    base_folder,
    *,
    encode_batch_size: int,
    cpu: bool,
    images=None,
    labels=None,
) -> LatentSet:
    """The run's cached latents, encoding them first when missing (on the main process; the others
    wait and read them). ``images``/``labels`` default to re-reading the run's dataset."""
    from accelerate import PartialState

    from synthgen.classcond.base import load_vae

    state = PartialState(cpu=cpu)
    key = {"base_revision": info["base_revision"], "dataset": info["dataset"], "resolution": info["resolution"]}

    def source():
        if images is not None:
            return images, labels
        d = info["dataset"]
        ds, _, _ = load_labelled_images(
            d["source"], d["split"], revision=d["revision"], image_column=d["image_column"],
            label_column=d["label_column"], limit=d["limit"],
        )
        return ds.images, ds.labels

    with state.main_process_first():
        return load_or_encode_latents(
            run.latents_path, key, source=source, vae_loader=lambda: load_vae(base_folder),
            resolution=info["resolution"], batch_size=encode_batch_size, device=state.device,
        )
