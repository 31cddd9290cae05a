"""NeMo-Run backend (optional extra `.[nemo]`): the run as one run.Experiment named after it, one
run.Script task per stage, on the executor the config names (`nemo_run.executor: local | slurm`).

- `render` writes `<stage>.sh` per stage, `experiment.py` (the Experiment) and `run.json`: pure,
  no NeMo-Run import. `submit` writes the same files to `<run>/nemo-run/` and runs experiment.py:
  on Slurm it sbatches every task (the executor's dependencies order them) and returns; the local
  executor's tasks live as long as experiment.py, so it runs detached (holding the run lock, its
  output in `<run>/nemo-run/driver.log`) and submit returns once every task is launched.
- Order where the executor has no dependencies (local): each task first passes the upstream gate
  (stage_gate.py, the one k8s runs), so a failure stops its dependents with exit 42.
- `status`: markers first; NeMo-Run's own view of the experiment (`Experiment.from_id(...)
  .status()`) for queued, running, cancelled. `logs`: stage.log, else the task's NeMo-Run log.
  `cancel`: Slurm tasks through NeMo-Run (scancel); local tasks by stopping experiment.py, which
  cancels them through NeMo-Run first. experiment.py records the experiment in `<run>/jobs.json`.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from contract.files import write_atomic
from pipeline.backends.base import Backend, StageState, StageStatus, marker_state
from pipeline.backends.nemo_render import EXPERIMENT_FILE, rendered_files
from pipeline.backends.nemo_session import (
    LIVE,
    TaskState,
    cancel_tasks,
    require_nemo_run,
    task_states,
)
from pipeline.backends.nemo_settings import NemoRunSettings
from pipeline.errors import BackendError
from pipeline.layout import RunLayout
from pipeline.plan import RunPlan
from pipeline.prepare import PreparedRun, run_record
from pipeline.processes import process_alive, terminate_and_wait
from pipeline.run_record import RunRecord, write_record

FOLDER = "nemo-run"
DRIVER_LOG = "driver.log"
LAUNCH_TIMEOUT_S = 600.0
_OPEN = (StageState.RUNNING, StageState.QUEUED, StageState.PENDING, StageState.BLOCKED)


class NemoRunBackend(Backend[NemoRunSettings]):
    name = "nemo-run"
    Settings = NemoRunSettings
    renderable = True

    @property
    def nemo(self) -> NemoRunSettings:
        assert isinstance(self.settings, NemoRunSettings)
        return self.settings

    @classmethod
    def settings_from(cls, config: Any, options: dict[str, Any]) -> NemoRunSettings:
        return getattr(config, "nemo_run", None) or NemoRunSettings()

    # ---- files and submission -------------------------------------------------------------
    def render(self, plan: RunPlan, layout: RunLayout, output_dir: Path) -> list[Path]:
        """`<stage>.sh` for every stage, `experiment.py` and `run.json`; starts nothing."""
        record = run_record(plan, self.name, self.nemo.model_dump(mode="json"), created_at=None)
        paths = self._write(plan, plan.names, layout, output_dir)
        write_record(output_dir / "run.json", record)
        return [*paths, output_dir / "run.json"]

    def submit(self, plan: RunPlan, layout: RunLayout, config_yaml: str | None) -> str:
        require_nemo_run()  # before the lock: without the extra nothing is written
        return super().submit(plan, layout, config_yaml)

    def apply(self, prepared: PreparedRun, lock_fd: int) -> str:
        layout = prepared.layout
        self._refuse_live_tasks(layout)
        folder = layout.run_dir / FOLDER
        (folder / "run.json").unlink(missing_ok=True)  # prepare's run.json is the record
        self._write(prepared.plan, prepared.to_run, layout, folder)
        layout.jobs_file.unlink(missing_ok=True)  # the last experiment's, if any
        exp_id = f"{layout.run_id}_{time.strftime('%Y%m%dT%H%M%S')}{uuid.uuid4().hex[:6]}"
        argv = [sys.executable, str(folder / EXPERIMENT_FILE), "--id", exp_id, "--attempt", exp_id.rpartition("_")[2]]
        log_path = folder / DRIVER_LOG
        with log_path.open("ab") as log:
            if self.nemo.has_dependencies:  # Slurm holds the tasks: submitting them is the whole job
                process = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         timeout=LAUNCH_TIMEOUT_S)
                self._check_launched(layout, exp_id, process.returncode, log_path)
                ids = [state.job_id for state in task_states(layout.read_jobs()).values()]
                return f"NeMo-Run experiment {exp_id}, slurm jobs {', '.join(sorted(ids, key=int))}; log {log_path}"
            # Local tasks live as long as experiment.py: it runs detached and keeps the run lock.
            driver = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True, pass_fds=(lock_fd,))
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not layout.read_jobs().get("launched") and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        self._check_launched(layout, exp_id, driver.poll(), log_path)
        return f"NeMo-Run experiment {exp_id} (local executor), driver pid {driver.pid}; log {log_path}"

    def _write(self, plan: RunPlan, names: list[str], layout: RunLayout, folder: Path) -> list[Path]:
        files = rendered_files(plan, names, layout, self.nemo)  # ConfigError before anything is written
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for file_name, text in files.items():
            write_atomic(folder / file_name, text)
            paths.append(folder / file_name)
        (folder / EXPERIMENT_FILE).chmod(0o755)
        return paths

    def _check_launched(self, layout: RunLayout, exp_id: str, returncode: int | None, log_path: Path) -> None:
        jobs = layout.read_jobs()
        if returncode in (None, 0) and jobs.get("experiment_id") == exp_id and jobs.get("launched"):
            return
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else "no output"
        state = "is still starting" if returncode is None else f"exited with {returncode}"
        raise BackendError(f"nemo-run: experiment {exp_id} {state} before launching its tasks ({why}); "
                           f"see {log_path}")

    def _refuse_live_tasks(self, layout: RunLayout) -> None:
        """A Slurm experiment of this run still queued or running: submitting again would run its
        stages twice. (A local experiment holds the run lock while it lives.)"""
        jobs = layout.read_jobs()
        if jobs.get("backend") != self.name or jobs.get("executor") != "slurm" or not jobs.get("launched"):
            return
        live = sorted(name for name, task in task_states(jobs).items() if task.state in LIVE)
        if live:
            raise BackendError(f"run {layout.run_id} still has NeMo-Run tasks queued or running "
                               f"({', '.join(live)}); `python -m pipeline cancel {layout.run_id}` first")

    # ---- after submission -------------------------------------------------------------------
    def live_states(self, layout: RunLayout, record: RunRecord) -> dict[str, StageStatus]:
        jobs = layout.read_jobs()
        if jobs.get("backend") != self.name or not jobs.get("experiment_id"):
            return {name: StageStatus(name, info.kind, StageState.PENDING, "not submitted")
                    for name, info in record.stages.items()}
        tasks: dict[str, Any] = jobs.get("stages", {})
        local = jobs.get("executor") == "local"
        driver_alive = process_alive(jobs.get("driver_pid")) if local else True
        states = task_states(jobs) if jobs.get("launched") or not driver_alive else {}
        found = {}
        for name, info in record.stages.items():
            waiting = [up for up in info.dependencies
                       if marker_state(layout, up, record.stages[up].fingerprint) != StageState.SUCCEEDED]
            task = states.get(name)
            if name not in tasks:
                state, note = StageState.CACHED, "succeeded before this submission"
            elif tasks[name].get("state") == "cancelled":
                state, note = StageState.CANCELLED, "cancelled by `python -m pipeline cancel`"
            else:
                state, note = task_state(task, waiting, driver_alive)
            found[name] = StageStatus(name, info.kind, state, note, task.job_id if task else "")
        return found

    def cancel(self, layout: RunLayout, record: RunRecord) -> list[str]:
        jobs = layout.read_jobs()
        if jobs.get("backend") != self.name or not jobs.get("experiment_id"):
            return []
        # A stage whose marker is written is done even while its task is still exiting.
        stopping = [status.name for status in self.status(layout, record)
                    if status.state in _OPEN and status.name in jobs.get("stages", {})]
        if jobs.get("executor") == "local":
            driver = jobs.get("driver_pid")
            if not process_alive(driver):
                return []
            # experiment.py cancels its tasks through NeMo-Run, then exits
            if not terminate_and_wait(driver):
                raise BackendError(f"nemo-run: experiment driver pid {driver} did not stop in 60 s")
        elif stopping:
            cancel_tasks(jobs, stopping)
        for name in stopping:  # so status tells "cancelled by you" from "blocked"
            jobs["stages"][name]["state"] = "cancelled"
        layout.write_jobs(jobs)
        return stopping

    def logs(self, layout: RunLayout, record: RunRecord, stage: str) -> str:
        """stage.log; before the stage started (waiting, or stopped at its gate): NeMo-Run's log
        of the task, which holds the gate's output."""
        path = layout.log_path(stage)
        if path.exists():
            return path.read_text(errors="replace")
        experiment_dir = layout.read_jobs().get("experiment_dir")
        task_dir = Path(experiment_dir) / stage if experiment_dir else None
        found = [p for pattern in ("log-*.out", "combined.log") for p in task_dir.rglob(pattern)] if task_dir else []
        if not found:
            return f"(no log yet at {path})"
        newest = max(found, key=lambda p: p.stat().st_mtime)
        return f"(no stage.log yet at {path}; NeMo-Run's log of the task: {newest})\n" + newest.read_text(errors="replace")


def task_state(task: TaskState | None, waiting: list[str], driver_alive: bool) -> tuple[StageState, str]:
    """A stage's state from NeMo-Run's state of its task (its marker, if any, is read by the base).
    `waiting`: upstreams without a verified `_SUCCESS`: a task that runs is at its gate."""
    if task is None:
        return (StageState.PENDING, "the experiment is starting") if driver_alive else \
            (StageState.INTERRUPTED, "the experiment stopped before launching it")
    if task.state in LIVE and not driver_alive:
        return StageState.INTERRUPTED, "the experiment's driver (experiment.py) is gone; submit again to resume"
    if task.state in LIVE and waiting:
        return StageState.PENDING, f"waits for upstream {waiting[0]}"
    if task.state in ("SUBMITTED", "PENDING", "UNSUBMITTED"):
        return StageState.QUEUED, task.state.lower()
    if task.state == "RUNNING":
        return StageState.RUNNING, ""
    if task.state == "CANCELLED":
        return StageState.CANCELLED, "cancelled in NeMo-Run"
    if task.state == "UNKNOWN":
        return StageState.QUEUED, "NeMo-Run does not know its state yet"
    # SUCCEEDED or FAILED without a marker of this fingerprint.
    return StageState.FAILED, f"the NeMo-Run task ended {task.state} without a marker; see its log"
