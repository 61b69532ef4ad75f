"""Shard plan, shard writer, dataset card and the build that ties them together."""

from synthgen.dataset.build import (
    BuildPlan,
    BuildResult,
    build_dataset,
    make_shard,
    plan_build,
    read_manifest,
    read_row,
    regenerate_row,
)
from synthgen.dataset.plan import ShardPlan, ShardSpec
from synthgen.dataset.schema import dataset_features
from synthgen.dataset.verify import VerifyReport, verify_dataset
from synthgen.dataset.writer import ShardRow, ShardWriter

__all__ = [
    "BuildPlan",
    "BuildResult",
    "ShardPlan",
    "ShardRow",
    "ShardSpec",
    "ShardWriter",
    "VerifyReport",
    "build_dataset",
    "dataset_features",
    "make_shard",
    "plan_build",
    "read_manifest",
    "read_row",
    "regenerate_row",
    "verify_dataset",
]
