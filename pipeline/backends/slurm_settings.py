"""The `slurm:` section of a study config: where and how the stages' batch jobs run.

Resources (nodes, GPUs, CPUs, memory, time) come from the config's `resources`; this section
adds what only Slurm knows: partition, account, QoS, containers (pyxis/enroot) or a bare-metal
Python, preemption handling. `profile: b200` pulls defaults from `slurm/b200.yaml` (or a
path), and the fields set beside it win. Light on purpose: the control plane imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from contract.kinds import STAGE_KINDS

PROFILES_DIR = Path(__file__).resolve().parents[2] / "slurm"


class SlurmPlacement(BaseModel):
    """Where a stage kind's jobs go; unset fields fall back to the section's own values."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    partition: str | None = Field(None, description="Slurm partition (sbatch --partition).")
    account: str | None = Field(None, description="Slurm account (sbatch --account).")
    qos: str | None = Field(None, description="Quality of service (sbatch --qos).")
    exclusive: bool | None = Field(None, description="Whole nodes only (sbatch --exclusive).")
    extra_sbatch: list[str] = Field(
        default_factory=list,
        description="More sbatch options, one per item, e.g. '--constraint=b200' or '--reservation=x'.",
    )

    @field_validator("extra_sbatch")
    @classmethod
    def _options(cls, lines: list[str]) -> list[str]:
        for line in lines:
            if not line.startswith("--") or "\n" in line:
                raise ValueError(f"'{line}' is not one long sbatch option (write '--name=value')")
        return lines


class ContainerSettings(BaseModel):
    """Run each stage in its pinned image through pyxis/enroot (srun --container-image)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workdir: str = Field(
        "/workspace/faster-qat", description="Folder inside the image holding the project (stages/)."
    )
    mounts: list[str] = Field(
        default_factory=list,
        description="Extra SRC:DST mounts (caches, datasets); the artifact root is always mounted "
        "at its own path.",
    )


class SlurmSettings(SlurmPlacement):
    """Slurm placement for every stage, per-kind overrides, and the stage's environment."""

    profile: str | None = Field(
        None, description="Cluster profile: a name in slurm/ (b200) or a YAML path; fields set here win."
    )
    stages: dict[str, SlurmPlacement] = Field(
        default_factory=dict, description="Per stage kind overrides (e.g. a CPU partition for preprocess)."
    )
    container: ContainerSettings | None = Field(
        None, description="pyxis/enroot containers; unset: bare metal (python/venv below)."
    )
    python: str = Field("python", description="Bare metal: the Python that runs the stages.")
    venv: str | None = Field(None, description="Bare metal: a virtual environment to activate first.")
    workdir: str | None = Field(
        None, description="Bare metal: the project folder on the shared FS; default: this checkout."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for every stage.")
    requeue: bool = Field(
        True, description="Requeue a job that is preempted or near its time limit (after a checkpoint)."
    )
    signal_before_s: int = Field(
        120, ge=10, description="Seconds before the time limit at which the job gets SIGUSR1."
    )
    sbatch: str = Field("sbatch", description="The sbatch command (name on PATH or full path).")

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not value.get("profile"):
            return value
        base = load_profile(str(value["profile"]))
        return _merge(base, {k: v for k, v in value.items() if k != "profile"}) | {
            "profile": value["profile"]
        }

    @field_validator("stages")
    @classmethod
    def _known_kinds(cls, stages: dict[str, SlurmPlacement]) -> dict[str, SlurmPlacement]:
        for kind in stages:
            if kind not in STAGE_KINDS:
                raise ValueError(f"unknown stage kind '{kind}'; known: {', '.join(STAGE_KINDS)}")
        return stages

    def placement(self, kind: str) -> SlurmPlacement:
        """The section's placement with the kind's overrides applied."""
        own = self.stages.get(kind, SlurmPlacement())
        return SlurmPlacement(
            partition=own.partition or self.partition,
            account=own.account or self.account,
            qos=own.qos or self.qos,
            exclusive=own.exclusive if own.exclusive is not None else bool(self.exclusive),
            extra_sbatch=[*self.extra_sbatch, *own.extra_sbatch],
        )


def load_profile(name_or_path: str) -> dict[str, Any]:
    """A cluster profile's `slurm:` fragment (the file may hold `slurm:` or the fields alone)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    try:  # a NUL byte or a name longer than the OS takes is no file either
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ValueError(f"profile '{name_or_path}': no file {path}; profiles: {known}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as error:
        text = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"profile {path}: cannot read: {text}") from None
    fragment = loaded.get("slurm", loaded) if isinstance(loaded, dict) else None
    if not isinstance(fragment, dict):
        raise ValueError(f"profile {path}: expected a mapping of slurm settings")
    if fragment.get("profile"):
        raise ValueError(f"profile {path}: a profile cannot name another profile")
    return fragment


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
