"""`<run>/run.json`, typed: what a prepared run is, for every later command (status, logs, cancel,
report, sync, verify) and for the backend that runs it. Read and validated in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract.files import write_atomic
from contract.spec import TrackingRef
from contract.validation import one_line
from pipeline.errors import ConfigError
from pipeline.layout import RunLayout
from pipeline.resources import Resources


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    upstream: dict[str, str] = Field(default_factory=dict)
    fingerprint: str
    image: str
    tags: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)

    @property
    def dependencies(self) -> list[str]:
        return sorted(set(self.upstream.values()))


class RunRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str
    cluster: str
    created_at: float | None = Field(None, description="When first prepared; None in rendered files.")
    updated_at: float | None = None
    settings: dict[str, Any] = Field(default_factory=dict, description="The backend's typed settings.")
    stages: dict[str, StageRecord] = Field(description="In topological order (the order written).")
    tracking: TrackingRef | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="The resolved study config.")


def read_record(layout: RunLayout) -> RunRecord:
    """The run's record; a missing run or an unreadable record is one line (exit 2)."""
    try:
        text = layout.run_file.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no run '{layout.run_id}' under {layout.root} "
                          "(see `python -m pipeline status` for the latest run)") from None
    except (ValueError, OSError) as error:  # not UTF-8, a folder, unreadable
        raise ConfigError(f"{layout.run_file}: unreadable run record: {error}") from None
    try:
        return RunRecord.model_validate_json(text)
    except ValidationError as error:
        raise ConfigError(f"{layout.run_file}: not a run record of this version ({one_line(error)})") from None


def write_record(path: Path, record: RunRecord) -> None:
    write_atomic(path, record.model_dump_json(indent=2) + "\n")
