"""Where a pipeline run keeps its files under the artifact root.

<root>/
  mlflow.db, mlartifacts/        the embedded MLflow store (when no server is configured)
  <run_id>/
    config.yaml                  the resolved config the run was last started with
    run.json                     config snapshot, graph, fingerprints, MLflow ids
    jobs.json                    backend and job id per stage (written by the backend)
    driver.log                   output of a detached local driver
    <stage>/                     one folder per stage: spec.json, outputs, stage.log, markers
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.files import write_json_atomic
from contract.spec import LOG_FILE, SPEC_FILE
from pipeline.errors import ConfigError

RUN_FILE = "run.json"
JOBS_FILE = "jobs.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path
    run_id: str

    @property
    def run_dir(self) -> Path:
        return self.root / self.run_id

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def spec_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / SPEC_FILE

    def log_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / LOG_FILE

    @property
    def run_file(self) -> Path:
        return self.run_dir / RUN_FILE

    @property
    def config_path(self) -> Path:
        """The resolved config (profile + overrides) this run was last started with."""
        return self.run_dir / "config.yaml"

    @property
    def jobs_file(self) -> Path:
        return self.run_dir / JOBS_FILE

    @property
    def trash_dir(self) -> Path:
        return self.run_dir / ".trash"

    def read_run(self) -> dict[str, Any]:
        try:
            run = json.loads(self.run_file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.run_file}: no such run under {self.root} (see `python -m pipeline status`)"
            ) from None
        except (ValueError, OSError) as error:  # not JSON, not UTF-8, not a file
            raise ConfigError(f"{self.run_file}: unreadable run record: {error}") from None
        if not isinstance(run, dict) or not isinstance(run.get("stages", {}), dict):
            raise ConfigError(f"{self.run_file}: not a run record (a JSON object with 'stages')")
        return run

    def write_run(self, payload: dict[str, Any]) -> None:
        # Key order is kept: `stages` lists the stages in topological order.
        write_json_atomic(self.run_file, payload, sort_keys=False)

    def read_jobs(self) -> dict[str, Any]:
        try:
            jobs = json.loads(self.jobs_file.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as error:
            raise ConfigError(f"{self.jobs_file}: unreadable job record: {error}") from None
        if not isinstance(jobs, dict):
            raise ConfigError(f"{self.jobs_file}: not a job record (a JSON object)")
        return jobs

    def write_jobs(self, payload: dict[str, Any]) -> None:
        write_json_atomic(self.jobs_file, payload)


def list_runs(root: Path) -> list[str]:
    """Run ids under the root, most recently changed first."""
    runs = [p for p in Path(root).glob(f"*/{RUN_FILE}")]
    runs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.parent.name for p in runs]
