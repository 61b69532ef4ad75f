"""Publishing to the Hugging Face Hub: datasets built by synthgen, and ``save_pretrained`` models.

* :func:`push_dataset` - a complete build folder -> a tagged dataset repo revision;
* :func:`push_model` - a pipeline/model folder -> a tagged model repo revision;
* :func:`push` - either, by what the folder holds (what ``synthgen push`` calls).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from synthgen.errors import SynthgenError
from synthgen.hub.dataset import push_dataset, verified_manifest
from synthgen.hub.model import CONFIG_FILES, push_model
from synthgen.hub.publish import PushResult
from synthgen.hub.retry import Backoff


def push(folder: str | Path, repo_id: str, *, datasets: Optional[list[str]] = None,
         base_model: Optional[str] = None, **options) -> PushResult:
    """Push a dataset folder (from ``synthgen build``) or a ``save_pretrained`` model folder."""
    from synthgen.dataset.build import MANIFEST, PLAN_FILE
    from synthgen.dataset.writer import STATE_DIR

    from synthgen.dataset.storage import is_url

    if is_url(folder):  # the upload links the shards into a local staging folder
        raise SynthgenError(f"push needs a local folder, got {folder}: copy it first "
                            f"(e.g. `aws s3 sync {folder} ./ds`), then `synthgen push ./ds {repo_id}`")
    folder = Path(folder)
    if not folder.is_dir():
        raise SynthgenError(f"{folder} is not a folder")
    if (folder / MANIFEST).is_file() or (folder / STATE_DIR / PLAN_FILE).is_file():
        if datasets or base_model:
            raise SynthgenError("--dataset and --base-model describe models; this folder holds a dataset")
        return push_dataset(folder, repo_id, **options)
    if any((folder / name).is_file() for name in CONFIG_FILES):
        return push_model(folder, repo_id, datasets=list(datasets or []), base_model=base_model, **options)
    raise SynthgenError(f"{folder} holds neither a dataset built by synthgen nor a save_pretrained model")


__all__ = ["Backoff", "PushResult", "push", "push_dataset", "push_model", "verified_manifest"]
