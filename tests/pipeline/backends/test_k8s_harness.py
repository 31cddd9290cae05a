"""The rendered Jobs of a probe DAG, executed as a kubelet would (tests/.../k8s_harness.py):
all Jobs start at once and the init containers alone order them through the markers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.markers import read_marker
from pipeline.backends.k8s_commands import (
    ATTEMPT_ENV,
    SPECS_MOUNT,
    Upstream,
    wait_script,
)
from pipeline.backends.k8s_render import render_objects
from pipeline.backends.k8s_settings import K8sSettings
from tests.pipeline.backends.k8s_harness import PodHarness
from tests.pipeline.probe_dag import IMAGES, fan_out_graph, plan

MOUNT = "/artifacts"


def run_on_harness(tmp_path: Path, graph, attempt: str = "a1") -> tuple[dict, Path]:
    settings = K8sSettings(tracking_uri=None, poll_seconds=1)
    planned = plan(graph, tmp_path / "submitter", cluster="k8s", stage_root=Path(MOUNT))
    objects = render_objects(graph, planned.specs, planned.fingerprints, IMAGES, settings, attempt)
    volume = tmp_path / "pvc"
    results = PodHarness(objects, volume, MOUNT).run(timeout_s=120)
    return {name.removeprefix("probe-"): r for name, r in results.items()}, volume / "probe"


def test_all_jobs_start_at_once_and_run_in_dag_order(tmp_path):
    results, run_dir = run_on_harness(tmp_path, fan_out_graph(sleep_s=0.5))
    assert {name: r.condition for name, r in results.items()} == dict.fromkeys(
        ["source", "a", "b", "c", "d", "join"], "Complete")
    assert (run_dir / "join" / "output.txt").read_text() == "sourceasourcebsourcecsourcedjoin"
    finished = {name: read_marker(run_dir / name).finished_at for name in results}
    assert all(finished[branch] > finished["source"] for branch in "abcd")
    assert finished["join"] > max(finished[branch] for branch in "abcd")
    assert "probe asked" not in (run_dir / "join" / "stage.log").read_text()
    assert "stages.probe --spec" in (run_dir / "join" / "stage.log").read_text()


def test_a_failed_upstream_fails_its_dependents_through_the_exit_code(tmp_path):
    results, run_dir = run_on_harness(tmp_path, fan_out_graph(fail="source"))
    assert results["source"].condition == "Failed"
    assert results["source"].reason == "BackoffLimitExceeded"
    assert read_marker(run_dir / "source").error == "source: RuntimeError: probe asked to fail"
    for name in ("a", "b", "c", "d", "join"):
        # join waits on a..d, whose waiters wrote _FAILED: the failure travels down the chain
        assert (results[name].condition, results[name].reason) == ("Failed", "PodFailurePolicy"), name
        assert results[name].exit_codes == [("wait-upstream", 42)]
        marker = read_marker(run_dir / name)
        assert marker.exit_code == 42 and "upstream" in marker.error
        assert not (run_dir / name / "output.txt").exists()


def test_the_waiter_ignores_a_failure_left_by_an_earlier_attempt(tmp_path):
    """An upstream `_FAILED` counts only once that upstream's `_ATTEMPT` is this submission's."""
    up = tmp_path / "up"
    up.mkdir()
    (up / "_FAILED").write_text('{"state":"failed","fingerprint":"f1","finished_at":1,"host":"h"}')
    (up / "_ATTEMPT").write_text("old\n")
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "down.json").write_text("{}")
    script = wait_script("down", str(tmp_path / "down"), "f2", [Upstream("up", str(up), "f1")], 1)
    script = script.replace(SPECS_MOUNT, str(specs))
    env = {"PATH": "/usr/bin:/bin", "HOSTNAME": "pod", ATTEMPT_ENV: "new"}
    waiter = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(2.5)
    assert waiter.poll() is None  # still waiting: the failure is stale
    (up / "_SUCCESS").write_text('{"state":"succeeded","fingerprint":"f1","finished_at":2,"host":"h"}')
    assert waiter.wait(timeout=10) == 0
    assert "upstream up succeeded" in waiter.stdout.read()
    assert (tmp_path / "down" / "_ATTEMPT").read_text() == "new\n"


# The harness starts every Job at once; 28 real stages at once take ~5 min on 2 cores, so by
# default the smoke study runs with its QAT baseline and bf16 runs (tests.smoke.TRIMMED_OUT).


def test_the_smoke_study_completes_on_the_harness(tmp_path, smoke_root):
    """The real stages (CPU, tiny model) as rendered Jobs, all started at once, in DAG order,
    with the same numbers as the local run of the same study."""
    from pipeline.backends.k8s import K8sBackend
    from pipeline.loader import load_config
    from pipeline.plan import plan_run
    from tests.smoke import TRIMMED_OUT, report_rows

    overrides = ["k8s.tracking_uri=null", "k8s.poll_seconds=1"]
    if not os.environ.get("FASTER_QAT_SLOW_TESTS"):
        overrides += [f"runs.{run}.enabled=false" for run in TRIMMED_OUT]
    loaded = load_config("smoke", overrides)
    backend = K8sBackend(loaded.config.k8s, api=object())  # type: ignore[arg-type]
    planned = plan_run(loaded.config, "smoke", Path(MOUNT), None, "k8s")
    graph = planned.graph
    objects = backend.objects(planned, planned.names, "a1")
    results = PodHarness(objects, tmp_path / "pvc", MOUNT).run(timeout_s=900)
    assert {r.condition for r in results.values()} == {"Complete"}, {
        n: (r.reason, r.exit_codes) for n, r in results.items() if r.condition != "Complete"}
    run_dir = tmp_path / "pvc" / "smoke"
    finished = {stage.name: read_marker(run_dir / stage.name).finished_at for stage in graph}
    for stage in graph:
        assert all(finished[stage.name] > finished[up] for up in stage.dependencies), stage.name
    on_harness, local = report_rows(tmp_path / "pvc"), report_rows(smoke_root)
    assert on_harness and set(on_harness) <= set(local)
    for key, row in on_harness.items():  # seeded, deterministic on CPU: the local run's losses
        assert float(row["val_loss"]) == pytest.approx(float(local[key]["val_loss"]), rel=1e-9), key


def test_a_stage_killed_without_a_marker_is_marked_failed_but_an_interrupted_one_is_not(tmp_path):
    from contract.markers import mark_succeeded
    from contract.params import ProbeParams
    from contract.spec import StageSpec, write_spec

    def mark(stage: str, code: int) -> None:
        spec = StageSpec(run_id="r", stage=stage, kind="probe", fingerprint="f1", output_dir=tmp_path / stage,
                         params=ProbeParams())
        path = write_spec(spec)
        subprocess.run([sys.executable, "-m", "stages.mark_failed", "--spec", str(path),
                        "--exit-code", str(code)], check=True, timeout=60)

    mark("oom", 137)
    marker = read_marker(tmp_path / "oom")
    assert (marker.state, marker.exit_code) == ("failed", 137)
    assert "exited with code 137 without a marker" in marker.error
    mark("interrupted", 143)  # SIGTERM: the stage checkpointed; the retried pod resumes it
    assert read_marker(tmp_path / "interrupted") is None
    (tmp_path / "done").mkdir()
    mark_succeeded(tmp_path / "done", "f1")
    mark("done", 1)  # the stage's own verdict wins
    assert read_marker(tmp_path / "done").state == "succeeded"
