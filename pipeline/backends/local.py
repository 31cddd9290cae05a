"""Local backend: stages as processes on this machine, driven by LocalDriver (started as
local_launch.py says: forked from a preloaded launcher, fresh, or in containers).

`run` drives in the foreground; `submit --cluster local` hands the prepared run and its lock to a
detached driver (`python -m pipeline.backends.local_driver`, output in `<run>/driver.log`) and
returns: the run is prepared once. Status, logs and cancel work from any shell: they read
`<run>/jobs.json` and the markers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable

from contract.spec import TrackingRef
from pipeline.backends.base import Backend, StageState, StageStatus
from pipeline.backends.local_driver import LOCK_FD_ENV, LocalDriver
from pipeline.backends.local_launch import StageLauncher, launcher_for
from pipeline.backends.local_settings import LocalSettings
from pipeline.layout import RunLayout
from pipeline.prepare import PreparedRun
from pipeline.processes import process_alive, terminate_and_wait
from pipeline.run_record import RunRecord


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


def driver_for(layout: RunLayout, record: RunRecord, settings: LocalSettings,
               on_change: Callable[[list[StageStatus]], None]) -> LocalDriver:
    """The driver of a prepared run, with the launcher its runtime needs (checked first)."""
    if settings.runtime == "docker":
        from pipeline.docker_runtime import DockerLauncher

        launcher: StageLauncher = DockerLauncher(settings.docker_network)
        launcher.check(record)
    else:
        launcher = launcher_for(settings.runtime)
    return LocalDriver(layout, record, settings, visible_gpu_ids(), on_change=on_change, launcher=launcher)


class LocalBackend(Backend[LocalSettings]):
    name = "local"
    Settings = LocalSettings

    @classmethod
    def settings_from(cls, config, options: dict) -> LocalSettings:
        chosen = {key: value for key, value in options.items() if value is not None}
        return LocalSettings(docker_network=config.images.network, timing=config.report.timing, **chosen)

    def tracking(self, config, layout: RunLayout) -> TrackingRef | None:
        from pipeline.tracking import study_tracking

        # One process per stage attempt (the run lock), and the driver makes the parent run first.
        return study_tracking(config, layout.root, layout.run_id, settle_s=0.0)

    def apply(self, prepared: PreparedRun, lock_fd: int) -> str:
        """Start a detached driver for the prepared run; it takes over the run lock."""
        layout = prepared.layout
        log_path = layout.run_dir / "driver.log"
        command = [sys.executable, "-m", "pipeline.backends.local_driver", str(layout.run_dir)]
        with log_path.open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, pass_fds=(lock_fd,),
                                       env={**os.environ, LOCK_FD_ENV: str(lock_fd)})
        return f"driver pid {process.pid}; log {log_path}"

    def live_states(self, layout: RunLayout, record: RunRecord) -> dict[str, StageStatus]:
        jobs = layout.read_jobs()
        driver_alive = process_alive(jobs.get("driver_pid"))
        found = {}
        for name, info in record.stages.items():
            job = jobs.get("stages", {}).get(name, {})
            recorded = job.get("state")
            if recorded == "cached":
                state = StageState.CACHED
            elif recorded == "running" and driver_alive and process_alive(_as_int(job.get("job_id"))):
                state = StageState.RUNNING
            elif recorded in ("running", "interrupted"):
                state = StageState.INTERRUPTED
            elif recorded == "blocked":
                state = StageState.BLOCKED
            elif recorded == "failed":
                state = StageState.FAILED
            else:
                state = StageState.PENDING
            found[name] = StageStatus(name, info.kind, state, job.get("note", ""), job.get("job_id", ""),
                                      job.get("started_at"), job.get("finished_at"))
        return found

    def cancel(self, layout: RunLayout, record: RunRecord) -> list[str]:
        jobs = layout.read_jobs()
        driver = jobs.get("driver_pid")
        running = [name for name, job in jobs.get("stages", {}).items() if job.get("state") == "running"]
        if not process_alive(driver):
            return []
        terminate_and_wait(driver)
        return running


def _as_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
