"""The `nemo_run:` section of a study config: which NeMo-Run executor runs the stages, and how.

    nemo_run:
      executor: slurm          # local | slurm
      python: /shared/venv/bin/python
      slurm: {account: studies, partition: debug}

Resources (nodes, GPUs, CPUs, memory, time) come from the config's `resources`, as for every
backend. Plain pydantic, no NeMo-Run import: the control plane validates this section (one line,
exit 2) whether or not the optional extra is installed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class NemoLocalSettings(BaseModel):
    """NeMo-Run's LocalExecutor: every stage a process on this machine, all started at once; each
    waits at the upstream gate for its upstreams' `_SUCCESS` (the executor has no dependencies)."""

    model_config = ConfigDict(extra="forbid")


class NemoSlurmSettings(BaseModel):
    """NeMo-Run's SlurmExecutor through a LocalTunnel (run on the cluster's login node): one sbatch
    job per stage, ordered by `--dependency=afterok` (the executor's own dependencies)."""

    model_config = ConfigDict(extra="forbid")

    account: str = Field(description="Slurm account (sbatch --account); NeMo-Run requires one.")
    partition: str | None = Field(None, description="Slurm partition (sbatch --partition).")
    qos: str | None = Field(None, description="Quality of service (sbatch --qos).")
    exclusive: bool = Field(False, description="Whole nodes only (sbatch --exclusive).")
    additional_parameters: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="More sbatch options by name without '--', e.g. {reservation: x, constraint: b200}.",
    )


class NemoRunSettings(BaseModel):
    """How `--cluster nemo-run` runs the study: the executor, and the stages' environment."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "slurm"] = Field(
        "local", description="NeMo-Run executor: local or slurm (its settings: the section of that name)."
    )
    local: NemoLocalSettings = Field(default_factory=NemoLocalSettings, description="LocalExecutor settings.")
    slurm: NemoSlurmSettings | None = Field(None, description="SlurmExecutor settings (executor: slurm).")
    python: str = Field("python", description="The Python that runs the stages (and mark_failed).")
    venv: str | None = Field(None, description="A virtual environment the stage scripts activate first.")
    workdir: str | None = Field(None, description="The project folder the stages run in; default: this checkout.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for every stage.")
    poll_seconds: int = Field(5, ge=1, le=600, description="How often a waiting stage looks for upstream markers.")

    @model_validator(mode="after")
    def _executor_has_settings(self) -> NemoRunSettings:
        if self.executor == "slurm" and self.slurm is None:
            raise ValueError("executor slurm needs a `slurm:` section (at least `account`)")
        return self

    @property
    def has_dependencies(self) -> bool:
        """Whether the executor orders tasks itself (NeMo-Run honours `dependencies` on Slurm only)."""
        return self.executor == "slurm"
