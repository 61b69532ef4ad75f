"""Batch samplers for multi-positive contrastive training (StableRep).

:class:`GroupBatchSampler` builds batches of ``groups_per_batch`` (k) groups with exactly
``images_per_group`` (m) images each — StableRep generates 10 images per caption and puts 6 of them
in every batch, so a batch of ``k * m`` images has k captions.

One epoch visits every eligible group exactly once: for each group, m of its images are drawn at
random without replacement (a group with 10 images contributes 6 of them, different ones each epoch),
the groups are shuffled and cut into batches of k. Groups with fewer than m images are handled by
``short_groups``:

* ``"skip"`` (default): left out of every epoch (so no batch ever holds fewer than m of a group);
* ``"replace"``: their images are drawn with replacement up to m (each image at least once when the
  group is non-empty; duplicates are then identical positives, which only augmentation tells apart).

Everything is a function of ``(seed, epoch)``: call :meth:`set_epoch` before each epoch (as with
``DistributedSampler``) to get a new, reproducible order. ``drop_last`` drops a final batch with fewer
than k groups (it still holds m images of each of its groups).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch

__all__ = ["GroupBatchSampler"]


class GroupBatchSampler:
    """Yields lists of dataset indices: k groups x m images per batch, group-major within a batch."""

    def __init__(
        self,
        groups: Sequence[int] | torch.Tensor,
        groups_per_batch: int,
        images_per_group: int,
        *,
        seed: int = 0,
        drop_last: bool = True,
        short_groups: Literal["skip", "replace"] = "skip",
    ) -> None:
        if groups_per_batch < 1 or images_per_group < 1:
            raise ValueError("groups_per_batch and images_per_group must be >= 1")
        if short_groups not in ("skip", "replace"):
            raise ValueError(f"short_groups must be 'skip' or 'replace', got {short_groups!r}")
        groups = torch.as_tensor(groups, dtype=torch.long).flatten()
        self.groups_per_batch = int(groups_per_batch)
        self.images_per_group = int(images_per_group)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.short_groups = short_groups
        self.epoch = 0
        # members[g] = sorted dataset indices of group g (ordered by group id for determinism)
        order = torch.argsort(groups, stable=True)
        ids, counts = torch.unique_consecutive(groups[order], return_counts=True)
        members = list(torch.split(order, counts.tolist()))
        self.group_ids = ids
        m = self.images_per_group
        keep = [i for i, c in enumerate(counts.tolist()) if c >= m or (short_groups == "replace" and c > 0)]
        self._members = [members[i] for i in keep]
        self.skipped_groups = len(members) - len(keep)
        if not self._members:
            raise ValueError(
                f"no group has {m} images (largest has {int(counts.max()) if len(counts) else 0}); "
                "lower images_per_group or use short_groups='replace'"
            )

    @property
    def num_groups(self) -> int:
        """Groups visited per epoch."""
        return len(self._members)

    @property
    def batch_size(self) -> int:
        return self.groups_per_batch * self.images_per_group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.num_groups, self.groups_per_batch)
        return full if (self.drop_last or rest == 0) else full + 1

    def _generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.epoch * 7919 + 12345) % (2**63 - 1))
        return g

    def __iter__(self) -> Iterator[list[int]]:
        gen = self._generator()
        m = self.images_per_group
        chunks: list[torch.Tensor] = []
        for members in self._members:
            if len(members) >= m:
                pick = members[torch.randperm(len(members), generator=gen)[:m]]
            else:  # "replace": every image once, the rest drawn with replacement
                extra = torch.randint(len(members), (m - len(members),), generator=gen)
                pick = torch.cat([members, members[extra]])
                pick = pick[torch.randperm(m, generator=gen)]
            chunks.append(pick)
        order = torch.randperm(len(chunks), generator=gen).tolist()
        k = self.groups_per_batch
        for start in range(0, len(order), k):
            batch_groups = order[start : start + k]
            if len(batch_groups) < k and self.drop_last:
                return
            yield torch.cat([chunks[i] for i in batch_groups]).tolist()
