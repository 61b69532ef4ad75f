"""A small crash campaign (benchmarks/crash_campaign.py runs the full one): kill -9 during the plan,
during a shard write and between the last shard and the manifest, then resume; the folder must end
byte-identical to an uninterrupted build, with every planned row and a complete manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kill_9_at_three_phases_then_resume_is_byte_identical(tmp_path, tiny_pipeline_path):
    out = tmp_path / "campaign.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "crash_campaign.py"), "--trials", "1",
         "--phases", "plan,shard-write,manifest", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["failed_trials"] == 0 and result["all_byte_identical"]
    assert result["kills"] + result["missed_targets"] == 3 and result["kills"] >= 2
    assert {"plan", "shard-write"} <= set(result["kills_by_landed_phase"])
    assert result["rows_planned"] == 24 and result["details"][0]["problems"] == []
