"""The stage spec: everything the control plane hands a stage, as `spec.json`.

A stage directory holds, in the order they are written:
  spec.json     the StageSpec, written before launch (by the control plane, or by the job itself
                from the rendered files: a k8s ConfigMap, a Slurm script)
  ...           the stage's outputs (each written atomically where a reader may race)
  manifest.json what the stage produced and its summary metrics
  _SUCCESS      written last, atomically (see contract.markers)

`params` are typed: the model of the stage's kind (contract.params), validated once where the
spec is built, and read back whole by the stage. The recipe travels inside them by value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
)

from contract.files import write_atomic
from contract.params import STAGE_PARAMS, StageParams

SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
LOG_FILE = "stage.log"

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def is_dns1123_label(name: str) -> bool:
    return len(name) <= 63 and bool(DNS1123_LABEL.match(name))


class TrackingRef(BaseModel):
    """Where a stage reports: an MLflow server (or store) and the study's experiment. The parent
    run of the pipeline run is found or made there by `run_key` (see contract.tracking), so no
    run id has to exist before the study runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    tracking_uri: str = Field(description="MLflow tracking URI as the stage reaches it.")
    experiment: str = Field(description="Experiment name (the study's).")
    run_key: str = Field(description="The pipeline run id: the parent run's key.")
    artifact_location: str | None = Field(
        None, description="Artifact root of a new experiment (the embedded sqlite store's folder).")
    settle_s: float = Field(
        1.0, ge=0, description="Unused: racers now agree through a per-key claim (contract.tracking), "
        "not by waiting; kept so run records written before still load.")


class StageSpec(BaseModel):
    """Everything a stage needs to run, serialised as spec.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(description="Pipeline run id; the folder under the artifact root.")
    stage: str = Field(description="DNS-1123 stage name, unique in the run (e.g. train-bf16).")
    kind: str = Field(description="Stage kind: its module is stages.<kind>.")
    fingerprint: str = Field(description="Hash of params, image, code, inputs and upstream fingerprints.")
    output_dir: Path = Field(description="Where the stage writes its outputs and markers.")
    inputs: dict[str, Path] = Field(
        default_factory=dict, description="Role -> output dir of the upstream stage."
    )
    params: SerializeAsAny[StageParams] = Field(description="The kind's typed parameters.")
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

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in STAGE_PARAMS:
            raise ValueError(f"'{kind}' is not one of {', '.join(STAGE_PARAMS)}")
        return kind

    @field_validator("params", mode="before")
    @classmethod
    def _typed_params(cls, value: Any, info: ValidationInfo) -> Any:
        """`params` as the model of the spec's kind (unknown keys are an error)."""
        model = STAGE_PARAMS.get(info.data.get("kind", ""))
        if model is None or isinstance(value, model):
            return value
        return model.model_validate(value)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def load_spec(path: Path) -> StageSpec:
    return StageSpec.model_validate_json(Path(path).read_text())


def write_spec(spec: StageSpec, path: Path | None = None) -> Path:
    path = path or spec.output_dir / SPEC_FILE
    write_atomic(path, spec.to_json())
    return path
