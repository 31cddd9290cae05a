"""Parameters of the `ptq` stage: post-training quantization calibrated on training data."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stages.precision.recipe import PrecisionBackend


class PtqParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    calib_samples: int = Field(
        16, ge=1, description="Training sequences used to calibrate amax (study: 512)."
    )
    calib_batch: int = Field(4, ge=1, description="Sequences per calibration forward pass.")
    algorithm: Literal["max"] = Field(
        "max", description="Calibration algorithm (ModelOpt 'max': amax of what was seen)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Dtype the model is loaded and saved in (study: bfloat16)."
    )


class PtqStageParams(PtqParams):
    """What the stage receives: the user's PtqParams plus what the study graph sets per run."""

    recipe: str = Field(description="Precision recipe (name or YAML path) whose forward is calibrated.")
    backend: PrecisionBackend = Field(
        "emulated",
        description="modelopt: mtq.quantize (CUDA for NVFP4); emulated: amax recorded by hooks, "
        "runs anywhere. te/torchao are refused with a one-line error.",
    )
    model: str | None = Field(
        None, description="HF id or local dir of the model, when the spec has no 'model' input."
    )
