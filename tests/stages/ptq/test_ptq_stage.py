"""The ptq stage end to end: calibration amax, the checkpoint layout QAT starts from, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contract.markers import read_marker
from stages.ptq.core import run
from stages.runtime import run_stage
from tests.stages.ptq.quant_testkit import TINY_MODEL, linear_names, stage_spec

PARAMS = {"recipe": "nvfp4_qat", "backend": "emulated", "model": str(TINY_MODEL), "calib_samples": 6,
          "calib_batch": 4, "device": "cpu"}


def _first_layer_inputs(data_dir: Path, rows: int) -> dict[str, torch.Tensor]:
    """What layer 0's q_proj and down_proj read, computed from the modules themselves."""
    from transformers import AutoModelForCausalLM

    from stages.batches import TokenSplit

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16).eval()
    batch = TokenSplit(data_dir, "train").rows(list(range(rows)))
    layer = model.model.layers[0]
    captured = {}
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.update(down=a[0]))
    with torch.no_grad():
        hidden = model.model.embed_tokens(batch.input_ids)
        captured["q"] = layer.input_layernorm(hidden)
        model(input_ids=batch.input_ids, position_ids=batch.position_ids)
    return {"q": captured["q"], "down": captured["down"], "q_weight": layer.self_attn.q_proj.weight}


def test_emulated_ptq_records_the_calibration_data_amax(tmp_path: Path, data_dir: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "ptq"
    assert run_stage(stage_spec(out, "ptq", {"data": data_dir}, PARAMS), run) == 0
    assert read_marker(out).state == "succeeded"
    precision = json.loads((out / "model" / "precision.json").read_text())
    assert (precision["method"], precision["backend"], precision["recipe"]["name"]) == ("ptq", "emulated", "nvfp4_qat")
    calibration = precision["calibration"]
    assert (calibration["algorithm"], calibration["samples"], calibration["tokens"]) == ("max", 6, 6 * 32)
    assert sorted(calibration["amax"]) == sorted(linear_names())  # lm_head stays high precision

    seen = _first_layer_inputs(data_dir, rows=6)
    q, down = calibration["amax"]["model.layers.0.self_attn.q_proj"], calibration["amax"]["model.layers.0.mlp.down_proj"]
    assert q["input"] == seen["q"].abs().max().float().item()
    assert down["input"] == seen["down"].abs().max().float().item()
    assert q["weight"] == seen["q_weight"].abs().max().float().item()

    state = load_file(str(out / "model" / "quantizer_state.safetensors"))
    assert state["model.layers.0.self_attn.q_proj.input_quantizer._amax"].item() == q["input"]
    assert state["model.layers.1.mlp.down_proj.weight_quantizer._amax"].dtype == torch.float32
    # Max calibration leaves the weights alone: the checkpoint is the input model, bit for bit.
    saved, original = load_file(str(out / "model" / "model.safetensors")), load_file(str(TINY_MODEL / "model.safetensors"))
    assert sorted(saved) == sorted(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    assert (out / "model" / "tokenizer.json").exists()


def test_modelopt_nvfp4_on_cpu_fails_naming_emulated(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "ptq"
    assert run_stage(stage_spec(out, "ptq", {"data": data_dir}, {**PARAMS, "backend": "modelopt"}), run) == 2
    error = read_marker(out).error
    assert error.startswith("ptq: params.backend:") and "choose backend emulated" in error


def test_a_recipe_without_forward_quantization_is_refused(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "ptq"
    assert run_stage(stage_spec(out, "ptq", {"data": data_dir}, {**PARAMS, "recipe": "bf16"}), run) == 2
    assert "params.recipe: bf16 quantizes no forward GEMM operand" in read_marker(out).error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ModelOpt's NVFP4 calibration needs CUDA")
def test_modelopt_ptq_on_cuda_calibrates_the_same_amax_as_emulated(tmp_path: Path, data_dir: Path) -> None:
    ours, theirs = tmp_path / "emulated", tmp_path / "modelopt"
    cuda = {**PARAMS, "device": "cuda"}
    assert run_stage(stage_spec(ours, "ptq", {"data": data_dir}, cuda), run) == 0
    assert run_stage(stage_spec(theirs, "ptq", {"data": data_dir}, {**cuda, "backend": "modelopt"}), run) == 0
    a = json.loads((ours / "model" / "precision.json").read_text())["calibration"]["amax"]
    b = json.loads((theirs / "model" / "precision.json").read_text())["calibration"]["amax"]
    assert sorted(a) == sorted(b)
    for name in a:
        assert b[name]["weight"] == a[name]["weight"], name
        assert b[name]["input"] == pytest.approx(a[name]["input"], rel=1e-6), name
    assert (theirs / "model" / "modelopt_state.pt").exists()
