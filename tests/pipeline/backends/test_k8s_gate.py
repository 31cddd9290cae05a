"""What the k8s Jobs run around a stage, offline: the init container's wait for upstream markers
(a shell script, run here with `sh`) and the marker a stage killed without one gets."""

from __future__ import annotations

import subprocess
import sys
import time

from contract.markers import read_marker
from pipeline.backends.k8s_commands import (
    ATTEMPT_ENV,
    SPECS_MOUNT,
    Upstream,
    wait_script,
)


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


def test_a_stage_killed_without_a_marker_is_marked_failed_but_an_interrupted_one_is_not(tmp_path):
    from contract.markers import mark_succeeded
    from contract.params import ProbeParams
    from contract.spec import StageSpec, write_spec

    def mark(stage: str, code: int) -> None:
        spec = StageSpec(run_id="r", stage=stage, kind="probe", fingerprint="f1", output_dir=tmp_path / stage,
                         params=ProbeParams())
        path = write_spec(spec)
        subprocess.run([sys.executable, "-m", "stages.mark_failed", "--spec", str(path), "--exit-code", str(code),
                        "--message-file", str(tmp_path / f"{stage}.message")], check=True, timeout=60)

    mark("oom", 137)
    marker = read_marker(tmp_path / "oom")
    assert (marker.state, marker.exit_code) == ("failed", 137)
    assert "exited with code 137 without a marker" in marker.error
    assert (tmp_path / "oom.message").read_text() == marker.error  # the pod's termination message
    mark("interrupted", 143)  # SIGTERM: the stage checkpointed; the retried pod resumes it
    assert read_marker(tmp_path / "interrupted") is None
    (tmp_path / "done").mkdir()
    mark_succeeded(tmp_path / "done", "f1")
    mark("done", 1)  # the stage's own verdict wins
    assert read_marker(tmp_path / "done").state == "succeeded"
