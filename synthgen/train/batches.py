"""Batches for the training loops: from a uint8 tensor held on the device, or streamed.

:class:`TensorBatches` holds a decoded split (an :class:`~synthgen.train.data.ImageTensorDataset`)
on the device when it takes at most ``max_gpu_fraction`` of the free GPU memory (else in pinned host
memory, copied per batch) and cuts batches from it by index: no DataLoader, no per-epoch decoding.
:class:`~synthgen.train.stream.StreamBatches` has the same interface for data larger than memory.

Both yield ``(images, labels)``: ``uint8 [B, 3, H, W]`` on the device and ``long`` labels (or None);
the loop normalises with :func:`~synthgen.train.data.to_float`. ``batch_size`` is the GLOBAL batch:
under DDP each process gets its equal share of every batch (:meth:`Runtime.shard`), so a run on
two processes sees the same global batches as a run on one.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from synthgen.errors import SynthgenError
from synthgen.train.runtime import Runtime

__all__ = ["TensorBatches", "NORMALIZATIONS", "resolve_normalization"]

NORMALIZATIONS = ("dataset", "unit", "cifar", "imagenet", "half")


def resolve_normalization(kind: str, images: torch.Tensor | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` in [0, 1] units: ``unit`` = plain x/255 (Keras' ``Rescaling(1/255)``),
    ``dataset`` = the statistics of ``images``, or ImageNet's, CIFAR-10's, 0.5 (``half``)."""
    from synthgen.train.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, channel_stats

    if kind == "unit":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if kind == "imagenet":
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    if kind == "cifar":
        return tuple(CIFAR_MEAN), tuple(CIFAR_STD)
    if kind == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if kind == "dataset":
        if images is None:
            raise SynthgenError("normalization 'dataset' needs the training images")
        return channel_stats(images)
    raise SynthgenError(f"unknown normalization {kind!r}; use one of {', '.join(NORMALIZATIONS)}")


class TensorBatches:
    """One decoded split as batches on ``runtime``'s device; ``label_map[i]`` relabels id ``i``."""

    def __init__(self, ds, runtime: Runtime, label_map=None, max_gpu_fraction: float = 0.5, require_labels: bool = True):
        self.runtime = runtime
        self.n = len(ds)
        dev = runtime.device
        images = ds.images
        on_device = dev.type != "cuda"
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            on_device = images.numel() <= max_gpu_fraction * free
        self.images = images.to(dev) if on_device else images.contiguous().pin_memory()
        self.on_device = on_device
        labels = ds.labels
        if labels is None and require_labels:
            raise SynthgenError(f"{ds.describe()} has no labels")
        if labels is not None and label_map is not None:
            labels = torch.as_tensor(label_map, dtype=torch.long)[labels]
        self.labels = None if labels is None else labels.to(dev)
        self.groups = None if getattr(ds, "groups", None) is None else ds.groups.to(dev)

    def __len__(self) -> int:
        return self.n

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``idx`` (on the CPU, or already on the device) as device tensors."""
        dev = self.runtime.device
        idx_d = idx.to(dev, non_blocking=True)
        if self.on_device:
            x = self.images[idx_d]
        else:
            x = self.images[idx.cpu()].pin_memory().to(dev, non_blocking=True)
        return x, None if self.labels is None else self.labels[idx_d]

    def batches_per_epoch(self, batch_size: int, epochs: int = 1, *, drop_last: bool = True, min_batch: int = 2) -> int:
        """The batches every shuffled ``epoch(batch_size, generator, drop_last=..., min_batch=...)``
        yields (the same each epoch): full ones, plus the short rest unless ``drop_last`` or under
        ``min_batch`` rows a process. The interface of :meth:`StreamBatches.batches_per_epoch`."""
        full, rest = divmod(self.n, batch_size)
        return full + int(not drop_last and rest >= max(1, min_batch * self.runtime.world_size))

    def epoch(
        self, batch_size: int, generator: torch.Generator | None = None, *, drop_last: bool = False, min_batch: int = 2
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One shuffled pass (``generator`` None: in order). A final batch smaller than ``min_batch``
        (a batch of one breaks BatchNorm) or than ``batch_size`` with ``drop_last`` is dropped.
        Under DDP a shuffled pass gives every process an equal share of each batch; an in-order pass
        (scoring) splits each batch as evenly as it goes, so every row is taken once."""
        rt = self.runtime
        scoring = generator is None
        order = torch.randperm(self.n, generator=generator) if not scoring else torch.arange(self.n)
        if self.on_device:
            order = order.to(rt.device)  # one copy per epoch instead of one per step
        for start in range(0, self.n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < batch_size and (drop_last or len(idx) < min_batch * (1 if scoring else rt.world_size)):
                continue
            local = rt.shard(idx, every_row=scoring)
            if len(local):
                yield self.take(local)

    def batches_of(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.take(torch.as_tensor(indices, dtype=torch.long))
