"""The local backend on a DAG of probe stages: real processes, markers and logs.

The tests about processes (failure, signals, kill -9) run with both local launchers: `process`
(the default: CPU stages forked from the preloaded launcher) and `fresh-process`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.markers import read_marker
from pipeline.layout import RunLayout
from pipeline.prepare import rerun_lines
from pipeline.processes import process_alive
from tests.pipeline.probe_dag import drive, fan_out_graph, prepare

REPO = Path(__file__).resolve().parents[2]
RUNTIMES = pytest.mark.parametrize("runtime", ["process", "fresh-process"])
FORKED = "(forked by the preloaded launcher"


def output(root: Path, stage: str) -> str:
    return (root / "probe" / stage / "output.txt").read_text()


def test_fan_out_runs_concurrently_and_join_sees_every_branch(tmp_path):
    states = drive(fan_out_graph(sleep_s=1.5), tmp_path, max_parallel=4)
    assert set(states.values()) == {"succeeded"}
    assert output(tmp_path, "join") == "sourceasourcebsourcecsourcedjoin"
    # The four branches overlap: the last one starts before the first one ends.
    jobs = json.loads((tmp_path / "probe" / "jobs.json").read_text())["stages"]
    starts = [jobs[name]["started_at"] for name in "abcd"]
    ends = [jobs[name]["finished_at"] for name in "abcd"]
    assert max(starts) < min(ends)


def test_max_parallel_one_serialises_the_branches(tmp_path):
    drive(fan_out_graph(sleep_s=0.3), tmp_path, max_parallel=1)
    jobs = json.loads((tmp_path / "probe" / "jobs.json").read_text())["stages"]
    spans = sorted((jobs[n]["started_at"], jobs[n]["finished_at"]) for n in "abcd")
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.05


@RUNTIMES
def test_a_failed_stage_blocks_only_its_dependents(tmp_path, runtime):
    states = drive(fan_out_graph(fail="b"), tmp_path, runtime=runtime)
    assert states == {"source": "succeeded", "a": "succeeded", "b": "failed", "c": "succeeded",
                      "d": "succeeded", "join": "blocked"}
    marker = read_marker(tmp_path / "probe" / "b")
    assert marker.state == "failed"
    assert marker.error == "b: RuntimeError: probe asked to fail"
    log = (tmp_path / "probe" / "b" / "stage.log").read_text()
    assert "probe asked to fail" in log
    assert (FORKED in log) == (runtime == "process")
    assert read_marker(tmp_path / "probe" / "join") is None
    assert not (tmp_path / "probe" / "join" / "output.txt").exists()


def test_rerun_skips_succeeded_stages_and_a_param_change_reruns_only_dependents(tmp_path):
    drive(fan_out_graph(), tmp_path)
    assert prepare(fan_out_graph(), tmp_path).to_run == []
    changed = prepare(fan_out_graph(payloads={"b": "B"}), tmp_path)
    assert changed.to_run == ["b", "join"]
    drive(fan_out_graph(payloads={"b": "B"}), tmp_path)
    assert output(tmp_path, "join") == "sourceasourceBsourcecsourcedjoin"


def test_a_failed_stage_reruns_after_the_fix_and_the_rest_stays_cached(tmp_path):
    drive(fan_out_graph(fail="b"), tmp_path)
    fixed = prepare(fan_out_graph(), tmp_path)
    assert fixed.to_run == ["b", "join"]


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _driver(root: Path, *args: str, runtime: str = "process") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.pipeline.probe_dag", str(root), *args, "--runtime", runtime],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)



def _running_pids(root: Path) -> list[int]:
    jobs = json.loads((root / "probe" / "jobs.json").read_text())["stages"]
    return [int(job["job_id"]) for job in jobs.values() if job["state"] == "running"]


def _running_names(root: Path) -> list[str]:
    jobs = json.loads((root / "probe" / "jobs.json").read_text())["stages"]
    return [name for name, job in jobs.items() if job["state"] == "running"]


def _launcher_pid(root: Path) -> int:
    """The preloaded launcher's pid, from the first line of its log."""
    first = (root / "probe" / "preload.log").read_text().splitlines()[0]  # "preload: pid N, kinds ..."
    return int(first.split()[2].rstrip(","))


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


@RUNTIMES
def test_sigterm_stops_children_and_the_next_run_resumes(tmp_path, runtime):
    driver = _driver(tmp_path, "--sleep", "30", runtime=runtime)
    # at work: its signal handlers are in place (they come before its first tracking event)
    _wait_for(lambda: (tmp_path / "probe" / "source" / "tracking" / "events.jsonl").exists())
    children = _running_pids(tmp_path)
    for pid in children:  # each stage leads its own session and process group: signals reach all of it
        assert os.getpgid(pid) == os.getsid(pid) == pid
    if runtime == "process":  # forked by the preloaded launcher, which the driver started
        launcher = _launcher_pid(tmp_path)
        assert {_parent_pid(pid) for pid in children} == {launcher} and _parent_pid(launcher) == driver.pid
        assert FORKED in (tmp_path / "probe" / "source" / "stage.log").read_text()
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=30)
    assert "source=interrupted" in out
    assert not any(process_alive(pid) for pid in children)
    assert read_marker(tmp_path / "probe" / "source") is None  # no marker: resumable
    assert "source: interrupted; outputs kept for resume" in (tmp_path / "probe" / "source" / "stage.log").read_text()
    if runtime == "process":
        assert not process_alive(launcher)
    states = drive(fan_out_graph(), tmp_path, runtime=runtime)
    assert set(states.values()) == {"succeeded"}


@RUNTIMES
def test_kill_9_of_the_driver_leaves_no_orphan_and_the_next_run_completes(tmp_path, runtime):
    driver = _driver(tmp_path, "--sleep", "30", runtime=runtime)
    _wait_for(lambda: (tmp_path / "probe" / "jobs.json").exists() and _running_pids(tmp_path))
    children = _running_pids(tmp_path) + ([_launcher_pid(tmp_path)] if runtime == "process" else [])
    driver.kill()
    driver.wait()
    _wait_for(lambda: not any(process_alive(pid) for pid in children), timeout=10)
    assert set(drive(fan_out_graph(), tmp_path, runtime=runtime).values()) == {"succeeded"}


@RUNTIMES
def test_kill_9_of_a_stage_fails_it_and_the_next_run_reruns_it(tmp_path, runtime):
    driver = _driver(tmp_path, "--sleep", "2", runtime=runtime)
    _wait_for(lambda: (tmp_path / "probe" / "jobs.json").exists() and _running_pids(tmp_path))
    os.kill(_running_pids(tmp_path)[0], signal.SIGKILL)
    out, _ = driver.communicate(timeout=60)
    assert "source=failed" in out and "join=blocked" in out
    assert read_marker(tmp_path / "probe" / "source").error == "source: exited with code -9 without writing a marker"
    # Same config, same fingerprints: the failed stage reruns in its kept folder.
    assert prepare(fan_out_graph(sleep_s=2), tmp_path).to_run == ["source", "a", "b", "c", "d", "join"]
    assert set(drive(fan_out_graph(sleep_s=2), tmp_path, runtime=runtime).values()) == {"succeeded"}


def test_kill_9_of_the_preloaded_launcher_fails_its_stage_and_the_rest_start_fresh(tmp_path):
    """What the launcher ran dies with it and fails (no orphan, the next run reruns it); the
    stages after it start as fresh processes, and the driver says so, in its output and in
    the log of the first such stage."""
    driver = _driver(tmp_path, "--sleep", "2", "--max-parallel", "1")
    _wait_for(lambda: (tmp_path / "probe" / "jobs.json").exists() and "a" in _running_names(tmp_path))
    running = _running_pids(tmp_path)
    os.kill(_launcher_pid(tmp_path), signal.SIGKILL)
    out, _ = driver.communicate(timeout=120)
    assert not any(process_alive(pid) for pid in running)
    assert "source=succeeded a=failed b=succeeded c=succeeded d=succeeded join=blocked" in out
    assert read_marker(tmp_path / "probe" / "a").error == "a: exited with code -9 without writing a marker"
    assert "warning: the preloaded launcher (pid" in out and "(killed by signal 9)" in out
    logs = {name: (tmp_path / "probe" / name / "stage.log").read_text() for name in "bcd"}
    assert "start as fresh processes" in logs["b"]  # the first stage after it says why
    assert all(FORKED not in log and "-m stages.probe --spec" in log for log in logs.values())
    assert set(drive(fan_out_graph(sleep_s=2), tmp_path).values()) == {"succeeded", "cached"}


def _environment_of(pid: int) -> dict[str, str]:
    """What the process was started with (/proc/PID/environ)."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if entry)


def test_idle_openmp_threads_of_cpu_stages_sleep_unless_the_user_says_otherwise(tmp_path):
    for root, policy in ((tmp_path / "default", None), (tmp_path / "set", "ACTIVE")):
        env = {**os.environ, "OMP_WAIT_POLICY": policy} if policy else {
            name: value for name, value in os.environ.items() if name != "OMP_WAIT_POLICY"}
        driver = subprocess.Popen([sys.executable, "-m", "tests.pipeline.probe_dag", str(root), "--sleep", "30"],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            _wait_for(lambda: (root / "probe" / "jobs.json").exists() and _running_pids(root))
            seen = _environment_of(_running_pids(root)[0])
        finally:
            driver.terminate()
            driver.communicate(timeout=60)
        assert seen["CUDA_VISIBLE_DEVICES"] == ""
        assert seen["OMP_WAIT_POLICY"] == (policy or "PASSIVE")

def test_a_second_driver_of_the_same_run_is_refused(tmp_path):
    driver = _driver(tmp_path, "--sleep", "30")
    _wait_for(lambda: (tmp_path / "probe" / "jobs.json").exists())
    try:
        try:
            drive(fan_out_graph(sleep_s=30), tmp_path)
            raise AssertionError("a second driver ran")
        except Exception as error:
            assert "already being run by pid" in str(error)
    finally:
        driver.terminate()
        driver.communicate(timeout=30)
    assert RunLayout(tmp_path, "probe").run_dir.exists()


def _prepared_files(run_dir: Path) -> dict[str, bytes]:
    """What `prepare` writes: the run record and every stage's spec."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in [run_dir / "run.json", *run_dir.glob("*/spec.json")]}


def test_a_refused_second_run_with_a_changed_setting_changes_nothing(tmp_path):
    """The lock comes first: a second run of the same run id (here with a changed payload, so other
    fingerprints) is refused before it reads, moves or writes anything; the first run finishes
    as a run left alone does."""
    driver = _driver(tmp_path, "--sleep", "3")
    _wait_for(lambda: (tmp_path / "probe" / "jobs.json").exists() and _running_pids(tmp_path))
    before = _prepared_files(tmp_path / "probe")
    try:
        drive(fan_out_graph(sleep_s=3, payloads={"source": "changed"}), tmp_path)
        raise AssertionError("a second driver ran")
    except Exception as error:
        assert "already being run by pid" in str(error) and "nothing was changed" in str(error)
    assert _prepared_files(tmp_path / "probe") == before
    assert not (tmp_path / "probe" / ".trash").exists()  # no stage dir was moved aside
    out, _ = driver.communicate(timeout=120)
    assert out.count("=succeeded") == 6, out
    alone = tmp_path / "alone"
    drive(fan_out_graph(sleep_s=0), alone)
    assert output(tmp_path, "join") == output(alone, "join")


def _tree(run_dir: Path) -> dict[str, bytes | None]:
    """Every path under the run (folders as None, files by content), but the run lock's file."""
    return {str(p.relative_to(run_dir)): None if p.is_dir() else p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.name != ".lock"}


def test_a_submit_the_backend_refuses_changes_nothing_under_the_run(tmp_path):
    """After a run with a failed stage and a success whose output is gone, a submit with a changed
    setting would set stale stage dirs aside, clear old markers and write new specs; the backend's
    apply refuses, and every file and folder under the run is as it was."""
    from pipeline.backends.local import LocalBackend, LocalSettings
    from pipeline.errors import BackendError
    from tests.pipeline.probe_dag import RUN_ID, plan

    class RefusingBackend(LocalBackend):
        def apply(self, prepared, lock_fd):
            assert (prepared.layout.run_dir / ".trash").is_dir()  # prepared: stale dirs set aside
            raise BackendError("the scheduler refused the jobs")

    drive(fan_out_graph(fail="b"), tmp_path)
    (tmp_path / "probe" / "c" / "output.txt").unlink()
    run_dir = tmp_path / "probe"
    before = _tree(run_dir)
    layout = RunLayout(tmp_path.resolve(), RUN_ID)
    with pytest.raises(BackendError, match="refused"):
        RefusingBackend(LocalSettings()).submit(plan(fan_out_graph(payloads={"a": "changed"}), tmp_path), layout, "x: 1\n")
    assert _tree(run_dir) == before

    class TakingBackend(LocalBackend):
        def apply(self, prepared, lock_fd):
            return "taken"

    TakingBackend(LocalSettings()).submit(plan(fan_out_graph(payloads={"a": "changed"}), tmp_path), layout, None)
    assert not any((run_dir / ".trash").iterdir())  # taken: what was set aside is deleted
    assert read_marker(run_dir / "a") is None and read_marker(run_dir / "b") is None


def test_a_deleted_or_cut_output_reruns_its_stage_and_dependents(tmp_path):
    drive(fan_out_graph(), tmp_path)
    (tmp_path / "probe" / "b" / "output.txt").unlink()
    prepared = prepare(fan_out_graph(), tmp_path)
    assert prepared.to_run == ["b", "join"]
    assert prepared.reasons == {"b": "output output.txt is missing", "join": "upstream b runs again"}
    assert rerun_lines(prepared.reasons) == ["b: runs again: its output output.txt is missing",
                                             "run again as their upstream does: join (after b)"]
    assert set(drive(fan_out_graph(), tmp_path).values()) == {"succeeded", "cached"}
    assert output(tmp_path, "join") == "sourceasourcebsourcecsourcedjoin"

    (tmp_path / "probe" / "source" / "output.txt").write_text("sou")  # cut short
    assert prepare(fan_out_graph(), tmp_path).to_run == ["source", "a", "b", "c", "d", "join"]


def test_run_says_why_each_stage_that_ran_before_runs_again(tmp_path):
    """A changed parameter and a failure each have their line; a stage never run before (join, blocked
    by b's failure) has none. (Successes that rerun only because an upstream's output no longer
    verifies share one line: test_a_deleted_or_cut_output_reruns_its_stage_and_dependents.)"""
    drive(fan_out_graph(fail="b"), tmp_path)  # join is blocked: never run
    prepared = prepare(fan_out_graph(fail="b", payloads={"a": "changed"}), tmp_path)
    assert prepared.to_run == ["a", "b", "join"]
    assert prepared.reasons == {"a": "its inputs or parameters changed", "b": "failed", "join": "not run"}
    assert rerun_lines(prepared.reasons) == ["a: runs again: its inputs or parameters changed",
                                             "b: runs again: it failed before"]
    drive(fan_out_graph(), tmp_path)
    prepared = prepare(fan_out_graph(payloads={"source": "again"}), tmp_path)
    # An upstream's fingerprint is one of a stage's inputs: a changed source changes every fingerprint.
    assert rerun_lines(prepared.reasons) == [f"{name}: runs again: its inputs or parameters changed"
                                             for name in ("source", "a", "b", "c", "d", "join")]


def test_status_says_a_success_whose_output_is_gone_runs_again_with_its_dependents(tmp_path):
    from pipeline.backends.local import LocalBackend
    from pipeline.run_record import read_record

    drive(fan_out_graph(), tmp_path)
    (tmp_path / "probe" / "b" / "output.txt").unlink()
    layout = RunLayout(tmp_path.resolve(), "probe")
    record = read_record(layout)
    statuses = {s.name: s for s in LocalBackend.for_record(record).status(layout, record)}
    assert {name: s.state.value for name, s in statuses.items()} == {
        "source": "succeeded", "a": "succeeded", "b": "pending", "c": "succeeded", "d": "succeeded",
        "join": "pending"}
    assert statuses["b"].note == "output output.txt is missing: the next run reruns it"
    assert statuses["join"].note == "upstream b runs again"


def test_verify_hashes_every_output_even_when_size_and_mtime_are_kept(tmp_path):
    drive(fan_out_graph(), tmp_path)
    target = tmp_path / "probe" / "c" / "output.txt"
    stat = target.stat()
    target.write_text("sourceX")  # same size as "sourcec"
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: only the content differs
    assert prepare(fan_out_graph(), tmp_path).to_run == []  # the quick check trusts size and mtime
    verified = subprocess.run([sys.executable, "-m", "pipeline", "verify", "probe", "--root", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert verified.returncode == 1
    assert "c: output output.txt changed (content hash differs)" in verified.stdout
