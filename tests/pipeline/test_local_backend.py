"""The local backend on a DAG of probe stages: real subprocesses, markers and logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from contract.markers import read_marker
from pipeline.layout import RunLayout
from tests.pipeline.probe_dag import drive, fan_out_graph, prepare

REPO = Path(__file__).resolve().parents[2]


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


def test_a_failed_stage_blocks_only_its_dependents(tmp_path):
    states = drive(fan_out_graph(fail="b"), tmp_path)
    assert states == {"source": "succeeded", "a": "succeeded", "b": "failed", "c": "succeeded",
                      "d": "succeeded", "join": "blocked"}
    marker = read_marker(tmp_path / "probe" / "b")
    assert marker.state == "failed"
    assert marker.error == "b: RuntimeError: probe asked to fail"
    assert "probe asked to fail" in (tmp_path / "probe" / "b" / "stage.log").read_text()
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


def _driver(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.pipeline.probe_dag", str(root), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z" not in stat.read_text()


def _running_pids(root: Path) -> list[int]:
    jobs = json.loads((root / "probe" / "jobs.json").read_text())["stages"]
    return [int(job["job_id"]) for job in jobs.values() if job["state"] == "running"]


def test_sigterm_stops_children_and_the_next_run_resumes(tmp_path):
    driver = _driver(tmp_path, "--sleep", "30")
    _wait_for(lambda: (tmp_path / "probe" / "jobs.json").exists() and _running_pids(tmp_path))
    children = _running_pids(tmp_path)
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=30)
    assert "source=interrupted" in out
    assert not any(_alive(pid) for pid in children)
    assert read_marker(tmp_path / "probe" / "source") is None  # no marker: resumable
    states = drive(fan_out_graph(), tmp_path)
    assert set(states.values()) == {"succeeded"}


def test_kill_9_of_the_driver_leaves_no_orphan_and_the_next_run_completes(tmp_path):
    driver = _driver(tmp_path, "--sleep", "30")
    _wait_for(lambda: (tmp_path / "probe" / "jobs.json").exists() and _running_pids(tmp_path))
    children = _running_pids(tmp_path)
    driver.kill()
    driver.wait()
    _wait_for(lambda: not any(_alive(pid) for pid in children), timeout=10)
    assert set(drive(fan_out_graph(), tmp_path).values()) == {"succeeded"}


def test_kill_9_of_a_stage_fails_it_and_the_next_run_reruns_it(tmp_path):
    driver = _driver(tmp_path, "--sleep", "2")
    _wait_for(lambda: (tmp_path / "probe" / "jobs.json").exists() and _running_pids(tmp_path))
    os.kill(_running_pids(tmp_path)[0], signal.SIGKILL)
    out, _ = driver.communicate(timeout=60)
    assert "source=failed" in out and "join=blocked" in out
    assert read_marker(tmp_path / "probe" / "source").error == "source: exited with code -9 without writing a marker"
    # Same config, same fingerprints: the failed stage reruns in its kept folder.
    assert prepare(fan_out_graph(sleep_s=2), tmp_path).to_run == ["source", "a", "b", "c", "d", "join"]
    assert set(drive(fan_out_graph(sleep_s=2), tmp_path).values()) == {"succeeded"}


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


def test_a_deleted_or_cut_output_reruns_its_stage_and_dependents(tmp_path):
    drive(fan_out_graph(), tmp_path)
    (tmp_path / "probe" / "b" / "output.txt").unlink()
    prepared = prepare(fan_out_graph(), tmp_path)
    assert prepared.to_run == ["b", "join"]
    assert prepared.reasons == {"b": "output output.txt is missing", "join": "upstream b runs again"}
    assert set(drive(fan_out_graph(), tmp_path).values()) == {"succeeded", "cached"}
    assert output(tmp_path, "join") == "sourceasourcebsourcecsourcedjoin"

    (tmp_path / "probe" / "source" / "output.txt").write_text("sou")  # cut short
    assert prepare(fan_out_graph(), tmp_path).to_run == ["source", "a", "b", "c", "d", "join"]


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
