"""TrainParams (a study's `train:` section) and TrainStageParams (what the train stage receives: the
run's recipe by value): what the control plane validates once."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from contract.params.train import QadParams, TrainParams, TrainStageParams


def test_defaults_are_a_valid_smoke_config() -> None:
    params = TrainStageParams(recipe="bf16")
    assert (params.method, params.recipe.name, params.backend) == ("sft", "bf16", "emulated")
    assert params.recipe.fprop.input.format == "bf16"  # the recipe itself, not its name
    assert params.global_batch % params.micro_batch == 0
    assert params.qad.kd_weight == 1.0


def test_every_field_is_described() -> None:
    for model in (TrainStageParams, QadParams):
        undocumented = [name for name, field in model.model_fields.items() if not field.description]
        assert undocumented == []


def test_study_values_validate() -> None:
    params = TrainStageParams.model_validate(
        {"model": "Qwen/Qwen3-8B", "global_batch": 512, "micro_batch": 1, "steps": 200, "lr": 1e-5,
         "val_every": 50, "recipe": "nv4f_mx8b", "backend": "te", "qad": {"temperature": 2.0}}
    )
    assert params.qad.temperature == 2.0 and params.betas == (0.9, 0.95)
    assert params.recipe.name == "nv4f_mx8b" and params.recipe.fprop.input.format == "nvfp4"


def test_a_study_train_section_has_no_recipe_the_run_sets_it() -> None:
    with pytest.raises(ValidationError, match="recipe"):
        TrainParams.model_validate({"recipe": "fp8"})


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"global_batch": 6, "micro_batch": 4}, "global_batch (6) must be a multiple of micro_batch (4)"),
        ({"warmup_steps": 20, "steps": 10}, "warmup_steps (20) exceeds steps (10)"),
        ({"schedule": "step"}, "schedule"),
        ({"learning_rate": 1e-4}, "learning_rate"),
        ({"qad": {"kd_weight": 1.5}}, "kd_weight"),
    ],
)
def test_bad_values_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ValidationError) as error:
        TrainParams.model_validate(raw)
    assert field in str(error.value)


def test_params_module_imports_no_torch() -> None:
    code = "import sys, contract.params.train; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
