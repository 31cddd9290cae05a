"""The local scheduler: runs the stages of a prepared run as subprocesses, in DAG order.

- At most `max_parallel` stages at once; GPU stages get disjoint CUDA_VISIBLE_DEVICES.
- A failed stage blocks only its dependents; the others finish.
- SIGINT/SIGTERM: children get SIGTERM (train stages checkpoint), then SIGKILL after a grace
  period; stopped stages leave no marker, so the next `run` resumes them.
- Children die with the driver (PR_SET_PDEATHSIG), so a `kill -9` of the driver leaves no
  orphan writing into a stage dir that the next driver starts again.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from pipeline.backends.base import StageState, StageStatus, failure_note
from pipeline.backends.local_timing import LocalTiming
from pipeline.errors import BackendError
from pipeline.graph import Stage
from pipeline.layout import RunLayout
from pipeline.prepare import PreparedRun
from pipeline.stage_kinds import stage_module
from stages.contract import mark_failed, read_marker

GRACE_S = 20.0
_PR_SET_PDEATHSIG = 1


class StageLauncher(Protocol):
    def command(self, stage: Stage, spec_path: Path, gpus: list[int]) -> list[str]: ...


def stage_command(kind: str, spec_path: Path, processes: int, python: str = sys.executable) -> list[str]:
    """The stage command every runtime runs (torchrun when a node has several processes)."""
    module = stage_module(kind)
    if processes > 1:
        return [python, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}", "-m", module, "--spec", str(spec_path)]
    return [python, "-m", module, "--spec", str(spec_path)]


@dataclass
class _Running:
    process: subprocess.Popen
    log: IO[bytes]
    gpus: list[int]
    started_at: float


@dataclass
class LocalDriver:
    prepared: PreparedRun
    max_parallel: int
    gpu_ids: list[int]
    on_change: Callable[[list[StageStatus]], None] = lambda statuses: None
    poll_s: float = 0.05
    # Makes a stage's command instead of running it as a plain subprocess (None: process runtime).
    launcher: StageLauncher | None = None
    # Records where each stage ran; runs train stages alone with report.timing: isolated (None: from the graph).
    timing: LocalTiming | None = None
    _states: dict[str, StageStatus] = field(default_factory=dict, init=False)
    _running: dict[str, _Running] = field(default_factory=dict, init=False)
    _stopping: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.timing is None:
            self.timing = LocalTiming.for_run(self.prepared.layout.run_dir, self.prepared.graph)

    def run(self) -> dict[str, StageState]:
        layout = self.prepared.layout
        graph = self.prepared.graph
        lock = _acquire_run_lock(layout)
        try:
            for stage in graph:
                state = StageState.CACHED if stage.name in self.prepared.cached else StageState.PENDING
                self._states[stage.name] = StageStatus(stage.name, stage.kind, state)
            self._record_jobs()
            previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                self._loop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                self._stop_children()
                self._record_jobs()
        finally:
            lock.close()
        return {name: status.state for name, status in self._states.items()}

    def statuses(self) -> list[StageStatus]:
        return [self._states[name] for name in self.prepared.graph.names]

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
        for stage in self.prepared.graph:
            status = self._states[stage.name]
            if status.state != StageState.PENDING:
                continue
            upstream_states = [self._states[up].state for up in stage.dependencies]
            if all(s in (StageState.SUCCEEDED, StageState.CACHED) for s in upstream_states):
                ready.append(stage.name)
        return ready

    def _launch_ready(self) -> bool:
        launched = False
        ready = self._ready()
        timed_waiting = any(self.timing.is_timed(self.prepared.graph[name].kind) for name in ready)
        for name in ready:
            if len(self._running) >= self.max_parallel:
                break
            stage = self.prepared.graph[name]
            running_kinds = [self.prepared.graph[other].kind for other in self._running]
            if not self.timing.may_start(stage.kind, running_kinds, timed_waiting):
                continue  # report.timing: isolated
            gpus = self._free_gpus(stage.resources.gpus_per_node)
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

    def _start(self, name: str, gpus: list[int]) -> None:
        layout = self.prepared.layout
        stage = self.prepared.graph[name]
        spec_path = layout.spec_path(name)
        if self.launcher is not None:  # e.g. --runtime docker: a child that runs the container
            command = self.launcher.command(stage, spec_path, gpus)
        else:
            command = stage_command(stage.kind, spec_path, stage.resources.processes_per_node)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PIPELINE_JOB_ID": f"local-{os.getpid()}-{name}"}
        # A stage sees only the GPUs it was given; a CPU stage sees none.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpus)
        env.update(self.timing.started(name, stage.kind, gpus))  # what ran where, for step times
        log = layout.log_path(name).open("ab")
        log.write(f"=== {time.strftime('%F %T')} {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, preexec_fn=_die_with_parent,
        )
        self._running[name] = _Running(process, log, gpus, time.time())
        status = self._states[name]
        status.state, status.started_at, status.job_id = StageState.RUNNING, time.time(), str(process.pid)
        status.note = f"pid {process.pid}" + (f", gpus {gpus}" if gpus else "")

    def _reap(self) -> bool:
        changed = False
        for name, running in list(self._running.items()):
            code = running.process.poll()
            if code is None:
                continue
            running.log.close()
            del self._running[name]
            self.timing.ended(name)
            changed = True
            status = self._states[name]
            status.finished_at = time.time()
            marker = read_marker(self.prepared.layout.stage_dir(name))
            fingerprint = self.prepared.fingerprints[name]
            if marker and marker.fingerprint == fingerprint and marker.state == "succeeded":
                status.state, status.note = StageState.SUCCEEDED, f"{status.finished_at - running.started_at:.1f}s"
            elif self._stopping and not marker:
                status.state, status.note = StageState.INTERRUPTED, "stopped; next run resumes"
            else:
                if not marker or marker.fingerprint != fingerprint:
                    mark_failed(self.prepared.layout.stage_dir(name), fingerprint,
                                f"{name}: exited with code {code} without writing a marker", code or 1)
                status.state = StageState.FAILED
                status.note = failure_note(self.prepared.layout, name)
            self._sync_tracking(name)
        return changed

    def _block_dependents_of_failures(self) -> bool:
        changed = False
        for name, status in self._states.items():
            if status.state != StageState.FAILED:
                continue
            for down in self.prepared.graph.downstream(name):
                if self._states[down].state == StageState.PENDING:
                    self._states[down].state = StageState.BLOCKED
                    self._states[down].note = f"upstream {name} failed"
                    changed = True
        return changed

    def _sync_tracking(self, name: str) -> None:
        """The driver is the one writer left once the stage is gone: deliver what it buffered."""
        if self.prepared.tracking is None:
            return
        from stages.tracking import sync_stage_events

        try:
            sync_stage_events(self.prepared.layout.stage_dir(name), self.prepared.tracking)
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
        self.prepared.layout.write_jobs({
            "cluster": "local",
            "driver_pid": os.getpid(),
            "updated_at": time.time(),
            "stages": {
                s.name: {"state": s.state.value, "job_id": s.job_id, "note": s.note,
                         "started_at": s.started_at, "finished_at": s.finished_at}
                for s in self._states.values()
            },
        })


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


class _RunLock:
    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle

    def close(self) -> None:
        self._handle.close()


def _acquire_run_lock(layout: RunLayout) -> _RunLock:
    path = Path(layout.run_dir) / ".driver.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise BackendError(
            f"run '{layout.run_id}' is already being run by {owner}; wait for it or "
            f"`python -m pipeline cancel {layout.run_id}`"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return _RunLock(handle)
