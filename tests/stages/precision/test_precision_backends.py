"""Backends are chosen explicitly; one that cannot run a recipe says so in one line."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from precision_helpers import recipe_with, tiny_qwen3
from torch import nn

from stages.precision import PrecisionUnavailable, load_recipe, prepare_model
from stages.precision.emulated import QuantizedLinear


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TE is installed")
def test_te_missing_is_one_line_naming_emulated() -> None:
    with pytest.raises(PrecisionUnavailable) as error:
        prepare_model(tiny_qwen3(), load_recipe("mxfp8"), "te")
    assert str(error.value) == (
        "recipe mxfp8: backend te needs Transformer Engine, which is not importable here "
        "(No module named 'transformer_engine'); choose backend emulated"
    )


def test_te_refuses_an_accumulation_its_delayed_scaling_cannot_do() -> None:
    from stages.precision.te_backend import _check_fixed_accumulation

    _check_fixed_accumulation(load_recipe("fp8_delayed"), "DelayedScaling")  # TE's own choice: fine
    exact_fprop = recipe_with("fp8_delayed", fprop={**load_recipe("fp8_delayed").fprop.model_dump(), "fast_accumulation": False})
    with pytest.raises(PrecisionUnavailable) as error:
        _check_fixed_accumulation(exact_fprop, "DelayedScaling")
    assert str(error.value) == (
        "recipe fp8_delayed: backend te's DelayedScaling accumulates FP8 fprop fast and dgrad/wgrad in FP32, "
        "fixed; set fprop.fast_accumulation: true or choose backend emulated"
    )


def test_modelopt_nvfp4_on_cpu_names_emulated() -> None:
    pytest.importorskip("modelopt.torch.quantization")
    with pytest.raises(PrecisionUnavailable) as error:
        prepare_model(tiny_qwen3(), load_recipe("nvfp4_qat"), "modelopt", calibrate=lambda m: None)
    assert str(error.value) == (
        "recipe nvfp4_qat: backend modelopt runs NVFP4 fake quant only on CUDA (model is on cpu); "
        "choose backend emulated"
    )


def test_modelopt_really_fails_nvfp4_on_cpu_which_is_why_we_check_first() -> None:
    """ModelOpt inserts its quantizers on CPU, then fails at the first forward."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    model = nn.Sequential(nn.Linear(32, 32))
    x = torch.randn(4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(x))
    with pytest.raises(AssertionError, match="amax must be a CUDA tensor"):
        model(x)


def test_modelopt_needs_a_calibration_loop_and_a_qat_shaped_recipe() -> None:
    pytest.importorskip("modelopt.torch.quantization")
    with pytest.raises(PrecisionUnavailable, match=r"needs a calibration forward loop"):
        prepare_model(tiny_qwen3(), load_recipe("nvfp4_qat"), "modelopt")
    with pytest.raises(PrecisionUnavailable) as error:
        prepare_model(tiny_qwen3(), load_recipe("nv4f_mx8b"), "modelopt", calibrate=lambda m: None)
    assert str(error.value) == (
        "recipe nv4f_mx8b: backend modelopt runs only fake-quantized forward GEMMs (nvfp4, fp8_e4m3 or "
        "mxfp8 on both operands) with a bf16 straight-through backward; choose backend emulated"
    )


def test_each_backend_says_whose_nvfp4_arithmetic_it_runs() -> None:
    from contract.compat import recipe_refusal

    torchao_qat = recipe_with("nvfp4_qat", fprop="nvfp4")
    assert recipe_refusal(torchao_qat, "modelopt") == (
        "recipe nvfp4_qat: backend modelopt quantizes NVFP4 in ModelOpt's arithmetic; set nvfp4_arithmetic: "
        "modelopt (as recipe nvfp4_qat does) or choose backend emulated"
    )
    assert recipe_refusal(load_recipe("nvfp4_qat"), "te") == (
        "recipe nvfp4_qat: backend te quantizes NVFP4 in its own arithmetic, not ModelOpt's; set "
        "nvfp4_arithmetic: torchao or choose backend emulated"
    )
    for recipe in (torchao_qat, load_recipe("nvfp4_qat")):
        assert recipe_refusal(recipe, "emulated") is None
    assert recipe_refusal(load_recipe("nvfp4_qat"), "modelopt") is None and recipe_refusal(torchao_qat, "te") is None


def test_modelopt_fp8_qat_trains_on_cpu_and_keeps_lm_head(token_batch: torch.Tensor) -> None:
    pytest.importorskip("modelopt.torch.quantization")
    recipe = recipe_with("nvfp4_qat", fprop="fp8_e4m3", inference_format="fp8")
    model = tiny_qwen3()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_model(model, recipe, "modelopt", calibrate=lambda m: m(input_ids=token_batch))
    assert prepared.backend == "modelopt"
    assert len(prepared.converted) == 14 and "lm_head" not in prepared.converted
    assert not model.lm_head.weight_quantizer.is_enabled  # our high_precision glob
    assert model.model.layers[0].mlp.up_proj.weight_quantizer.is_enabled
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    losses = []
    for _ in range(3):
        loss = model(input_ids=token_batch, labels=token_batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert prepared.describe()["nvidia_modelopt_version"] != "not installed"


def test_torchao_names_emulated_for_float_recipes() -> None:
    with pytest.raises(PrecisionUnavailable) as error:
        prepare_model(tiny_qwen3(), load_recipe("mxfp8"), "torchao")
    assert str(error.value) == (
        "recipe mxfp8: backend torchao runs only int4/int8 fprop QAT recipes (int weight, int or bf16 "
        "activation, bf16 backward); choose backend emulated or te"
    )


def test_emulated_converts_before_fsdp2_fully_shard(tmp_path) -> None:
    """One-process gloo group: the converted layers shard and train like nn.Linear under FSDP2."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", world_size=1, rank=0)
    try:
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        prepared = prepare_model(model, load_recipe("fp8_delayed"), "emulated")
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
        model(x).square().mean().backward()
        prepared.on_step(1)  # all-reduces the step's amaxes over the group
        assert isinstance(model[0], QuantizedLinear)
        assert type(model[0].weight).__name__ == "DTensor" and model[0].weight.grad is not None
        assert model[0].quantizers["fprop.input"].history[0].item() == pytest.approx(x.abs().max().item())
    finally:
        dist.destroy_process_group()


def test_delayed_scaling_state_carries_the_amax_history_to_a_fresh_model() -> None:
    def prepared_mlp():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        return model, prepare_model(model, load_recipe("fp8_delayed"), "emulated")

    model, prepared = prepared_mlp()
    assert prepared.state_dict()["0/fprop.input"] == {"history": None, "steps_recorded": 0}
    for step, scale in enumerate([1.0, 3.0], start=1):
        model(torch.full((4, 32), scale)).sum().backward()
        prepared.on_step(step)
    state = prepared.state_dict()
    assert sorted(state) == sorted(f"{layer}/{role}" for layer in ("0", "2") for role in
                                   ("fprop.input", "fprop.weight", "dgrad.grad_output", "dgrad.weight",
                                    "wgrad.grad_output", "wgrad.input"))
    assert state["0/fprop.input"]["history"][:3].tolist() == [3.0, 1.0, 0.0]

    resumed_model, resumed = prepared_mlp()
    resumed.load_state_dict(state)
    x = torch.randn(4, 32)
    assert torch.equal(resumed_model(x), model(x))  # both scale x by the history's max, 3.0

    del state["2/wgrad.input"]
    with pytest.raises(PrecisionUnavailable, match=r"does not fit the recipe \(missing \['2/wgrad.input'\]"):
        resumed.load_state_dict(state)


def test_the_torch_free_format_list_is_what_the_emulated_quantizers_implement() -> None:
    from contract.compat import EMULATED_FORMATS
    from stages.precision.dtypes import FP8_DTYPES, MX_DTYPES

    assert set(EMULATED_FORMATS) == {"bf16", *FP8_DTYPES, *MX_DTYPES, "nvfp4"}
