"""Shard plan, shard writer, dataset card, and the build that ties them together (see ``build.py``)."""

from synthgen.dataset.build import build_dataset
from synthgen.dataset.folder import BuildPlan, plan_build
from synthgen.dataset.job import BuildResult
from synthgen.dataset.plan import ShardPlan, ShardSpec
from synthgen.dataset.read import read_manifest, read_row, regenerate_row
from synthgen.dataset.schema import dataset_features
from synthgen.dataset.shard_task import ShardMaker, produce_shard
from synthgen.dataset.verify import VerifyReport, verify_dataset
from synthgen.dataset.writer import ShardRow, ShardWriter

__all__ = [
    "BuildPlan",
    "BuildResult",
    "ShardMaker",
    "ShardPlan",
    "ShardRow",
    "ShardSpec",
    "ShardWriter",
    "VerifyReport",
    "build_dataset",
    "dataset_features",
    "plan_build",
    "produce_shard",
    "read_manifest",
    "read_row",
    "regenerate_row",
    "verify_dataset",
]
