"""Local backend: stages as subprocesses on this machine, driven by LocalDriver.

`run` drives in the foreground; `submit --cluster local` starts the same driver detached
(its output in `<run>/driver.log`) and returns. Status, logs and cancel work from any shell:
they read `<run>/jobs.json` and the markers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.backends.base import Backend, StageState, StageStatus, failure_note
from pipeline.layout import RunLayout
from pipeline.prepare import PreparedRun
from stages.contract import read_marker


def visible_gpu_ids() -> list[int]:
    """GPU ids this process may hand out, found without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(part) for part in visible.split(",") if part.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return list(range(sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))))


def default_max_parallel() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))


class LocalBackend(Backend):
    name = "local"

    def __init__(self, max_parallel: int | None = None, runtime: str = "process") -> None:
        self.max_parallel = max_parallel or default_max_parallel()
        self.runtime = runtime  # process | docker (pipeline/docker_runtime.py)

    def submit(self, prepared: PreparedRun) -> str:
        """Start a detached driver for this run and return at once."""
        layout = prepared.layout
        log_path = layout.run_dir / "driver.log"
        # The detached driver re-reads the resolved config that prepare wrote: same stages,
        # same fingerprints, nothing re-submitted that already succeeded.
        command = [sys.executable, "-m", "pipeline", "run", "-c", str(layout.config_path),
                   "--root", str(layout.root), "--run-id", layout.run_id,
                   "--max-parallel", str(self.max_parallel), "--plain", "--runtime", self.runtime]
        with log_path.open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        return f"driver pid {process.pid}; log {log_path}"

    def status(self, layout: RunLayout) -> list[StageStatus]:
        run = layout.read_run()
        jobs = layout.read_jobs().get("stages", {})
        driver_alive = _alive(layout.read_jobs().get("driver_pid"))
        statuses = []
        for name, info in run["stages"].items():
            job = jobs.get(name, {})
            marker = read_marker(layout.stage_dir(name))
            current = marker is not None and marker.fingerprint == info["fingerprint"]
            if current and marker.state == "succeeded":
                recorded = job.get("state")
                state = StageState.CACHED if recorded == "cached" else StageState.SUCCEEDED
            elif current:
                state = StageState.FAILED
            elif job.get("state") == "running" and driver_alive and _alive(_as_int(job.get("job_id"))):
                state = StageState.RUNNING
            elif job.get("state") in ("running", "interrupted"):
                state = StageState.INTERRUPTED
            elif job.get("state") == "blocked":
                state = StageState.BLOCKED
            else:
                state = StageState.PENDING
            note = failure_note(layout, name) if state == StageState.FAILED else job.get("note", "")
            statuses.append(StageStatus(name, info["kind"], state, note, job.get("job_id", ""),
                                        job.get("started_at"), job.get("finished_at")))
        return statuses

    def cancel(self, layout: RunLayout) -> list[str]:
        jobs = layout.read_jobs()
        driver = jobs.get("driver_pid")
        running = [name for name, job in jobs.get("stages", {}).items() if job.get("state") == "running"]
        if not _alive(driver):
            return []
        os.kill(driver, signal.SIGTERM)
        deadline = time.time() + 60
        while _alive(driver) and time.time() < deadline:
            time.sleep(0.2)
        return running


def _as_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive: it only waits to be reaped.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and ") Z" in stat.read_text())
