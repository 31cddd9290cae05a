"""What every backend shares: the interface, and stage states read from the artifact root.

A backend only decides how specs are executed. `_SUCCESS`/`_FAILED` markers are the one
source of truth for "done" on every backend; the backend adds what only it knows (queued,
running, cancelled) from its own job records in `<run>/jobs.json`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

from pipeline.layout import RunLayout
from pipeline.prepare import PreparedRun
from stages.contract import read_marker


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


@dataclass
class StageStatus:
    name: str
    kind: str
    state: StageState
    note: str = ""
    job_id: str = ""
    started_at: float | None = None
    finished_at: float | None = None


def marker_states(layout: RunLayout, fingerprints: dict[str, str]) -> dict[str, StageState | None]:
    """Succeeded/failed from the markers of the current fingerprints; None where unknown."""
    states: dict[str, StageState | None] = {}
    for name, fingerprint in fingerprints.items():
        marker = read_marker(layout.stage_dir(name))
        if marker is None or marker.fingerprint != fingerprint:
            states[name] = None
        else:
            states[name] = StageState.SUCCEEDED if marker.state == "succeeded" else StageState.FAILED
    return states


def failure_note(layout: RunLayout, name: str) -> str:
    marker = read_marker(layout.stage_dir(name))
    return marker.error or "" if marker and marker.state == "failed" else ""


class Backend(ABC):
    """Executes a prepared run. `run` is for backends that drive the DAG themselves (local);
    cluster backends hand the whole DAG to the scheduler in `submit` and return."""

    name: str

    @abstractmethod
    def submit(self, prepared: PreparedRun) -> str:
        """Start the run; returns a one-line description (job ids, where to look)."""

    @abstractmethod
    def status(self, layout: RunLayout) -> list[StageStatus]:
        """The state of every stage of the run, in topological order."""

    @abstractmethod
    def cancel(self, layout: RunLayout) -> list[str]:
        """Stop what is queued or running; returns the names of the stages stopped."""

    def logs(self, layout: RunLayout, stage: str) -> str:
        path = layout.log_path(stage)
        if not path.exists():
            return f"(no log yet at {path})"
        return path.read_text(errors="replace")
