"""The nemo-run backend on NeMo-Run's LocalExecutor: real NeMo-Run, real processes. The executor
has no dependencies (it would run a dependent after its upstream failed), so every task passes
the upstream gate first; the study ends with the local backend's numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.backends.base import StageState, StageStatus
from pipeline.backends.nemo import NemoRunBackend
from pipeline.backends.nemo_settings import NemoRunSettings
from pipeline.layout import RunLayout
from pipeline.run_record import read_record
from tests.pipeline.probe_dag import RUN_ID, fan_out_graph, plan
from tests.smoke import TRIMMED_OUT, assert_same_losses, pipeline_cli, smoke_slice

pytestmark = pytest.mark.slow


def statuses(layout: RunLayout) -> dict[str, StageStatus]:
    record = read_record(layout)
    return {s.name: s for s in NemoRunBackend.for_record(record).status(layout, record)}


def wait_finished(layout: RunLayout, timeout_s: float) -> dict[str, StageStatus]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = statuses(layout)
        if all(status.state.finished for status in found.values()):
            return found
        time.sleep(1)
    raise AssertionError(f"not finished in {timeout_s} s: {statuses(layout)}")


def submit_probe(root: Path, **graph: object) -> tuple[NemoRunBackend, RunLayout]:
    backend = NemoRunBackend(NemoRunSettings(python=sys.executable, poll_seconds=1))
    layout = RunLayout(root.resolve(), RUN_ID)
    described = backend.submit(plan(fan_out_graph(**graph), root, cluster="nemo-run"), layout, None)
    assert described.startswith("probe: submitted 6 stage(s): NeMo-Run experiment probe_"), described
    return backend, layout


def processes_of(run_dir: Path) -> list[str]:
    listing = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if str(run_dir) in line and "ps -eww" not in line]


def test_the_smoke_study_on_the_local_executor_matches_the_local_run(nemorun_home, smoke_root, tmp_path):
    """The QAT baseline and bf16 chains (11 stages; the Slurm executor's test runs the bf16 chain)."""
    root = tmp_path / "runs"
    runs, stages = smoke_slice(TRIMMED_OUT)
    submitted = pipeline_cli("submit", "--cluster", "nemo-run", "-c", "smoke", "--root", str(root),
                             "--set", f"nemo_run.python={sys.executable}", *runs)
    assert submitted.returncode == 0, submitted.stderr
    assert f"submitted {stages} stage(s): NeMo-Run experiment smoke_" in submitted.stdout
    layout = RunLayout(root.resolve(), "smoke")
    found = wait_finished(layout, 1200)
    assert len(found) == stages
    assert {name: s.state for name, s in found.items()} == {name: StageState.SUCCEEDED for name in found}

    jobs = layout.read_jobs()  # one NeMo-Run experiment named after the run, a task per stage
    assert jobs["experiment_dir"].startswith(str(nemorun_home / "experiments" / "smoke" / "smoke_"))
    assert sorted(jobs["stages"]) == sorted(found)
    assert_same_losses(root, smoke_root)


def test_a_failed_stage_stops_its_dependents_at_their_gate(nemorun_home, tmp_path):
    backend, layout = submit_probe(tmp_path, fail="a")
    wait_finished(layout, 300)  # join reads as blocked as soon as a failed; its gate writes its marker later
    deadline = time.monotonic() + 120
    while not (layout.stage_dir("join") / "_FAILED").exists():
        assert time.monotonic() < deadline, "join's gate left no marker"
        time.sleep(0.5)
    found = statuses(layout)
    assert {name: s.state for name, s in found.items()} == {
        "source": StageState.SUCCEEDED, "a": StageState.FAILED, "b": StageState.SUCCEEDED,
        "c": StageState.SUCCEEDED, "d": StageState.SUCCEEDED, "join": StageState.BLOCKED}
    assert found["a"].note == "a: RuntimeError: probe asked to fail"
    assert found["join"].note == "join: upstream 'a' failed"
    assert not (layout.stage_dir("join") / "output.txt").exists()  # the join never ran
    record = read_record(layout)
    log = backend.logs(layout, record, "join")  # no stage.log: NeMo-Run's log of the task, the gate's words
    assert log.startswith("(no stage.log yet at ") and "upstream a failed: join will not run" in log
    assert "probe asked to fail" in backend.logs(layout, record, "a")
    deadline = time.monotonic() + 60
    while processes_of(layout.run_dir):  # experiment.py ends with its tasks
        assert time.monotonic() < deadline, processes_of(layout.run_dir)
        time.sleep(0.5)


def test_cancel_stops_the_experiment_and_its_tasks(nemorun_home, tmp_path):
    backend, layout = submit_probe(tmp_path, sleep_s=120)
    deadline = time.monotonic() + 120
    while statuses(layout)["source"].state != StageState.RUNNING:
        assert time.monotonic() < deadline, statuses(layout)
        time.sleep(0.5)
    assert processes_of(layout.run_dir)
    record = read_record(layout)
    stopped = backend.cancel(layout, record)
    assert stopped == ["source", "a", "b", "c", "d", "join"]
    found = statuses(layout)
    assert {name: s.state for name, s in found.items()} == {name: StageState.CANCELLED for name in stopped}
    time.sleep(1)
    assert processes_of(layout.run_dir) == []
    assert not any((layout.stage_dir(name) / "_SUCCESS").exists() for name in stopped)
    assert os.path.exists(layout.jobs_file)
