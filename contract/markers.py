"""How a stage says it is done: `_SUCCESS` (with the outputs it made) or `_FAILED`.

`_SUCCESS` is written last and atomically; it names the fingerprint of the spec it completes and
records every output file (path, size, mtime, content hash). It counts only while those outputs
verify: a deleted or truncated checkpoint makes the stage run again, with its dependents.
A failed stage writes `_FAILED` (one-line error). A stage killed by a signal writes neither, so
the next run resumes it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contract.files import FileRecord, record_files, verify_outputs, write_atomic

SUCCESS_MARKER = "_SUCCESS"
FAILED_MARKER = "_FAILED"
ATTEMPT_MARKER = "_ATTEMPT"  # k8s: which submission a stage's `_FAILED` belongs to

# A stage exits with this code when an upstream it needs has failed (k8s podFailurePolicy keys on it).
UPSTREAM_FAILED_EXIT = 42

# What lives in a stage dir but is not an output: the spec and logs, tracking, resumable
# checkpoints (work in progress, removed or superseded by the final model), markers, temp files.
NOT_OUTPUTS = ("spec.json", "tracking", "checkpoints", "container.json", SUCCESS_MARKER, FAILED_MARKER,
               ATTEMPT_MARKER)


class Marker(BaseModel):
    """Content of `_SUCCESS` / `_FAILED`."""

    model_config = ConfigDict(extra="forbid")

    state: Literal["succeeded", "failed"]
    fingerprint: str
    finished_at: float
    host: str
    error: str | None = None
    exit_code: int | None = None
    outputs: list[FileRecord] = Field(default_factory=list)


def output_files(stage_dir: Path) -> list[Path]:
    """The stage's outputs: every file under its dir but the NOT_OUTPUTS, logs and hidden files."""
    stage_dir = Path(stage_dir)
    found = []
    for path in stage_dir.rglob("*"):
        parts = path.relative_to(stage_dir).parts
        if parts[0] in NOT_OUTPUTS or any(part.startswith(".") for part in parts):
            continue
        if len(parts) == 1 and parts[0].startswith("stage") and parts[0].endswith(".log"):
            continue
        if path.is_file():
            found.append(path)
    return found


def read_marker(stage_dir: Path) -> Marker | None:
    """The marker of a stage directory; `_SUCCESS` wins if both exist (a retry succeeded).
    An unreadable marker (cut, or from an older version) counts as none."""
    for name in (SUCCESS_MARKER, FAILED_MARKER):
        path = Path(stage_dir) / name
        try:
            return Marker.model_validate_json(path.read_text())
        except FileNotFoundError:
            continue
        except ValueError:
            return None
    return None


def mark_succeeded(stage_dir: Path, fingerprint: str) -> Marker:
    """Record the outputs now in the stage dir, then write `_SUCCESS` (last)."""
    stage_dir = Path(stage_dir)
    Path(stage_dir, FAILED_MARKER).unlink(missing_ok=True)
    marker = Marker(state="succeeded", fingerprint=fingerprint, finished_at=time.time(),
                    host=socket.gethostname(), outputs=record_files(stage_dir, output_files(stage_dir)))
    write_atomic(stage_dir / SUCCESS_MARKER, marker.model_dump_json() + "\n")
    return marker


def mark_failed(stage_dir: Path, fingerprint: str, error: str, exit_code: int = 1) -> None:
    marker = Marker(
        state="failed",
        fingerprint=fingerprint,
        finished_at=time.time(),
        host=socket.gethostname(),
        error=error.strip().splitlines()[0][:500] if error.strip() else "failed",
        exit_code=exit_code,
    )
    write_atomic(Path(stage_dir) / FAILED_MARKER, marker.model_dump_json() + "\n")


def clear_markers(stage_dir: Path) -> None:
    for name in (SUCCESS_MARKER, FAILED_MARKER):
        Path(stage_dir, name).unlink(missing_ok=True)


def success_problem(stage_dir: Path, fingerprint: str, full: bool = False) -> str | None:
    """None when the stage succeeded for this fingerprint and its outputs verify; else why not."""
    marker = read_marker(stage_dir)
    if marker is None:
        return "not run"
    if marker.fingerprint != fingerprint:
        return "its inputs or parameters changed"
    if marker.state != "succeeded":
        return "failed"
    problem = verify_outputs(Path(stage_dir), marker.outputs, full)
    return f"output {problem}" if problem else None


def verified_success(stage_dir: Path, fingerprint: str) -> bool:
    return success_problem(stage_dir, fingerprint) is None
