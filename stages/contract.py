"""The stage contract: what the control plane hands a stage and how a stage says it is done.

Both planes import this module, so it stays free of torch and of any backend.

A stage directory holds, in the order they are written:
  spec.json     the StageSpec, written by the control plane before launch
  ...           the stage's outputs (each written atomically where a reader may race)
  manifest.json what the stage produced and its summary metrics
  _SUCCESS      written last, atomically; its fingerprint says which spec it completes
A failed stage writes `_FAILED` (one-line error) instead. A stage killed by a signal writes
neither, so the next run resumes it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
SUCCESS_MARKER = "_SUCCESS"
FAILED_MARKER = "_FAILED"
LOG_FILE = "stage.log"

# A stage exits with this code when an upstream it needs has failed (k8s podFailurePolicy keys on it).
UPSTREAM_FAILED_EXIT = 42

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def is_dns1123_label(name: str) -> bool:
    return len(name) <= 63 and bool(DNS1123_LABEL.match(name))


class TrackingRef(BaseModel):
    """Where the stage reports: the study's experiment and the pipeline run's parent run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


class StageSpec(BaseModel):
    """Everything a stage needs to run, serialised as spec.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(description="Pipeline run id; the folder under the artifact root.")
    stage: str = Field(description="DNS-1123 stage name, unique in the run (e.g. train-bf16).")
    kind: str = Field(description="Stage module under stages/ (preprocess, train, ...).")
    fingerprint: str = Field(description="Hash of params, image, code and upstream fingerprints.")
    output_dir: Path = Field(description="Where the stage writes its outputs and markers.")
    inputs: dict[str, Path] = Field(
        default_factory=dict, description="Role -> output dir of the upstream stage."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Stage parameters.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags for tracking.")
    tracking: TrackingRef | None = None

    @field_validator("output_dir")
    @classmethod
    def _absolute_output(cls, path: Path) -> Path:
        # A relative path would land wherever the stage happens to start (its working dir).
        if not path.is_absolute():
            raise ValueError(f"'{path}' is not an absolute path")
        return path

    @field_validator("inputs")
    @classmethod
    def _absolute_inputs(cls, inputs: dict[str, Path]) -> dict[str, Path]:
        relative = sorted(role for role, path in inputs.items() if not path.is_absolute())
        if relative:
            raise ValueError(f"'{relative[0]}': '{inputs[relative[0]]}' is not an absolute path")
        return inputs


class Marker(BaseModel):
    """Content of `_SUCCESS` / `_FAILED`."""

    state: Literal["succeeded", "failed"]
    fingerprint: str
    finished_at: float
    host: str
    error: str | None = None
    exit_code: int | None = None


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(content, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any, sort_keys: bool = True) -> None:
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=str) + "\n")


def load_spec(path: Path) -> StageSpec:
    return StageSpec.model_validate_json(Path(path).read_text())


def write_spec(spec: StageSpec) -> Path:
    path = spec.output_dir / SPEC_FILE
    write_atomic(path, spec.model_dump_json(indent=2) + "\n")
    return path


def read_marker(stage_dir: Path) -> Marker | None:
    """The marker of a stage directory; `_SUCCESS` wins if both exist (a retry succeeded)."""
    for name in (SUCCESS_MARKER, FAILED_MARKER):
        path = Path(stage_dir) / name
        try:
            return Marker.model_validate_json(path.read_text())
        except FileNotFoundError:
            continue
    return None


def mark_succeeded(stage_dir: Path, fingerprint: str) -> None:
    Path(stage_dir, FAILED_MARKER).unlink(missing_ok=True)
    marker = Marker(
        state="succeeded", fingerprint=fingerprint, finished_at=time.time(), host=socket.gethostname()
    )
    write_atomic(Path(stage_dir) / SUCCESS_MARKER, marker.model_dump_json() + "\n")


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
