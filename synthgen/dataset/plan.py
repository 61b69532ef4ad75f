"""The shard plan: fixed up front from the image count, so every worker agrees on every shard.

The plan is always the recipe's whole plan. A partial build (``--limit N``) makes its first N rows:
the shards before N whole and the shard N falls in cut short at N, under its full-plan file name;
a later build completes that shard by keeping its rows and generating only the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class ShardSpec:
    index: int  # shard number
    start: int  # first global image index (inclusive)
    stop: int  # last global image index (exclusive)
    filename: str  # path inside the dataset folder, Hub layout

    @property
    def name(self) -> str:
        """The shard's file name without folder and extension (``train-00000-of-00004``)."""
        return self.filename.rsplit("/", 1)[-1].removesuffix(".parquet")

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardPlan:
    total: int
    per_shard: int
    split: str = "train"

    def __post_init__(self) -> None:
        if self.total <= 0 or self.per_shard <= 0:
            raise ValueError("a shard plan needs a positive image count and shard size")

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.per_shard)

    def shard(self, i: int) -> ShardSpec:
        n = self.num_shards
        if not 0 <= i < n:
            raise IndexError(f"shard {i} out of range for {n} shards")
        start = i * self.per_shard
        stop = min(start + self.per_shard, self.total)
        return ShardSpec(i, start, stop, f"data/{self.split}-{i:05d}-of-{n:05d}.parquet")

    def shards(self) -> list[ShardSpec]:
        return [self.shard(i) for i in range(self.num_shards)]

    def prefix(self, limit: Optional[int] = None) -> list[ShardSpec]:
        """The shards holding rows ``0 .. limit-1`` (all shards for None), the last one cut at ``limit``."""
        if limit is None or limit >= self.total:
            return self.shards()
        if limit <= 0:
            raise ValueError("a prefix needs a positive row count")
        specs = [self.shard(i) for i in range(-(-limit // self.per_shard))]
        specs[-1] = replace(specs[-1], stop=min(specs[-1].stop, limit))
        return specs

    def to_dict(self) -> dict:
        return {"total": self.total, "per_shard": self.per_shard, "split": self.split, "num_shards": self.num_shards}
