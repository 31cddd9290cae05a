"""The study configuration: pydantic models composed from the stages' own parameter models.

Each stage kind owns its parameters (`stages/<kind>/params.py`); this module only composes
them into a study: one dataset, a set of runs (recipe x backend x method), and where things run.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from contract.compat import recipe_refusal
from contract.kinds import STAGE_KINDS
from contract.params import (
    EvalParams,
    ExportParams,
    PreprocessParams,
    PtqParams,
    ReportParams,
    TrainParams,
)
from contract.params.base import REVISION_DOC, ExternalInput, Revision
from contract.params.train import TrainStageParams
from contract.recipe import PrecisionBackend, RecipeValue
from contract.spec import is_dns1123_label
from contract.validation import one_line
from pipeline.backends.k8s_settings import K8sSettings
from pipeline.backends.nemo_settings import NemoRunSettings
from pipeline.backends.slurm_settings import SlurmSettings
from pipeline.image_lock import (
    DEFAULT_LOCK_FILE,
    ImageRef,
    ImageRefError,
    pin_refs,
    read_lock,
    resolve_lock_path,
)
from pipeline.resources import Resources

# Stage names are `<prefix>-<run>` and k8s Job names `<run_id>-<stage>`: keep both in 63.
MAX_RUN_NAME = 24
BASE_MODEL = "base"
ParamsT = TypeVar("ParamsT", bound=BaseModel)


class RunConfig(BaseModel):
    """One fine-tuning run of the study, e.g. `fp8` = SFT under the fp8 recipe on TE."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(True, description="false drops the run (and its stages) from the graph.")
    method: Literal["sft", "qat", "qad"] = Field(
        "sft", description="sft: fine-tune; qat: fake-quant training; qad: QAT with distillation."
    )
    recipe: RecipeValue = Field(
        description="Precision recipe: a built-in name, a recipe YAML path (./, ../ or / relative to "
        "the config file), or the recipe itself as a mapping. Loaded once, here: stages receive it "
        "by value, and fingerprints cover its content."
    )
    backend: PrecisionBackend = Field(
        description="Who runs the recipe; recorded in MLflow, never swapped silently."
    )
    init_from: str = Field(
        BASE_MODEL,
        description="Start from the base model ('base') or from another run's trained model.",
    )
    ptq: bool = Field(
        False, description="Calibrate (PTQ) and evaluate before training; training starts from it."
    )
    teacher: str = Field(
        BASE_MODEL, description="QAD only: the teacher, 'base' or another run's trained model."
    )
    export: bool = Field(True, description="Export a deployable checkpoint after training.")
    evaluate: bool = Field(True, description="Evaluate the exported model (requires export).")
    train: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the study's `train` settings for this run."
    )
    export_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the study's `export` settings for this run."
    )
    resources: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of resources.train for this run's training."
    )

    @field_validator("backend")
    @classmethod
    def _backend_runs_the_recipe(cls, value: str, info: ValidationInfo) -> str:
        # Judged from the recipe alone (the machine's part is checked where the stage runs):
        # a pairing no machine can run stops here, before anything is submitted.
        if "recipe" in info.data:  # else the recipe's own error is reported
            refusal = recipe_refusal(info.data["recipe"], value)
            if refusal:
                raise ValueError(refusal)
        return value


DEFAULT_STAGE_IMAGES = {
    "preprocess": "cpu",
    "report": "cpu",
    "probe": "cpu",
    "train": "train",
    "ptq": "train",
    "export": "train",
    "eval": "train",
}


class ImagesConfig(BaseModel):
    """Container images, pinned by digest; which image each stage kind runs in."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    strict: bool = Field(
        False, description="Refuse image references without an @sha256: digest (use on clusters)."
    )
    refs: dict[str, str] = Field(
        default_factory=lambda: {
            "cpu": "faster-qat-cpu:dev",
            "train": "faster-qat-train:dev",
        },
        description="Image name -> reference (repository[:tag]@sha256:digest).",
    )
    stages: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_STAGE_IMAGES),
        description="Stage kind -> image name (a key of refs); kinds not named keep their default.",
    )
    lock_file: str | None = Field(
        DEFAULT_LOCK_FILE,
        description="Lock file (written by `images lock`) that pins refs without a digest; "
        "relative to the project root; null: use refs as written.",
    )
    network: str = Field(
        "none", description="--runtime docker: the containers' network (none, host or a Docker network)."
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _every_kind_has_an_image(cls, value: Any) -> Any:
        # `--set images.stages.train=cpu` changes one kind; the graph needs all of them.
        return {**DEFAULT_STAGE_IMAGES, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self) -> ImagesConfig:
        for name, ref in self.refs.items():
            try:
                ImageRef.parse(ref)
            except ImageRefError as error:
                raise ValueError(f"refs.{name}: {error}") from None
        self._pin_from_lock()
        for kind, image in self.stages.items():
            if kind not in STAGE_KINDS:
                raise ValueError(f"stages.{kind}: unknown stage kind; known: {', '.join(STAGE_KINDS)}")
            if image not in self.refs:
                raise ValueError(f"stages.{kind}: image '{image}' is not a key of refs")
        if self.strict:
            for name, ref in self.refs.items():
                if "@sha256:" not in ref:
                    raise ValueError(
                        f"refs.{name}: '{ref}' has no @sha256: digest (images.strict is on; "
                        "run `python -m pipeline images lock` or pin it by hand)"
                    )
        return self

    def _pin_from_lock(self) -> None:
        if self.lock_file is None:
            return
        path = resolve_lock_path(self.lock_file)
        try:
            exists = path.is_file()
        except (OSError, ValueError) as error:  # a name longer than the OS takes, a NUL byte
            raise ValueError(f"lock_file: {self.lock_file!r} is not a usable path: {error}") from None
        if not exists:
            if "lock_file" in self.model_fields_set:  # named on purpose: must exist
                raise ValueError(f"lock_file: {path} not found; run `python -m pipeline images lock`")
            return
        try:
            self.refs = pin_refs(self.refs, read_lock(path))
        except ImageRefError as error:
            raise ValueError(f"lock_file: {error}") from None


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    uri: str | None = Field(
        None,
        description="MLflow tracking URI; MLFLOW_TRACKING_URI wins; default: sqlite under the root.",
    )
    experiment: str | None = Field(None, description="Experiment name; default: the study name.")


def _default_resources() -> dict[str, Resources]:
    return {kind: Resources() for kind in STAGE_KINDS}


class StudyConfig(BaseModel):
    """A quantization study: one dataset, several training runs, their evaluation and report."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    study: str = Field(description="Study name (DNS-1123): the MLflow experiment and default run id.")
    description: str = Field("", description="Free text shown in the report.")
    model: str = Field(
        description="Base model: Hugging Face id (Qwen/Qwen3-8B) or a path (./, ../ or /) "
        "relative to this config file."
    )
    model_revision: Revision = Field(
        None,
        description="Hub revision of model, for every stage that loads the base model (and the "
        f"tokenizer, when it is the model's): {REVISION_DOC}",
    )
    data: PreprocessParams = Field(description="Dataset and preprocessing (the preprocess stage).")
    train: TrainParams = Field(
        default_factory=TrainParams, description="Training settings shared by every run."
    )
    eval_base: bool = Field(True, description="Evaluate the base model before any training.")
    runs: dict[str, RunConfig] = Field(description="The runs to compare, by name (DNS-1123).")
    ptq: PtqParams = Field(default_factory=PtqParams, description="PTQ calibration settings.")
    export: ExportParams = Field(default_factory=ExportParams, description="Export settings.")
    eval: EvalParams = Field(default_factory=EvalParams, description="Evaluation settings.")
    report: ReportParams = Field(default_factory=ReportParams, description="Report settings.")
    resources: dict[str, Resources] = Field(
        default_factory=_default_resources,
        description="Per stage kind: nodes, GPUs, CPUs, memory, time limit.",
    )
    images: ImagesConfig = Field(default_factory=ImagesConfig, description="Container images.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    k8s: K8sSettings | None = Field(None, description="Kubernetes settings (--cluster k8s).")
    slurm: SlurmSettings | None = Field(
        None, description="Slurm placement and environment (submit/render --cluster slurm)."
    )
    nemo_run: NemoRunSettings | None = Field(
        None, description="NeMo-Run executor and stage environment (submit/render --cluster nemo-run)."
    )
    # Each enabled run's merged params, built once by `_run_references`; study.py reads them here.
    _train: dict[str, TrainStageParams] = PrivateAttr(default_factory=dict)
    _export: dict[str, ExportParams] = PrivateAttr(default_factory=dict)
    _resources: dict[str, Resources] = PrivateAttr(default_factory=dict)

    @field_validator("study")
    @classmethod
    def _dns_study(cls, value: str) -> str:
        if not is_dns1123_label(value) or len(value) > 40:
            raise ValueError(f"'{value}' must be a DNS-1123 label of at most 40 characters")
        return value

    @field_validator("runs")
    @classmethod
    def _run_names(cls, runs: dict[str, RunConfig]) -> dict[str, RunConfig]:
        for name in runs:
            if not is_dns1123_label(name) or len(name) > MAX_RUN_NAME:
                raise ValueError(
                    f"run name '{name}' must be a DNS-1123 label (lowercase, digits, '-') "
                    f"of at most {MAX_RUN_NAME} characters"
                )
        if not any(run.enabled for run in runs.values()):
            raise ValueError("no enabled run: enable at least one")
        return runs

    @field_validator("resources", mode="before")
    @classmethod
    def _resources_for_every_kind(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        unknown = sorted(set(value) - set(STAGE_KINDS))
        if unknown:
            raise ValueError(f"unknown stage kind '{unknown[0]}'; known: {', '.join(STAGE_KINDS)}")
        return {kind: value.get(kind, {}) for kind in STAGE_KINDS}

    @field_validator("model_revision")
    @classmethod
    def _revision_of_a_hub_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        model = info.data.get("model")  # absent: the model's own error is reported
        if value is not None and isinstance(model, str) and ExternalInput("model", model).is_local:
            raise ValueError(f"model {model} is a local path; a revision pins hub ids only (drop it: "
                             "local content is fingerprinted)")
        return value

    @model_validator(mode="after")
    def _run_references(self) -> StudyConfig:
        enabled = {name for name, run in self.runs.items() if run.enabled}
        for name, run in self.runs.items():
            if not run.enabled:
                continue
            for field_name in ("init_from", "teacher"):
                target = getattr(run, field_name)
                if target != BASE_MODEL and target not in enabled:
                    raise ValueError(
                        f"runs.{name}.{field_name}: '{target}' is not 'base' or an enabled run "
                        f"({', '.join(sorted(enabled))})"
                    )
            if run.evaluate and not run.export:
                raise ValueError(f"runs.{name}.evaluate: needs export: true (eval reads the export)")
            merged_train = {**self.train.model_dump(), **run.train,
                            "recipe": run.recipe, "backend": run.backend, "method": run.method}
            self._train[name] = _validated(TrainStageParams, merged_train, f"runs.{name}.train")
            self._export[name] = _validated(ExportParams, {**self.export.model_dump(), **run.export_overrides},
                                            f"runs.{name}.export_overrides")
            self._resources[name] = _validated(Resources, {**self.resources["train"].model_dump(), **run.resources},
                                               f"runs.{name}.resources")
        return self

    def train_params(self, run_name: str) -> TrainStageParams:
        """An enabled run's train params: the study's train settings with the run's overrides,
        recipe, backend and method (validated once, with the config)."""
        return self._train[run_name]

    def export_params(self, run_name: str) -> ExportParams:
        """An enabled run's export settings with its `export_overrides`."""
        return self._export[run_name]

    def run_resources(self, run_name: str) -> Resources:
        """An enabled run's train resources with its `resources` overrides."""
        return self._resources[run_name]


def _validated(model: type[ParamsT], data: dict[str, Any], where: str) -> ParamsT:
    try:
        return model.model_validate(data)
    except Exception as error:
        raise ValueError(f"{where}: {_first_error(error)}") from None


def _first_error(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return one_line(error)
    return str(error).splitlines()[0]
