"""Parameters of the `report` stage: the study table and plots."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    baseline_run: str = Field(
        "bf16", description="Run whose step time and val loss the ratios are taken against."
    )
    skip_first_steps: int = Field(
        2, ge=0, description="Warm-up steps left out of the mean step time."
    )
    plots: bool = Field(True, description="Draw loss curves, step-time bars, val loss vs step time.")
