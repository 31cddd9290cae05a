"""The smoke study through the real test cluster: `submit --cluster slurm` queues every stage at
once and returns; Slurm orders them; the study ends with the same numbers as the local run.

By default the study's bf16 slice runs (preprocess, the bf16 SFT, its export and eval, the base
eval, the report: the stage kinds' ordering and the numbers, as on the other backends, in half the
time of the 11-stage QAT slice this ran before); FASTER_QAT_SLOW_TESTS=1 submits all 28 stages."""

from __future__ import annotations

import sys
import time

from pipeline.backends.base import StageState
from pipeline.backends.slurm import SlurmBackend
from pipeline.layout import RunLayout
from pipeline.run_record import read_record
from tests.smoke import BF16_ONLY_OUT, assert_same_losses, pipeline_cli, smoke_slice


def test_the_smoke_study_on_slurm_matches_the_local_run(slurm_cluster, smoke_root, tmp_path):
    root = tmp_path / "runs"
    overrides = ["slurm.profile=local-test", f"slurm.python={sys.executable}"]
    runs, stages = smoke_slice(BF16_ONLY_OUT)
    args = [*(arg for item in overrides for arg in ("--set", item)), *runs]
    submitted = pipeline_cli("submit", "--cluster", "slurm", "-c", "smoke", "--root", str(root), *args)
    assert submitted.returncode == 0, submitted.stderr
    assert f"submitted {stages} stage(s)" in submitted.stdout
    layout = RunLayout(root.resolve(), "smoke")
    record = read_record(layout)
    backend = SlurmBackend.for_record(record)
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        statuses = backend.status(layout, record)
        if all(status.state.finished for status in statuses):
            break
        time.sleep(5)
    assert {s.name: s.state for s in statuses} == {s.name: StageState.SUCCEEDED for s in statuses}

    assert_same_losses(root, smoke_root)
