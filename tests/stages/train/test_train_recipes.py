"""Smoke: the tiny Qwen3 trains under every built-in recipe on CPU, and the recipe is really applied."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from train_testlib import losses

from contract.recipe import RECIPES_DIR
from stages.precision import builtin_recipe_names, load_recipe
from stages.runtime import run_stage
from stages.train.core import run

STEPS = 5
LR = 1e-2
# Backends that run each recipe on a CPU: torchao for the integer QAT recipes, emulated otherwise.
CPU_BACKEND = {"int4_weight_only": "torchao", "int8_dyn_act_int4_weight": "torchao"}


@pytest.fixture(scope="module")
def bf16_curve(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> list[float]:
    """The unquantized model's loss curve with the smoke settings (what every recipe is compared to)."""
    from train_testlib import BASE_PARAMS

    from tests.spec_files import write_spec_file

    out = tmp_path_factory.mktemp("bf16") / "train"
    spec = write_spec_file(out, "train", {**BASE_PARAMS, "steps": STEPS, "lr": LR}, {"data": data_dir})
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    assert run_stage(spec, run) == 0
    for signum, handler in handlers.items():  # module-scoped: the autouse restore runs later
        signal.signal(signum, handler)
    return losses(out)


def _recipe_with_early_fake_quant(name: str, tmp_path: Path) -> str:
    """The built-in recipe, with its QAT delay cut to 2 steps so a 5-step smoke crosses it,
    and int weight groups of 32 (the tiny model's linears have 64 inputs, the study's 256)."""
    data = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    data["fake_quant_after_steps"] = 2
    weight = data.get("fprop", {}).get("weight")
    if isinstance(weight, dict) and weight.get("group_size"):
        weight["group_size"] = 32
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", builtin_recipe_names())
def test_every_builtin_recipe_trains_on_cpu(recipe: str, make_spec, tmp_path: Path, bf16_curve: list[float]) -> None:
    delayed = load_recipe(recipe).fake_quant_after_steps > 0
    source = _recipe_with_early_fake_quant(recipe, tmp_path) if delayed else recipe
    backend = CPU_BACKEND.get(recipe, "emulated")
    spec = make_spec(f"smoke-{recipe.replace('_', '-')}", recipe=source, backend=backend, steps=STEPS, lr=LR)
    assert run_stage(spec, run) == 0
    curve = losses(spec.parent)
    assert len(curve) == STEPS and all(torch.isfinite(torch.tensor(curve)))
    assert curve[-1] < curve[0] - 0.2, curve  # it learns

    if recipe == "bf16":
        assert curve == bf16_curve
    elif delayed:
        # Fake quant off for the first 2 steps (exactly the bf16 curve), on from step 3.
        assert curve[:2] == bf16_curve[:2] and curve[2] != bf16_curve[2]
    else:
        # Quantized forward from step 1: near the bf16 loss but not equal to it.
        assert curve[0] != bf16_curve[0] and abs(curve[0] - bf16_curve[0]) < 0.1

    precision = json.loads((spec.parent / "model" / "precision.json").read_text())
    assert (precision["backend"], precision["recipe"]["name"]) == (backend, recipe)


FP8_QAT_RECIPE = Path(__file__).resolve().parents[3] / "fixtures" / "recipes" / "fp8_qat.yaml"  # modelopt on a CPU


@pytest.mark.slow
def test_modelopt_qat_saves_its_quantizer_state_beside_plain_hf_weights(make_spec, tmp_path: Path) -> None:
    """On CPU ModelOpt runs FP8 fake quant (its NVFP4 needs CUDA): calibrated amaxes are kept."""
    from safetensors.torch import load_file

    recipe = FP8_QAT_RECIPE
    spec = make_spec("modelopt", recipe=str(recipe), backend="modelopt", calib_batches=2, steps=2, val_batches=1)
    assert run_stage(spec, run) == 0
    model_dir = spec.parent / "model"
    precision = json.loads((model_dir / "precision.json").read_text())
    assert precision["backend"] == "modelopt"
    assert precision["files"] == {"quantizer_state": "quantizer_state.safetensors", "modelopt_state.pt": "modelopt_state.pt"}
    amax = load_file(str(model_dir / "quantizer_state.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight_quantizer._amax" in amax
    assert all(v.abs().max() > 0 for k, v in amax.items() if k.endswith("_amax"))
    weights = load_file(str(model_dir / "model.safetensors"))
    assert not any("quantizer" in k for k in weights)  # plain HF names only
    assert "modelopt_state_dict" in torch.load(model_dir / "modelopt_state.pt", weights_only=False)


@pytest.mark.slow
def test_modelopt_qat_from_a_modelopt_ptq_restores_its_quantizers(make_spec, tmp_path: Path, data_dir: Path) -> None:
    """ModelOpt's QAT flow: quantizers and calibrated amax restored from the PTQ run (which
    eval-ptq measured), not calibrated again on other batches. The amax stay fixed in training."""
    from safetensors.torch import load_file

    from contract.tracking import read_events
    from stages.ptq.core import run as ptq
    from tests.stages.ptq.quant_testkit import TINY_MODEL, stage_spec

    recipe = FP8_QAT_RECIPE
    ptq_params = {"recipe": str(recipe), "backend": "modelopt", "model": str(TINY_MODEL), "calib_samples": 3,
                  "device": "cpu", "dtype": "float32"}
    assert run_stage(stage_spec(tmp_path / "ptq", "ptq", {"data": data_dir}, ptq_params), ptq) == 0
    qat = {"recipe": str(recipe), "backend": "modelopt", "calib_batches": 2, "steps": 2, "val_batches": 1}
    from_ptq = make_spec("from-ptq", inputs={"model": tmp_path / "ptq"}, **{**qat, "model": None})
    calibrated = make_spec("calibrated", **qat)
    assert run_stage(from_ptq, run) == 0 and run_stage(calibrated, run) == 0

    def input_amax(stage_dir: Path) -> dict[str, float]:
        state = load_file(str(stage_dir / "model" / "quantizer_state.safetensors"))
        return {k: v.item() for k, v in state.items() if k.endswith("input_quantizer._amax")}

    assert len(input_amax(tmp_path / "ptq")) == 14
    assert input_amax(from_ptq.parent) == input_amax(tmp_path / "ptq")
    assert input_amax(calibrated.parent) != input_amax(tmp_path / "ptq")  # other batches, other amax
    tags = {k: v for e in read_events(from_ptq.parent) if e["type"] == "tags" for k, v in e["tags"].items()}
    assert tags["modelopt_quantizers"] == f"restored from {tmp_path / 'ptq' / 'model'}"
