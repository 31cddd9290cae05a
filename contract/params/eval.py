"""Parameters of the `eval` stage: validation loss in the deployed precision, optional MCQ."""

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
from contract.recipe import RecipeValue


class EvalParams(StageParams):
    micro_batch: int = Field(4, ge=1, description="Sequences per forward pass.")
    max_batches: int | None = Field(
        None, ge=1, description="Cap on validation batches (null: the whole val split)."
    )
    precision: Literal["deployed", "bf16"] = Field(
        "deployed",
        description="deployed: weights as exported, activations per the recipe; bf16: plain bf16.",
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval-harness tasks for multiple-choice accuracy (e.g. mmlu); empty: none.",
    )
    lm_eval_task_dir: str | None = Field(
        None, description="Folder of local lm-eval task YAMLs/data (no hub downloads)."
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="Cap on examples per task.")
    device: Device = Field("auto", description="auto: cuda when available.")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Dtype the model runs in; quantized linears compute in float32."
    )


class EvalStageParams(EvalParams):
    """What the stage receives: the user's EvalParams plus what the study graph sets per eval."""

    recipe: RecipeValue = Field(
        description="Recipe of the evaluated model, by value (its fprop formats quantize activations); "
        "must agree with the recipe recorded in the model dir, when it records one.",
    )
    model: str | None = Field(
        None, description="HF id or local dir of the model, when the spec has no 'model' input."
    )
    model_revision: Revision = Field(
        None, description=f"Hub revision of model: {REVISION_DOC}"
    )

    def external_inputs(self) -> list[ExternalInput]:
        found = [ExternalInput("model", self.model, self.model_revision)] if self.model else []
        if self.lm_eval_task_dir:
            found.append(ExternalInput("lm_eval_task_dir", self.lm_eval_task_dir))
        return found
