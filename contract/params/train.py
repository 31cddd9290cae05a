"""Parameters of the `train` stage (SFT, QAT and QAD).

Imported by the control plane to validate the user's YAML: keep it free of torch,
transformers and datasets. Defaults are the smoke-friendly ones; the seed study's values
are given in each description ("study: ...").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract.params.base import (
    REVISION_DOC,
    Device,
    ExternalInput,
    Revision,
    StageParams,
)
from contract.recipe import PrecisionBackend, RecipeValue


class QadParams(BaseModel):
    """Quantization-aware distillation: a full-precision teacher guides the quantized student."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(
        default=1.0,
        gt=0,
        description="Softmax temperature of the logit KL (ModelOpt LMLogitsLoss default 1.0); "
        "the KL is scaled by temperature^2.",
    )
    kd_weight: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="loss = kd_weight * KL(teacher || student) + (1 - kd_weight) * CE. "
        "1.0 is pure distillation, as ModelOpt's QADTrainer does.",
    )
    teacher_model: str | None = Field(
        default=None,
        description="Teacher checkpoint (hub id or local HF dir) when the spec has no "
        "'teacher' input; default: the student's starting model, unquantized.",
    )
    teacher_revision: Revision = Field(
        default=None,
        description="Hub revision of teacher_model (default: the study's model_revision when the "
        f"teacher is the base model): {REVISION_DOC}",
    )

    @model_validator(mode="after")
    def _revision_of_a_teacher(self) -> QadParams:
        if self.teacher_revision is not None and self.teacher_model is None:
            raise ValueError("teacher_revision: set without teacher_model (a base-model teacher is pinned "
                             "by the top-level model_revision)")
        return self


class TrainParams(StageParams):
    """The training settings of a study (`train:`) and of a run (`runs.<name>.train:`): model,
    optimizer, schedule and cadence. The recipe, backend and method are the run's own fields."""

    model: str | None = Field(
        default=None,
        description="Hugging Face model id or local dir, loaded when the spec has no 'model' "
        "input (study: Qwen/Qwen3-8B).",
    )
    model_revision: Revision = Field(
        default=None,
        description="Hub revision of model (the top-level model_revision pins the study's model): "
        f"{REVISION_DOC}",
    )
    dtype: Literal["bfloat16", "float32"] = Field(
        default="bfloat16",
        description="Dtype the master weights are loaded in (study: bfloat16). "
        "Use float32 for bit-exact CPU tests.",
    )
    compute_dtype: Literal["bfloat16", "float32"] | None = Field(
        default=None,
        description="Dtype of forward/backward when it differs from dtype: FSDP2 (also on one "
        "process) casts the master weights to it for compute and reduces gradients in float32, "
        "as Megatron's fp32 main params do (study: dtype float32 + compute_dtype bfloat16, so "
        "lr 1e-5 updates are not rounded away). null: compute in dtype.",
    )
    global_batch: int = Field(
        default=4,
        ge=1,
        description="Sequences per optimizer step = micro_batch * world_size * accumulation "
        "steps; must divide evenly (study: 512).",
    )
    micro_batch: int = Field(
        default=2, ge=1, description="Sequences per forward/backward per process (study: 1)."
    )
    steps: int = Field(default=10, ge=1, description="Optimizer steps (study: 200).")
    lr: float = Field(default=1e-4, gt=0, description="Peak learning rate (study: 1e-5).")
    min_lr: float = Field(
        default=0.0, ge=0, description="Learning rate at the end of a cosine/linear decay."
    )
    warmup_steps: int = Field(
        default=0, ge=0, description="Linear warmup from 0 to lr over this many steps."
    )
    schedule: Literal["cosine", "constant", "linear"] = Field(
        default="cosine",
        description="Decay after warmup: cosine or linear to min_lr, or constant (study: cosine).",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas.")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float | None = Field(
        default=1.0,
        description="Clip the global gradient norm to this value; null disables clipping.",
    )
    seed: int = Field(default=1234, description="Seeds weights' RNG, data order and dropout.")
    val_every: int = Field(
        default=0,
        ge=0,
        description="Validation loss every N steps (0: only at the end; study: 50).",
    )
    val_batches: int | None = Field(
        default=8,
        ge=1,
        description="Cap on validation micro-batches, over all processes (null: the whole val split).",
    )
    checkpoint_every: int = Field(
        default=0, ge=0, description="Save a resumable checkpoint every N steps (0: never)."
    )
    keep_checkpoints: int = Field(
        default=2, ge=1, description="How many of the newest step checkpoints to keep."
    )
    log_every: int = Field(
        default=1, ge=1, description="Print a progress line every N steps (metrics log every step)."
    )
    gc_every: int = Field(
        default=50,
        ge=0,
        description="Python garbage collection between steps, every N steps; automatic collection is off "
        "meanwhile (it pauses the host mid-step, and a GPU waiting on its host pays: ~1.5% of a "
        "Qwen3-8B-layer step in bench.step). 0 leaves Python's automatic collection on.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile each decoder layer (GPU). Backend modelopt then computes its NVFP4 "
        "QuantLinears with ModelOpt's quantizers and amax through this project's kernels in ModelOpt's "
        "arithmetic (its own modules fail under torch 2.11's compile); false runs ModelOpt's modules eager. "
        "MLflow tag modelopt_path says which ran.",
    )
    activation_checkpointing: bool = Field(
        default=False, description="Recompute each decoder layer's activations in backward."
    )
    qad: QadParams = Field(default_factory=QadParams, description="Distillation settings.")
    device: Device = Field(default="auto", description="auto: cuda when available, else cpu.")
    calib_batches: int = Field(
        default=4,
        ge=0,
        description="Training micro-batches fed to recipes that calibrate before training "
        "(ModelOpt QAT amax); 0 skips calibration.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainParams:
        if self.model_revision is not None and self.model is None:
            raise ValueError("model_revision: set without model (the study's model is pinned by the "
                             "top-level model_revision)")
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of "
                f"micro_batch ({self.micro_batch})"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) exceeds lr ({self.lr})")
        return self


class TrainStageParams(TrainParams):
    """What the train stage receives: a run's settings plus its recipe (by value), backend and method."""

    recipe: RecipeValue = Field(description="Precision recipe, by value (see contract/recipe.py).")
    backend: PrecisionBackend = Field(
        default="emulated",
        description="Who implements the recipe: te (Transformer Engine, native GPU), emulated "
        "(exact quantize-dequantize in PyTorch, runs anywhere), modelopt (NVFP4 QAT baseline), "
        "torchao (int QAT), scaled_mm (native FP8 GEMMs, Hopper+). The backend that ran is "
        "recorded; nothing falls back.",
    )
    method: Literal["sft", "qat", "qad"] = Field(
        default="sft",
        description="sft/qat: cross entropy on label tokens; qad: distillation from a teacher (see qad).",
    )

    def external_inputs(self) -> list[ExternalInput]:
        found = [ExternalInput("model", self.model, self.model_revision)] if self.model else []
        if self.method == "qad" and self.qad.teacher_model:
            found.append(ExternalInput("qad.teacher_model", self.qad.teacher_model, self.qad.teacher_revision))
        return found
