"""Recipes are data: built-ins, a user's YAML, and one-line errors for bad ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contract.recipe import RecipeError, builtin_recipe_names, load_recipe

BUILTINS = [
    "bf16",
    "fp8",
    "fp8_delayed",
    "int4_weight_only",
    "int8_dyn_act_int4_weight",
    "mxfp8",
    "nv4f_mx8b",
    "nvfp4_qat",
]


def test_builtin_names_are_exact_and_each_loads_under_its_own_name() -> None:
    assert builtin_recipe_names() == BUILTINS
    for name in BUILTINS:
        assert load_recipe(name).name == name


def test_fp8_is_hybrid_current_scaling_on_all_three_gemms() -> None:
    recipe = load_recipe("fp8")
    formats = {f"{gemm}.{op}": spec.format for (gemm, op), spec in recipe.operands()}
    assert formats == {
        "fprop.input": "fp8_e4m3",
        "fprop.weight": "fp8_e4m3",
        "dgrad.grad_output": "fp8_e5m2",
        "dgrad.weight": "fp8_e4m3",
        "wgrad.grad_output": "fp8_e5m2",
        "wgrad.input": "fp8_e4m3",
    }
    assert {spec.scaling for _, spec in recipe.operands()} == {"current"}
    assert recipe.inference_format == "fp8"
    # As Transformer Engine's Float8CurrentScaling: fprop fast, dgrad and wgrad promoted to FP32.
    assert (recipe.fprop.fast_accumulation, recipe.dgrad.fast_accumulation, recipe.wgrad.fast_accumulation) == (
        True, False, False
    )
    assert recipe.gemm_summary() == (
        "fprop=fp8_e4m3,fp8_e4m3+fast_accumulation dgrad=fp8_e5m2,fp8_e4m3 wgrad=fp8_e5m2,fp8_e4m3 (original)"
    )


def test_fp8_delayed_is_the_seeds_ds_recipe() -> None:
    recipe = load_recipe("fp8_delayed")
    assert recipe.uses_delayed_scaling
    assert {(s.scaling, s.amax_history_len, s.amax_compute_algo) for _, s in recipe.operands()} == {
        ("delayed", 1024, "max")
    }


def test_mx_and_nvfp4_builtins() -> None:
    mxfp8 = load_recipe("mxfp8")
    assert {(s.format, s.block, s.scale_format, s.scale_rounding) for _, s in mxfp8.operands()} == {
        ("mxfp8", 32, "e8m0", "rceil")
    }
    mixed = load_recipe("nv4f_mx8b")
    assert (mixed.fprop.input.format, mixed.fprop.weight.format) == ("nvfp4", "nvfp4")
    assert mixed.fprop.input.scale_format == "e4m3_fp32" and mixed.fprop.input.block == 16
    assert {s.format for (gemm, _), s in mixed.operands() if gemm != "fprop"} == {"mxfp8"}
    assert mixed.backward_source == "original"
    assert mixed.gemm_summary() == "fprop=nvfp4,nvfp4 dgrad=mxfp8,mxfp8 wgrad=mxfp8,mxfp8 (original)"
    assert mixed.fprop.input.nvfp4_arithmetic == "torchao"  # TE's
    qat = load_recipe("nvfp4_qat")
    assert qat.fprop.input.nvfp4_arithmetic == qat.fprop.weight.nvfp4_arithmetic == "modelopt"
    assert qat.backward_source == "forward_quantized"
    assert {s.format for (gemm, _), s in qat.operands() if gemm != "fprop"} == {"bf16"}
    assert qat.high_precision == ["lm_head", "*embed*"]


def test_int_builtins_are_delayed_qat_with_groups_of_256() -> None:
    for name in ("int4_weight_only", "int8_dyn_act_int4_weight"):
        recipe = load_recipe(name)
        assert recipe.fprop.weight.format == "int4" and recipe.fprop.weight.group_size == 256
        assert recipe.fake_quant_after_steps > 0
    assert load_recipe("int8_dyn_act_int4_weight").fprop.input.format == "int8"


def test_user_yaml_nvfp4_fprop_with_fp8_backward_needs_no_code(tmp_path: Path) -> None:
    path = tmp_path / "nv4f_fp8b.yaml"
    path.write_text(
        "fprop: nvfp4\n"
        "dgrad: {grad_output: fp8_e5m2, weight: fp8_e4m3}\n"
        "wgrad: {grad_output: {format: fp8_e5m2, scaling: delayed, amax_history_len: 16}, input: fp8_e4m3}\n"
        "high_precision: [lm_head, '*embed*', 'model.layers.0.*']\n"
        "inference_format: nvfp4\n"
    )
    recipe = load_recipe(str(path))
    assert recipe.name == "nv4f_fp8b"  # named after its file
    assert recipe.fprop.weight.format == "nvfp4"
    assert recipe.dgrad.grad_output.format == "fp8_e5m2" and recipe.dgrad.weight.format == "fp8_e4m3"
    assert recipe.wgrad.grad_output.amax_history_len == 16 and recipe.wgrad.input.scaling == "current"
    assert recipe.formats == {"nvfp4", "fp8_e4m3", "fp8_e5m2"}


BAD = {
    "fprop: nvfp5\n": "fprop.input.format: 'nvfp5' is not one of bf16, fp8_e4m3, fp8_e5m2, mxfp8, "
    "mxfp8_e5m2, nvfp4, int4, int8",
    "fprop: {input: mxfp8, wieght: mxfp8}\n": "fprop.wieght: unknown key",
    "dgrad: {grad_output: {format: mxfp8, scaling: delayed}}\n": "dgrad.grad_output: scaling 'delayed' "
    "needs a per-tensor format (fp8_e4m3, fp8_e5m2), not 'mxfp8'",
    "fprop: {input: {format: mxfp8, block_size: 16}}\n": "fprop.input: block_size 16 is not supported "
    "for 'mxfp8' (must be 32)",
    "fprop: {weight: {format: int4, group_size: 256}}\n": "int4/int8 formats are QAT fake quant: set "
    "backward_source: forward_quantized",
    "inference_format: fp6\n": "inference_format: 'fp6' is not one of bf16, fp8, mxfp8, nvfp4, int4, int8_int4",
    "wgrad: {grad_output: {format: nvfp4, hadamard: true}, input: nvfp4}\n": "wgrad.hadamard: set it on "
    "both grad_output and input (the rotations must cancel)",
    "fprop: {input: {format: fp8_e4m3, amax_history_len: 0}}\n": "fprop.input.amax_history_len: Input "
    "should be greater than or equal to 1",
    "fprop: {input: {format: mxfp8, stochastic_rounding: true}}\n": "fprop.input: stochastic_rounding is "
    "only supported for 'nvfp4', not 'mxfp8'",
    "fprop: {input: {format: mxfp8, nvfp4_arithmetic: modelopt}}\n": "fprop.input: nvfp4_arithmetic is only "
    "for 'nvfp4', not 'mxfp8'",
    "fprop: {format: nvfp4, nvfp4_arithmetic: modelopt, block_2d: true}\n": "fprop.input: nvfp4_arithmetic "
    "'modelopt' has no block_2d (ModelOpt's fake quant does not)",
    "fprop: {format: nvfp4, nvfp4_arithmetic: ieee}\n": "fprop.input.nvfp4_arithmetic: Input should be "
    "'torchao' or 'modelopt'",
    "fprop: {format: mxfp8, fast_accumulation: true}\n": "fprop.fast_accumulation: only for GEMMs of "
    "per-tensor FP8 operands (fp8_e4m3, fp8_e5m2)",
    "dgrad: {grad_output: fp8_e5m2, weight: fp8_e4m3, fast_accumulation: maybe}\n": "dgrad.fast_accumulation: "
    "Input should be a valid boolean, unable to interpret input",
    "fprop: nvfp4\n  dgrad: x\n": "line 2 mapping values are not allowed here",
    "- a\n": "expected a mapping of fields, got list",
}


@pytest.mark.parametrize("text, message", BAD.items(), ids=range(len(BAD)))
def test_bad_recipe_is_one_line_naming_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as error:
        load_recipe(str(path))
    assert str(error.value) == f"recipe {path}: {message}"
    assert "\n" not in str(error.value)


def test_unknown_builtin_and_missing_file() -> None:
    with pytest.raises(RecipeError, match=r"^recipe nope: no such built-in recipe; choose one of bf16, fp8, "):
        load_recipe("nope")
    with pytest.raises(RecipeError, match=r"^recipe x/none.yaml: file not found$"):
        load_recipe("x/none.yaml")


def test_recipes_load_without_torch() -> None:
    """The control plane validates recipes and must not pay for importing torch."""
    code = (
        "import sys; from stages.precision import load_recipe, builtin_recipe_names;"
        "[load_recipe(n) for n in builtin_recipe_names()];"
        "print(sorted(m for m in ('torch', 'transformers', 'torchao') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
