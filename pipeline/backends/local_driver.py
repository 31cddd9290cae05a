"""The local scheduler: runs the stages of a prepared run as processes, in DAG order.

- At most `max_parallel` stages at once; GPU stages get disjoint CUDA_VISIBLE_DEVICES.
- A failed stage blocks only its dependents; the others finish.
- SIGINT/SIGTERM: children get SIGTERM (train stages checkpoint), then SIGKILL after a grace
  period; stopped stages leave no marker, so the next `run` resumes them.
- Children die with the driver (PR_SET_PDEATHSIG), so a `kill -9` of the driver leaves no
  orphan writing into a stage dir that the next driver starts again.
- How a stage process starts is the launcher's business (local_launch.py: forked from a
  preloaded fork server, a fresh process, or a container runner); the driver sees a pid, its
  process group and an exit code either way.

It works from what `prepare` wrote (run.json and the specs), so the same driver runs in the
foreground (`run`) and detached (`submit --cluster local`: `python -m pipeline.backends.local_driver
RUN_DIR`, holding the run lock it was handed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from contract.markers import mark_failed, read_marker
from contract.tracking import close_parent_run, parent_run_id_of, tracking_client
from pipeline.backends.base import StageState, StageStatus, failure_note, marker_state
from pipeline.backends.local_launch import (
    StageLauncher,
    StageProcess,
    StageStart,
    launcher_for,
    without_per_stage,
)
from pipeline.backends.local_settings import LocalSettings
from pipeline.backends.local_timing import LocalTiming
from pipeline.errors import BackendError
from pipeline.layout import RunLayout
from pipeline.run_record import RunRecord, read_record

GRACE_S = 20.0
LOCK_FD_ENV = "FASTER_QAT_RUN_LOCK_FD"


@dataclass
class _Running:
    process: StageProcess
    log: IO[bytes]
    gpus: list[int]
    started_at: float


@dataclass
class LocalDriver:
    layout: RunLayout
    record: RunRecord
    settings: LocalSettings
    gpu_ids: list[int]
    on_change: Callable[[list[StageStatus]], None] = lambda statuses: None
    poll_s: float = 0.05
    # How stages start (None: as the settings' runtime says; local_launch.launcher_for).
    launcher: StageLauncher | None = None
    # Records where each stage ran; runs train stages alone with report.timing: isolated
    # (None: as the run's settings say).
    timing: LocalTiming | None = None
    _states: dict[str, StageStatus] = field(default_factory=dict, init=False)
    _running: dict[str, _Running] = field(default_factory=dict, init=False)
    _stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.timing is None:
            self.timing = LocalTiming(self.layout.run_dir, isolated=self.settings.timing == "isolated")
        self._timing = self.timing
        if self.launcher is None:
            self.launcher = launcher_for(self.settings.runtime, self.settings.docker_network)
        self._launcher = self.launcher
        # Every stage of the run gets the environment the driver started with, whatever the
        # driver's own work sets later (e.g. MLflow's client settings when it syncs a stage).
        self._base_env = dict(os.environ)

    def run(self) -> dict[str, StageState]:
        """Drive the run to its end (the caller holds the run lock)."""
        for name, stage in self.record.stages.items():
            done = marker_state(self.layout, name, stage.fingerprint) == StageState.SUCCEEDED
            self._states[name] = StageStatus(name, stage.kind, StageState.CACHED if done else StageState.PENDING)
        to_run = [name for name, status in self._states.items() if status.state == StageState.PENDING]
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if to_run:  # the launcher warms up (e.g. preloads) while the parent run is made
                self._launcher.open(self.record.model_copy(update={
                    "stages": {name: self.record.stages[name] for name in to_run}}),
                    self.layout.run_dir, without_per_stage(self._environment([])))
            self._open_tracking()
            self._record_jobs()
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_children()
            self._launcher.close()
            self._record_jobs()
            self._close_tracking()
        return {name: status.state for name, status in self._states.items()}

    def statuses(self) -> list[StageStatus]:
        return [self._states[name] for name in self.record.stages]

    def _loop(self) -> None:
        self.on_change(self.statuses())
        while not self._stopping:
            changed = self._reap()
            changed |= self._block_dependents_of_failures()
            changed |= self._launch_ready()
            if changed:
                self._record_jobs()
                self.on_change(self.statuses())
            if not self._running and not self._ready():
                break
            time.sleep(self.poll_s)
        self.on_change(self.statuses())

    def _ready(self) -> list[str]:
        ready = []
        for name, stage in self.record.stages.items():
            if self._states[name].state != StageState.PENDING:
                continue
            if all(self._states[up].state in (StageState.SUCCEEDED, StageState.CACHED) for up in stage.dependencies):
                ready.append(name)
        return ready

    def _launch_ready(self) -> bool:
        launched = False
        ready = self._ready()
        timed_waiting = any(self._timing.is_timed(self.record.stages[name].kind) for name in ready)
        for name in ready:
            if len(self._running) >= self.settings.max_parallel:
                break
            running_kinds = [self.record.stages[other].kind for other in self._running]
            if not self._timing.may_start(self.record.stages[name].kind, running_kinds, timed_waiting):
                continue  # report.timing: isolated
            gpus = self._free_gpus(self.record.stages[name].resources.gpus_per_node)
            if gpus is None:
                continue  # waits for GPUs; later stages that need fewer may still start
            self._start(name, gpus)
            launched = True
        return launched

    def _free_gpus(self, wanted: int) -> list[int] | None:
        if wanted == 0:
            return []
        if wanted > len(self.gpu_ids):
            raise BackendError(
                f"a stage needs {wanted} GPUs per node, this machine has {len(self.gpu_ids)}; "
                "lower resources.<kind>.gpus_per_node or use --cluster slurm|k8s"
            )
        busy = {gpu for running in self._running.values() for gpu in running.gpus}
        free = [gpu for gpu in self.gpu_ids if gpu not in busy]
        return free[:wanted] if len(free) >= wanted else None

    def _environment(self, gpus: list[int]) -> dict[str, str]:
        """A stage's environment, but for its PIPELINE_JOB_ID."""
        env = {**self._base_env, "PYTHONUNBUFFERED": "1"}
        env.pop(LOCK_FD_ENV, None)
        # A stage sees only the GPUs it was given; a CPU stage sees none.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpus)
        if not gpus:
            # CPU stages share this host's cores with each other: an idle OpenMP thread sleeps
            # instead of spinning on a core another stage needs (the same work split, the same
            # numbers; two train stages of the smoke study side by side on 2 cores took 6-13 s a
            # step spinning, 0.2-0.7 s passive). A value the user set wins.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.update(self._timing.environment())  # where the record of what ran where is
        return env

    def _start(self, name: str, gpus: list[int]) -> None:
        stage = self.record.stages[name]
        env = {**self._environment(gpus), "PIPELINE_JOB_ID": f"local-{os.getpid()}-{name}"}
        log = self.layout.log_path(name).open("ab")
        started_at = time.time()
        self._timing.started(name, stage.kind, gpus)  # what ran where, for step times
        try:
            process = self._launcher.start(StageStart(name, stage, self.layout.spec_path(name), gpus, env, log))
        except (BackendError, OSError) as error:  # nothing started: the stage fails, its dependents wait no more
            self._timing.ended(name)
            message = f"{name}: could not start: {error}"
            log.write(f"error: {message}\n".encode())
            log.close()
            mark_failed(self.layout.stage_dir(name), stage.fingerprint, message, 1)
            status = self._states[name]
            status.state, status.started_at, status.finished_at = StageState.FAILED, started_at, time.time()
            status.note = failure_note(self.layout, name)
            return
        self._running[name] = _Running(process, log, gpus, started_at)
        status = self._states[name]
        status.state, status.started_at, status.job_id = StageState.RUNNING, started_at, str(process.pid)
        status.note = f"pid {process.pid}" + (f", gpus {gpus}" if gpus else "")

    def _reap(self) -> bool:
        changed = False
        for name, running in list(self._running.items()):
            code = running.process.poll()
            if code is None:
                continue
            running.log.close()
            del self._running[name]
            self._timing.ended(name)
            changed = True
            status = self._states[name]
            status.finished_at = time.time()
            fingerprint = self.record.stages[name].fingerprint
            marker = read_marker(self.layout.stage_dir(name))
            if marker_state(self.layout, name, fingerprint) == StageState.SUCCEEDED:
                status.state, status.note = StageState.SUCCEEDED, f"{status.finished_at - running.started_at:.1f}s"
            elif self._stopping and not marker:
                status.state, status.note = StageState.INTERRUPTED, "stopped; next run resumes"
            else:
                if not marker or marker.fingerprint != fingerprint:
                    mark_failed(self.layout.stage_dir(name), fingerprint,
                                f"{name}: exited with code {code} without writing a marker", code or 1)
                status.state = StageState.FAILED
                status.note = failure_note(self.layout, name)
            self._sync_tracking(name)
        return changed

    def _block_dependents_of_failures(self) -> bool:
        changed = False
        for name, stage in self.record.stages.items():
            status = self._states[name]
            failed = [up for up in stage.dependencies if self._states[up].state in (StageState.FAILED, StageState.BLOCKED)]
            if status.state == StageState.PENDING and failed:
                status.state, status.note = StageState.BLOCKED, f"upstream {failed[0]} failed"
                changed = True
        return changed

    def _open_tracking(self) -> None:
        """The parent run is made here, before any stage starts, so stages never race for it."""
        ref = self.record.tracking
        if ref is None:
            return
        try:
            parent_run_id_of(tracking_client(ref), ref)
        except Exception as error:  # the stages buffer their events; `sync` delivers them later
            print(f"warning: MLflow at {ref.tracking_uri}: {type(error).__name__}: {str(error)[:200]}; "
                  "stages buffer their events (`python -m pipeline sync` later)", file=sys.stderr)

    def _close_tracking(self) -> None:
        if self.record.tracking is None:
            return
        states = {status.state for status in self._states.values()}
        status = ("KILLED" if StageState.INTERRUPTED in states else
                  "FAILED" if states & {StageState.FAILED, StageState.BLOCKED} else "FINISHED")
        close_parent_run(self.record.tracking, status)

    def _sync_tracking(self, name: str) -> None:
        """The driver is the one writer left once the stage is gone: deliver what it buffered."""
        if self.record.tracking is None:
            return
        from contract.tracking import sync_stage_events

        try:
            sync_stage_events(self.layout.stage_dir(name), self.record.tracking)
        except Exception as error:
            print(f"warning: {name}: MLflow sync deferred ({type(error).__name__}); "
                  "run `python -m pipeline sync` later", file=sys.stderr)

    def _request_stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _stop_children(self) -> None:
        if not self._running:
            return
        for running in self._running.values():
            _signal_group(running.process, signal.SIGTERM)
        deadline = time.time() + GRACE_S
        while time.time() < deadline and any(r.process.poll() is None for r in self._running.values()):
            time.sleep(0.1)
        for running in self._running.values():
            if running.process.poll() is None:
                _signal_group(running.process, signal.SIGKILL)
                running.process.wait()
        self._reap()

    def _record_jobs(self) -> None:
        self.layout.write_jobs({
            "cluster": "local",
            "driver_pid": os.getpid(),
            "updated_at": time.time(),
            "stages": {
                s.name: {"state": s.state.value, "job_id": s.job_id, "note": s.note,
                         "started_at": s.started_at, "finished_at": s.finished_at}
                for s in self._states.values()
            },
        })


def _signal_group(process: StageProcess, signum: int) -> None:
    if process.poll() is not None:  # reaped: its group id may belong to someone else by now
        return
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    """The detached driver of `submit --cluster local`: drives a prepared run, holding the run
    lock its submitter passed down (fd in FASTER_QAT_RUN_LOCK_FD)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.backends.local_driver")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    layout = RunLayout(args.run_dir.parent, args.run_dir.name)
    record = read_record(layout)
    from pipeline.backends.local import driver_for

    # A process of its own: the settings `submit` was given reach it in the run's record.
    settings = LocalSettings.model_validate(record.settings)
    driver = driver_for(layout, record, settings, on_change=lambda statuses: None)
    states = driver.run()
    failed = [name for name, state in states.items() if state in (StageState.FAILED, StageState.BLOCKED)]
    print(" ".join(f"{name}={state.value}" for name, state in states.items()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
