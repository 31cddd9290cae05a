"""Parameters of the `ptq` stage: post-training quantization calibrated on training data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.params.base import (
    REVISION_DOC,
    Device,
    ExternalInput,
    Revision,
    StageParams,
)
from contract.recipe import PrecisionBackend, RecipeValue


class PtqParams(StageParams):
    calib_samples: int = Field(
        16, ge=1, description="Training sequences used to calibrate amax (study: 512)."
    )
    calib_batch: int = Field(4, ge=1, description="Sequences per calibration forward pass.")
    algorithm: Literal["max"] = Field(
        "max", description="Calibration algorithm (ModelOpt 'max': amax of what was seen)."
    )
    device: Device = Field("auto", description="auto: cuda when available.")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Dtype the model is loaded and saved in (study: bfloat16)."
    )


class PtqStageParams(PtqParams):
    """What the stage receives: the user's PtqParams plus what the study graph sets per run."""

    recipe: RecipeValue = Field(description="Precision recipe, by value, whose forward is calibrated.")
    backend: PrecisionBackend = Field(
        "emulated",
        description="modelopt: mtq.quantize (CUDA for NVFP4); emulated: amax recorded by hooks, "
        "runs anywhere. te/torchao are refused with a one-line error.",
    )
    model: str | None = Field(
        None, description="HF id or local dir of the model, when the spec has no 'model' input."
    )
    model_revision: Revision = Field(
        None, description=f"Hub revision of model: {REVISION_DOC}"
    )

    def external_inputs(self) -> list[ExternalInput]:
        return [ExternalInput("model", self.model, self.model_revision)] if self.model else []
