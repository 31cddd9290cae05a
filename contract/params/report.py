"""Parameters of the `report` stage: the study table and plots."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contract.params.base import StageParams


class ReportParams(StageParams):
    baseline_run: str = Field(
        "bf16", description="Run whose step time and val loss the ratios are taken against."
    )
    skip_first_steps: int = Field(
        2, ge=0, description="Warm-up steps left out of the mean step time."
    )
    plots: bool = Field(True, description="Draw loss curves, step-time bars, val loss vs step time.")


class ReportInput(BaseModel):
    """What the study graph knows of one upstream stage of the report: the row it fills."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(description="Run name ('base' for the base model).")
    phase: Literal["base", "ptq", "trained"] = Field(description="Which row of the run the stage fills.")
    recipe: str = Field("", description="Recipe name.")
    inference_format: str = Field("", description="What the recipe deploys as.")
    backend: str = Field("", description="Precision backend of the run.")
    method: str = Field("", description="sft, qat or qad.")


class ReportStageParams(ReportParams):
    """What the stage receives: the report settings plus the study and its rows."""

    study: str = Field(description="Study name (the table's title).")
    description: str = Field("", description="Free text shown in the report.")
    inputs: dict[str, ReportInput] = Field(
        default_factory=dict, description="Input role (the upstream stage) -> the row it fills.")
