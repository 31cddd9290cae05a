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
    timing: Literal["shared", "isolated"] = Field(
        "shared",
        description="isolated: the local backend runs each train stage alone, so step times are "
        "comparable; shared: stages run side by side (faster) and the report marks step-time "
        "ratios measured while a device was shared as not comparable. Slurm and Kubernetes "
        "give each train stage its own GPUs either way.",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="Level of the intervals (bootstrap and Wilson)."
    )
    bootstrap_resamples: int = Field(
        2000, ge=100, description="Resamples of each bootstrap interval (seeded: same data, same interval)."
    )


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
