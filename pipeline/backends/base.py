"""What every backend shares: the interface, the flow of `submit`, and stage states from markers.

A backend is its typed settings (`Settings`) plus how it executes a prepared run:
- `render(plan, out)`: the jobs as files, pure (no network, no MLflow, nothing outside `out`);
  only backends whose jobs are files (slurm, k8s, nemo-run) have it.
- `submit(plan, layout)`: the run lock, then prepare (pipeline/prepare.py), then `apply`.
- `status`, `logs`, `cancel`: from the run's record (run.json, typed) and the backend's own job
  records; `_SUCCESS`/`_FAILED` markers are the one source of truth for "done" on every backend,
  the backend adds what only it knows (queued, running, cancelled) in `live_states`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from contract.markers import UPSTREAM_FAILED_EXIT, read_marker, success_problem
from contract.spec import TrackingRef
from pipeline.errors import ConfigError
from pipeline.layout import RunLayout
from pipeline.plan import RunPlan
from pipeline.prepare import PreparedRun, prepare_run
from pipeline.run_record import RunRecord
from pipeline.runlock import acquire_run_lock


class StageState(str, Enum):
    SUCCEEDED = "succeeded"
    CACHED = "cached"  # succeeded in an earlier invocation with the same fingerprint
    FAILED = "failed"
    RUNNING = "running"
    QUEUED = "queued"  # handed to the scheduler, not started
    PENDING = "pending"  # waiting for upstream stages
    BLOCKED = "blocked"  # an upstream failed: will never run in this invocation
    INTERRUPTED = "interrupted"  # started, stopped without a marker; the next run resumes it
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (StageState.SUCCEEDED, StageState.CACHED, StageState.FAILED,
                        StageState.BLOCKED, StageState.CANCELLED)


DEAD = (StageState.FAILED, StageState.BLOCKED, StageState.CANCELLED, StageState.INTERRUPTED)


@dataclass
class StageStatus:
    name: str
    kind: str
    state: StageState
    note: str = ""
    job_id: str = ""
    started_at: float | None = None
    finished_at: float | None = None


def failure_note(layout: RunLayout, name: str) -> str:
    marker = read_marker(layout.stage_dir(name))
    return marker.error or "" if marker and marker.state == "failed" else ""


def marker_state(layout: RunLayout, name: str, fingerprint: str) -> StageState | None:
    """Succeeded (outputs verify), failed, or blocked (its gate found an upstream failed) from the
    marker of this fingerprint; None otherwise."""
    marker = read_marker(layout.stage_dir(name))
    if marker is None or marker.fingerprint != fingerprint:
        return None
    if marker.state == "failed":
        # Stopped by its upstream gate (k8s, nemo-run): it never ran; an upstream failed.
        return StageState.BLOCKED if marker.exit_code == UPSTREAM_FAILED_EXIT else StageState.FAILED
    return StageState.SUCCEEDED if success_problem(layout.stage_dir(name), fingerprint) is None else None


def lost_success(layout: RunLayout, name: str, fingerprint: str) -> str | None:
    """Why a success of this fingerprint no longer counts (an output missing or changed since),
    so the next `run` reruns it; None when there is no such success or it verifies."""
    marker = read_marker(layout.stage_dir(name))
    if marker is None or marker.state != "succeeded" or marker.fingerprint != fingerprint:
        return None
    return success_problem(layout.stage_dir(name), fingerprint)


SettingsT = TypeVar("SettingsT", bound=BaseModel)


class Backend(ABC, Generic[SettingsT]):
    """Executes prepared runs. Subclasses set `name` and `Settings` (the model `SettingsT` names:
    `class SlurmBackend(Backend[SlurmSettings])`) and implement `apply`, `live_states` and
    `cancel` (and `render` where their jobs are files)."""

    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]
    renderable: ClassVar[bool] = False
    # Where the stages see the artifact root when it is not this machine's path (a pod's mount).
    writes_local_specs: ClassVar[bool] = True

    def __init__(self, settings: SettingsT) -> None:
        self.settings: SettingsT = settings

    @classmethod
    def settings_from(cls, config: Any, options: dict[str, Any]) -> BaseModel:
        """The backend's settings: its config section (`slurm:`, `k8s:`), or for the local
        backend the command line's options."""
        section = getattr(config, cls.name, None)
        return section if section is not None else cls.Settings()

    @classmethod
    def for_record(cls, record: RunRecord) -> Backend:
        """The backend of a prepared run, with the settings it was submitted with."""
        return cls(cls.Settings.model_validate(record.settings))

    # ---- planning ---------------------------------------------------------------------------
    def stage_root(self, layout: RunLayout) -> Path:
        """The artifact root as the stages see it."""
        return layout.root.resolve()

    def tracking(self, config: Any, layout: RunLayout) -> TrackingRef | None:
        """Where the stages report (the study's MLflow): local store or server, by config."""
        from pipeline.tracking import study_tracking

        return study_tracking(config, layout.root, layout.run_id, settle_s=1.0)

    def pulls_images(self) -> bool:
        """Whether the nodes pull the stage images by reference (so a tag alone is a risk)."""
        return False

    # ---- files and submission ---------------------------------------------------------------
    def render(self, plan: RunPlan, layout: RunLayout, output_dir: Path) -> list[Path]:
        raise ConfigError(f"render: backend {self.name} has no job files; use submit or run")

    def submit(self, plan: RunPlan, layout: RunLayout, config_yaml: str | None) -> str:
        """Lock the run, prepare it, start it; returns one line saying where it went."""
        with acquire_run_lock(layout, f"submit --cluster {self.name}") as lock:
            before = {path: _read_or_none(path) for path in (layout.run_file, layout.config_path)}
            prepared = self.prepare(plan, layout, config_yaml, reversible=True)
            if not prepared.to_run:
                return f"{layout.run_id}: all {len(prepared.graph)} stages already succeeded (cached); nothing submitted"
            try:
                where = self.apply(prepared, lock.fd)
            except BaseException:  # refused by the cluster: the run and its stage dirs are as they were
                prepared.changes.undo()
                for path, content in before.items():
                    _restore(path, content)
                raise
            prepared.changes.settle()  # the stale stage dirs set aside go now that the run is taken
            return f"{layout.run_id}: submitted {len(prepared.to_run)} stage(s): {where}"

    def prepare(self, plan: RunPlan, layout: RunLayout, config_yaml: str | None,
                reversible: bool = False) -> PreparedRun:
        """`reversible`: the stage dirs' changes wait in `prepared.changes` (see prepare_run)."""
        return prepare_run(plan, layout, self.name, self.settings.model_dump(mode="json"), config_yaml,
                           write_specs=self.writes_local_specs, reversible=reversible)

    @abstractmethod
    def apply(self, prepared: PreparedRun, lock_fd: int) -> str:
        """Start the prepared run (the caller holds the run lock, as `lock_fd`); returns where it
        went (job ids, where to look), for one line."""

    # ---- after submission ---------------------------------------------------------------------
    @abstractmethod
    def live_states(self, layout: RunLayout, record: RunRecord) -> dict[str, StageStatus]:
        """What the backend knows of stages (queued, running, cancelled...), by stage name."""

    @abstractmethod
    def cancel(self, layout: RunLayout, record: RunRecord) -> list[str]:
        """Stop what is queued or running; returns the names of the stages stopped."""

    def status(self, layout: RunLayout, record: RunRecord) -> list[StageStatus]:
        """Every stage's state, in topological order: markers first, then the backend's view;
        a stage below one that will not succeed is blocked. A success whose outputs no longer
        verify is pending again, with why, and so are the successes below it (as `run` sees them)."""
        live = self.live_states(layout, record)
        statuses: dict[str, StageStatus] = {}
        rerun: set[str] = set()  # successes that no longer count, and those below them
        for name, info in record.stages.items():
            found = live.get(name) or StageStatus(name, info.kind, StageState.PENDING)
            marked = marker_state(layout, name, info.fingerprint)
            if marked is not None:
                cached = found.state == StageState.CACHED
                state = StageState.CACHED if cached and marked == StageState.SUCCEEDED else marked
                found = replace(found, state=state,
                                note=failure_note(layout, name) if marked in DEAD else "")
            lost = lost_success(layout, name, info.fingerprint) if marked is None else None
            stale_up = [up for up in sorted(set(info.upstream.values())) if up in rerun]
            if lost is not None:
                found = replace(found, state=StageState.PENDING, note=f"{lost}: the next run reruns it")
                rerun.add(name)
            elif stale_up and found.state in (StageState.SUCCEEDED, StageState.CACHED):
                found = replace(found, state=StageState.PENDING, note=f"upstream {stale_up[0]} runs again")
                rerun.add(name)
            dead = [up for up in sorted(set(info.upstream.values())) if statuses[up].state in DEAD]
            if found.state in (StageState.PENDING, StageState.QUEUED) and dead:
                found = replace(found, state=StageState.BLOCKED, note=f"upstream {dead[0]} will not succeed")
            statuses[name] = found
        return list(statuses.values())

    def logs(self, layout: RunLayout, record: RunRecord, stage: str) -> str:
        path = layout.log_path(stage)
        if not path.exists():
            return f"(no log yet at {path})"
        return path.read_text(errors="replace")


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _restore(path: Path, content: bytes | None) -> None:
    from contract.files import write_atomic

    if content is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, content)
