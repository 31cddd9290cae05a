"""The nemo-run backend on NeMo-Run's SlurmExecutor, through a LocalTunnel, on the real test
cluster (slurm/start-test-cluster.sh): the executor's own dependencies (sbatch --dependency=
afterok) order the tasks; the study ends with the local backend's numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline.backends.base import StageState, StageStatus
from pipeline.backends.nemo import NemoRunBackend
from pipeline.backends.nemo_settings import NemoRunSettings
from pipeline.layout import RunLayout
from pipeline.run_record import read_record
from tests.pipeline.probe_dag import RUN_ID, fan_out_graph, plan
from tests.smoke import BF16_ONLY_OUT, assert_same_losses, pipeline_cli, smoke_slice

pytestmark = pytest.mark.slow
SLURM = {"executor": "slurm", "slurm": {"account": "studies", "partition": "debug"}}


@pytest.fixture(autouse=True)
def cancel_leftovers(tmp_path):
    """A test that fails midway leaves no job in the shared test cluster's queue."""
    yield
    for jobs_file in tmp_path.rglob("jobs.json"):
        layout = RunLayout(jobs_file.parent.parent, jobs_file.parent.name)
        record = read_record(layout)
        NemoRunBackend.for_record(record).cancel(layout, record)


def statuses(layout: RunLayout) -> dict[str, StageStatus]:
    record = read_record(layout)
    return {s.name: s for s in NemoRunBackend.for_record(record).status(layout, record)}


def wait_until(layout: RunLayout, done, timeout_s: float) -> dict[str, StageStatus]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = statuses(layout)
        if done(found):
            return found
        time.sleep(2)
    raise AssertionError(f"not done in {timeout_s} s: {statuses(layout)}")


def open_pipes() -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:") for fd in fds if os.path.exists(f"/proc/self/fd/{fd}"))


def queued(job_ids: list[str]) -> list[str]:
    listing = subprocess.run(["squeue", "--noheader", "--format=%i", f"--jobs={','.join(job_ids)}"],
                             capture_output=True, text=True)
    return listing.stdout.split()


def test_the_smoke_study_on_slurm_through_nemo_run_matches_the_local_run(nemorun_home, slurm_cluster,
                                                                         smoke_root, tmp_path):
    root = tmp_path / "runs"
    overrides = ["nemo_run.executor=slurm", "nemo_run.slurm.account=studies", f"nemo_run.slurm.partition={slurm_cluster}",
                 f"nemo_run.python={sys.executable}"]
    runs, stages = smoke_slice(BF16_ONLY_OUT)
    args = [*(arg for item in overrides for arg in ("--set", item)), *runs]
    submitted = pipeline_cli("submit", "--cluster", "nemo-run", "-c", "smoke", "--root", str(root), *args)
    assert submitted.returncode == 0, submitted.stderr
    assert f"submitted {stages} stage(s): NeMo-Run experiment smoke_" in submitted.stdout
    assert "slurm jobs " in submitted.stdout
    layout = RunLayout(root.resolve(), "smoke")
    found = wait_until(layout, lambda states: all(s.state.finished for s in states.values()), 1500)
    assert {name: s.state for name, s in found.items()} == {name: StageState.SUCCEEDED for name in found}
    assert all(s.job_id.isdigit() for s in found.values())  # each stage was one sbatch job

    assert_same_losses(root, smoke_root)


def test_a_failed_stage_blocks_its_dependents_and_cancel_takes_them_off_the_queue(nemorun_home, slurm_cluster,
                                                                                  tmp_path):
    backend = NemoRunBackend(NemoRunSettings.model_validate({**SLURM, "python": sys.executable}))
    layout = RunLayout(tmp_path.resolve(), RUN_ID)
    described = backend.submit(plan(fan_out_graph(fail="a"), tmp_path, cluster="nemo-run"), layout, None)
    assert "submitted 6 stage(s): NeMo-Run experiment probe_" in described
    # Slurm keeps the join pending for ever (DependencyNeverSatisfied): status calls it blocked.
    pipes_before = open_pipes()
    found = wait_until(layout, lambda states: all(s.state.finished for s in states.values()), 300)
    assert open_pipes() <= pipes_before  # polling through the tunnel leaves no pipe open behind it
    assert {name: s.state for name, s in found.items()} == {
        "source": StageState.SUCCEEDED, "a": StageState.FAILED, "b": StageState.SUCCEEDED,
        "c": StageState.SUCCEEDED, "d": StageState.SUCCEEDED, "join": StageState.BLOCKED}
    assert found["a"].note == "a: RuntimeError: probe asked to fail"
    assert found["join"].note == "upstream a will not succeed"
    assert queued([found["join"].job_id]) == [found["join"].job_id]

    record = read_record(layout)
    assert "probe asked to fail" in backend.logs(layout, record, "a")
    assert backend.cancel(layout, record) == ["join"]  # scancel through NeMo-Run's tunnel
    assert queued([found["join"].job_id]) == []
    assert statuses(layout)["join"].state == StageState.CANCELLED
    assert not (layout.stage_dir("join") / "output.txt").exists()
