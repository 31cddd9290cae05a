"""The slurm backend against a real Slurm (one node, started by slurm/start-test-cluster.sh):
probe DAGs go through sbatch with afterok dependencies and end as they do locally."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract.params import ProbeParams
from pipeline.backends.base import StageState, StageStatus
from pipeline.backends.slurm import (
    SlurmBackend,
    queue_states,
)
from pipeline.backends.slurm_settings import SlurmSettings
from pipeline.errors import BackendError
from pipeline.graph import Graph, Stage
from pipeline.layout import RunLayout
from pipeline.plan import RunPlan
from pipeline.prepare import cached_stages
from pipeline.resources import Resources
from pipeline.run_record import read_record
from tests.k8s.dev_cluster import wait_for
from tests.pipeline.backends.slurm_test_cluster import (
    SlurmTestCluster,
    controller_running,
)
from tests.pipeline.probe_dag import RUN_ID, drive, fan_out_graph, plan

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def cancel_leftovers(tmp_path):
    """A test that fails midway leaves no job in the test cluster's queue."""
    yield
    for jobs_file in tmp_path.rglob("jobs.json"):
        layout = RunLayout(jobs_file.parent.parent, jobs_file.parent.name)
        if layout.run_file.exists() and read_record(layout).cluster == "slurm":
            cancel(layout)


@dataclass
class Submission:
    """A planned probe run and the Slurm backend that submits it (as `python -m pipeline submit`)."""

    plan: RunPlan
    layout: RunLayout
    backend: SlurmBackend

    def submit(self) -> str:
        return self.backend.submit(self.plan, self.layout, None)

    @property
    def to_run(self) -> list[str]:
        cached, _ = cached_stages(self.plan, self.layout)
        return [name for name in self.plan.names if name not in cached]


def prepare(graph: Graph, root: Path, **slurm: object) -> Submission:
    settings = SlurmSettings.model_validate({"python": sys.executable, "partition": "debug",
                                             "account": "studies", **slurm})
    return Submission(plan(graph, root, cluster="slurm"), RunLayout(root.resolve(), RUN_ID), SlurmBackend(settings))


def _backend(layout: RunLayout):
    record = read_record(layout)
    return SlurmBackend.for_record(record), record


def status(layout: RunLayout) -> list[StageStatus]:
    backend, record = _backend(layout)
    return backend.status(layout, record)


def cancel(layout: RunLayout) -> list[str]:
    backend, record = _backend(layout)
    return backend.cancel(layout, record)


def logs(layout: RunLayout, stage: str) -> str:
    backend, record = _backend(layout)
    return backend.logs(layout, record, stage)


def wait_finished(layout: RunLayout, timeout_s: float = 60) -> dict[str, StageState]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = status(layout)
        if all(status.state.finished for status in statuses):
            return {status.name: status.state for status in statuses}
        time.sleep(0.3)
    raise AssertionError(f"not finished in {timeout_s} s: {status(layout)}")


def wait_state(layout: RunLayout, stage: str, state: StageState, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if {s.name: s.state for s in status(layout)}[stage] == state:
            return
        time.sleep(0.2)
    raise AssertionError(f"{stage} never became {state.value}")


def outputs(root: Path, names: list[str]) -> dict[str, str]:
    return {name: (root / "probe" / name / "output.txt").read_text() for name in names}


def job_ids(layout: RunLayout) -> dict[str, str]:
    return {name: job["job_id"] for name, job in layout.read_jobs()["stages"].items() if "job_id" in job}


def _cluster_daemons() -> list[str]:
    """`pid name` of every process of the kinds the cluster script starts."""
    found = subprocess.run(["pgrep", "-l", "^(slurmctld|slurmd|slurmdbd|munged|mariadbd|mysqld|mysqld_safe)$"],
                           capture_output=True, text=True)
    return sorted(found.stdout.splitlines())


# First in this file, before a test takes the session's cluster: it needs the whole life of one.
def test_the_last_test_session_stops_the_cluster_tests_started_and_leaves_no_daemon(tmp_path):
    if controller_running():
        pytest.skip("a Slurm cluster is up already: this test must start and stop its own")
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("needs root and Slurm installed (the slurm_cluster fixture installs it)")
    before = _cluster_daemons()
    sessions = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]  # two live test sessions
    first, second = (SlurmTestCluster(SlurmTestCluster.default().state_dir, s.pid) for s in sessions)
    try:
        assert first.take() == second.take()  # the first starts it, the second finds it
        assert first.marker.exists() and first.users() == sorted(s.pid for s in sessions)
        assert not first.give_back() and controller_running()  # the second still uses it
        assert second.give_back()
        assert not controller_running() and not first.marker.exists()
        assert _cluster_daemons() == before  # all it started is stopped
    finally:
        for session in sessions:
            session.kill()
            session.wait()
        if SlurmTestCluster.default().marker.exists():  # a failure above: leave nothing running
            SlurmTestCluster(SlurmTestCluster.default().state_dir, sessions[0].pid).give_back()


def test_probe_dag_on_slurm_ends_like_a_local_run(slurm_cluster, tmp_path):
    graph = fan_out_graph(payloads={"join": "!"})
    local_states = drive(graph, tmp_path / "local")
    prepared = prepare(graph, tmp_path / "slurm")

    described = prepared.submit()

    assert described.startswith("probe: submitted 6 stage(s): slurm jobs ")
    states = wait_finished(prepared.layout)
    assert {name: state.value for name, state in states.items()} == local_states
    assert set(local_states.values()) == {"succeeded"}
    assert outputs(tmp_path / "slurm", graph.names) == outputs(tmp_path / "local", graph.names)
    assert outputs(tmp_path / "slurm", ["join"])["join"] == "sourceasourcebsourcecsourced!"
    assert "join: succeeded" in logs(prepared.layout, "join")

    # Submitting again finds every stage cached: nothing is queued, status says cached.
    again = prepare(graph, tmp_path / "slurm")
    assert again.to_run == []


def test_cached_stages_are_not_submitted_and_impose_no_dependency(slurm_cluster, tmp_path):
    graph = fan_out_graph()
    drive(graph, tmp_path)  # everything succeeds locally first
    (tmp_path / "probe" / "join" / "_SUCCESS").unlink()
    prepared = prepare(graph, tmp_path)
    assert prepared.to_run == ["join"]

    prepared.submit()

    states = wait_finished(prepared.layout)
    assert states["join"] == StageState.SUCCEEDED
    assert states["source"] == StageState.CACHED
    assert list(job_ids(prepared.layout)) == ["join"]
    script = (tmp_path / "probe" / "slurm" / "join.sbatch").read_text()
    assert "--dependency" not in script


def test_a_failing_stage_blocks_its_dependents_and_cancel_clears_them(slurm_cluster, tmp_path):
    graph = fan_out_graph(fail="b")
    local_states = drive(graph, tmp_path / "local")
    prepared = prepare(graph, tmp_path / "slurm")

    prepared.submit()
    states = wait_finished(prepared.layout)

    assert {name: state.value for name, state in states.items()} == local_states
    assert states["b"] == StageState.FAILED and states["join"] == StageState.BLOCKED
    statuses = {s.name: s for s in status(prepared.layout)}
    assert "probe asked to fail" in statuses["b"].note
    # Without kill_invalid_depend the blocked job stays in the queue until the run is cancelled.
    join_job = job_ids(prepared.layout)["join"]
    assert queue_states([join_job])[join_job].reason == "DependencyNeverSatisfied"

    assert cancel(prepared.layout) == ["join"]

    assert queue_states([join_job])[join_job].state == "CANCELLED"
    statuses = {s.name: s for s in status(prepared.layout)}
    assert statuses["join"].state == StageState.CANCELLED
    assert statuses["a"].state == StageState.SUCCEEDED


def test_scancel_mid_run_reports_cancelled_and_dependents_blocked(slurm_cluster, tmp_path):
    prepared = prepare(fan_out_graph(sleep_s=30), tmp_path)
    prepared.submit()
    wait_state(prepared.layout, "source", StageState.RUNNING)

    subprocess.run(["scancel", job_ids(prepared.layout)["source"]], check=True)

    states = wait_finished(prepared.layout)
    assert states["source"] == StageState.CANCELLED
    assert {states[name] for name in ("a", "b", "c", "d", "join")} == {StageState.BLOCKED}
    assert not (tmp_path / "probe" / "source" / "_SUCCESS").exists()
    assert sorted(cancel(prepared.layout)) == ["a", "b", "c", "d", "join"]


def test_sigusr1_checkpoints_requeues_and_the_stage_resumes(slurm_cluster, tmp_path):
    graph = Graph([Stage("slow", "probe", ProbeParams(sleep_s=4, payload="done"))])
    prepared = prepare(graph, tmp_path)
    prepared.submit()
    wait_state(prepared.layout, "slow", StageState.RUNNING)
    job = job_ids(prepared.layout)["slow"]
    time.sleep(1.0)  # let the stage install its signal handlers

    # What Slurm sends `signal_before_s` before the time limit (--signal=B:USR1@...).
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_state(prepared.layout, "slow", StageState.QUEUED)
    # Slurm holds a requeued job ~2 min (BeginTime); let it start sooner, but not within the
    # second of the requeue (slurmd would refuse the new launch: "Job credential revoked").
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)

    states = wait_finished(prepared.layout)
    assert states["slow"] == StageState.SUCCEEDED
    log = logs(prepared.layout, "slow")
    assert "SIGUSR1: asking the stage to checkpoint" in log
    assert "interrupted; outputs kept for resume" in log
    assert f"requeueing job {job}" in log
    assert "(restart 1)" in log
    assert (tmp_path / "probe" / "slow" / "output.txt").read_text() == "done"


def test_a_rejected_third_job_cancels_the_two_queued_before_it(slurm_cluster, tmp_path):
    too_big = Resources(memory_gb=64)  # the node has 20000 MB: Slurm rejects it at submission
    graph = Graph([
        Stage("source", "probe", ProbeParams(sleep_s=5)),
        Stage("a", "probe", ProbeParams(), {"in": "source"}),
        Stage("b", "probe", ProbeParams(), {"in": "source"}, resources=too_big),
        Stage("join", "probe", ProbeParams(), {"a": "a", "b": "b"}),
    ])
    prepared = prepare(graph, tmp_path)
    assert prepared.to_run[:3] == ["source", "a", "b"]

    with pytest.raises(BackendError) as error:
        prepared.submit()

    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("sbatch rejected stage b: ")
    assert "Requested node configuration is not available" in message
    assert message.endswith("cancelled the 2 job(s) queued before it")
    assert not prepared.layout.jobs_file.exists()
    def cancelled_jobs_gone() -> bool:
        names = subprocess.run(["squeue", "--noheader", "--format=%j"], capture_output=True, text=True).stdout.split()
        return "probe-source" not in names and "probe-a" not in names

    # A cancelled job that had started stays listed while it completes (state CG): wait that out.
    wait_for(cancelled_jobs_gone, 30, "the two cancelled jobs to leave the queue")


@pytest.mark.parametrize(("setting", "expected"), [
    ({"partition": "nosuch"}, "sbatch rejected stage source: sbatch: error: Batch job submission "
                              "failed: Invalid partition name specified"),
    ({"account": "nosuch"}, "sbatch rejected stage source: sbatch: error: Batch job submission "
                            "failed: Invalid account or account/partition combination specified"),
    ({"sbatch": "/opt/no-slurm/sbatch"}, "submit: '/opt/no-slurm/sbatch' not found on PATH; run this "
                                         "on a Slurm login node (or set slurm.sbatch to its full path)"),
])
def test_bad_placement_is_one_line_from_slurm_and_nothing_is_queued(
    slurm_cluster, tmp_path, setting, expected
):
    prepared = prepare(fan_out_graph(), tmp_path, **setting)
    with pytest.raises(BackendError) as error:
        prepared.submit()
    assert str(error.value) == expected
    assert not prepared.layout.jobs_file.exists()


def test_rendered_submit_sh_queues_the_run_by_hand(slurm_cluster, tmp_path):
    graph = fan_out_graph()
    prepared = prepare(graph, tmp_path / "root")

    written = prepared.backend.render(prepared.plan, prepared.layout, tmp_path / "out")

    assert [p.name for p in written] == [f"{name}.sbatch" for name in graph.names] + ["submit.sh", "run.json"]
    assert not (tmp_path / "root").exists()  # render writes its folder only; the scripts carry the specs
    done = subprocess.run([str(tmp_path / "out" / "submit.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("source: job ")
    # The script recorded the job ids: status from the CLI, in a new process, sees the run.
    states = wait_finished(prepared.layout)
    assert set(states.values()) == {StageState.SUCCEEDED}
    status = subprocess.run([sys.executable, "-m", "pipeline", "status", "probe", "--root",
                             str(tmp_path / "root")], capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("succeeded") == len(graph)


def test_rendered_submit_sh_cancels_what_it_queued_when_a_job_is_rejected(slurm_cluster, tmp_path):
    graph = Graph([Stage("source", "probe", ProbeParams(sleep_s=5)),
                   Stage("big", "probe", ProbeParams(), {"in": "source"}, resources=Resources(memory_gb=64))])
    prepared = prepare(graph, tmp_path / "root")
    prepared.backend.render(prepared.plan, prepared.layout, tmp_path / "out")

    submit_sh = str(tmp_path / "out" / "submit.sh")
    done = subprocess.run([submit_sh], capture_output=True, text=True, timeout=60)

    assert done.returncode != 0
    assert "submit.sh: a job was rejected; cancelled 1 queued job(s)" in done.stderr
    source_job = done.stdout.split()[-1]
    assert queue_states([source_job])[source_job].state == "CANCELLED"
    assert not prepared.layout.jobs_file.exists()


def test_cli_status_logs_and_cancel_work_from_a_new_shell(slurm_cluster, tmp_path):
    prepared = prepare(fan_out_graph(sleep_s=30), tmp_path)
    prepared.submit()
    wait_state(prepared.layout, "source", StageState.RUNNING)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", *args, "--root", str(tmp_path)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)

    assert "running" in cli("status", "probe").stdout
    with pytest.raises(BackendError, match="still has slurm jobs queued or running"):
        prepare(fan_out_graph(sleep_s=30), tmp_path).submit()  # no second copy
    assert "== job " in cli("logs", "probe", "source").stdout
    cancelled = cli("cancel", "probe")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == "probe: cancelled source, a, b, c, d, join"
    states = wait_finished(prepared.layout)
    assert set(states.values()) == {StageState.CANCELLED}
