"""`export.json`: what the export stage made and how, beside its checkpoints; eval reads it back.

One model for both sides, so a field the writer adds or renames is a validation error at the
reader, not a KeyError deep in eval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contract.files import write_json_atomic
from contract.recipe import Recipe
from contract.validation import one_line
from stages.runtime import StageInputError

EXPORT_FILE = "export.json"


class Checkpoints(BaseModel):
    """Folders under the export dir, None where that checkpoint was not written."""

    model_config = ConfigDict(extra="forbid")

    bf16: str | None = None
    quantized: str | None = None


class ExportRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    recipe: Recipe
    inference_format: str
    packer: Literal["modelopt", "ours", "torchao"] | None = Field(
        description="Who packed quantized/; None without a quantized checkpoint.")
    activation_scaling: Literal["static", "dynamic", "none"] | None = Field(
        description="static: input_scale from calibration; dynamic: the tensor's own amax at run "
        "time; none: bf16 activations; None without a quantized checkpoint.")
    source_backend: str | None = Field(description="The precision backend the model was trained or PTQ'd with.")
    checkpoints: Checkpoints
    calibrated_in_export: bool
    quantized_skipped: str | None = Field(
        description="Why a quantized recipe has no quantized/ (torchao cannot quantize so on this machine).")

    @model_validator(mode="after")
    def _packed_with_a_scaling(self) -> ExportRecord:
        if (self.packer is None) != (self.activation_scaling is None):
            raise ValueError("packer and activation_scaling: both set (a quantized checkpoint) or both null")
        return self

    def write(self, export_dir: Path) -> None:
        write_json_atomic(export_dir / EXPORT_FILE, self.model_dump(mode="json"))


def read_export_record(export_dir: Path) -> ExportRecord | None:
    """The record of an export dir; None when `export_dir` is no export (a train/ptq/HF dir)."""
    path = Path(export_dir) / EXPORT_FILE
    if not path.exists():
        return None
    try:
        return ExportRecord.model_validate_json(path.read_text())
    except ValidationError as error:
        raise StageInputError(f"inputs.model: {path}: {one_line(error)}") from None
