"""Parameters of the `ptq` stage: post-training quantization calibrated on training data."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PtqParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    calib_samples: int = Field(
        16, ge=1, description="Training sequences used to calibrate amax (study: 512)."
    )
    calib_batch: int = Field(4, ge=1, description="Sequences per calibration forward pass.")
    algorithm: Literal["max"] = Field(
        "max", description="Calibration algorithm (ModelOpt 'max': amax of what was seen)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
