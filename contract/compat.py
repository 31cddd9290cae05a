"""What each backend can run, judged from the recipe alone.

Torch-free: the control plane checks every run of a study with it before anything is
submitted (`pipeline validate`), and each backend raises the very same line when asked anyway.
Whether the machine can (GPU generation, installed packages) is each backend's own check at
run time; `python -m stages.precision` tries both on the machine at hand.
"""

from __future__ import annotations

from collections.abc import Callable

from contract.formats import EMULATED_FORMATS, INT_FORMATS, PER_TENSOR_FORMATS
from contract.recipe import OperandSpec, Recipe

MODELOPT_PRESETS = {"nvfp4": "NVFP4_DEFAULT_CFG", "fp8_e4m3": "FP8_DEFAULT_CFG", "mxfp8": "MXFP8_DEFAULT_CFG"}


def emulated_refusal(recipe: Recipe) -> str | None:
    unsupported = sorted(recipe.formats - set(EMULATED_FORMATS))
    if unsupported:
        return (f"recipe {recipe.name}: backend emulated does not implement {', '.join(unsupported)} "
                "fake quant; choose backend torchao")
    return None


def te_refusal(recipe: Recipe) -> str | None:
    """What TE cannot express whatever its version; its per-GPU support is te_backend's check."""
    unsupported = sorted(recipe.formats & set(INT_FORMATS))
    if unsupported:
        return f"recipe {recipe.name}: backend te has no {', '.join(unsupported)} training; choose backend torchao"
    if recipe.fake_quant_after_steps:
        return f"recipe {recipe.name}: backend te has no delayed fake quant; choose backend emulated"
    if any(op.nvfp4_arithmetic == "modelopt" for _, op in recipe.operands()):
        return (f"recipe {recipe.name}: backend te quantizes NVFP4 in its own arithmetic, not ModelOpt's; "
                "set nvfp4_arithmetic: torchao or choose backend emulated")
    return None


def torchao_refusal(recipe: Recipe) -> str | None:
    weight, act = recipe.fprop.weight, recipe.fprop.input
    if (
        weight.format in INT_FORMATS
        and act.format in ("bf16", *INT_FORMATS)
        and all(op.format == "bf16" for (gemm, _), op in recipe.operands() if gemm != "fprop")
    ):
        return None
    return (f"recipe {recipe.name}: backend torchao runs only int4/int8 fprop QAT recipes "
            "(int weight, int or bf16 activation, bf16 backward); choose backend emulated or te")


def modelopt_preset(recipe: Recipe) -> str | None:
    """The ModelOpt config (`mtq.<name>`) that is exactly this recipe, or None."""
    return None if _nvfp4_not_in_modelopts_arithmetic(recipe) else _preset_of_the_same_shape(recipe)


def _preset_of_the_same_shape(recipe: Recipe) -> str | None:
    """The ModelOpt config with this recipe's formats and scaling, NVFP4's arithmetic aside."""
    fprop = {recipe.fprop.input.format, recipe.fprop.weight.format}
    backward = {op.format for (gemm, _), op in recipe.operands() if gemm != "fprop"}
    plain = all(
        op.model_copy(update={"nvfp4_arithmetic": "torchao"}) == OperandSpec(format=op.format)
        for (gemm, _), op in recipe.operands()
        if gemm == "fprop"
    )
    if (
        len(fprop) == 1
        and (fmt := next(iter(fprop))) in MODELOPT_PRESETS
        and backward == {"bf16"}
        and recipe.backward_source == "forward_quantized"
        and plain
        and recipe.fake_quant_after_steps == 0
    ):
        return MODELOPT_PRESETS[fmt]
    return None


def _nvfp4_not_in_modelopts_arithmetic(recipe: Recipe) -> bool:
    return any(op.format == "nvfp4" and op.nvfp4_arithmetic != "modelopt" for _, op in recipe.operands())


def modelopt_refusal(recipe: Recipe) -> str | None:
    if _preset_of_the_same_shape(recipe) is None:
        return (f"recipe {recipe.name}: backend modelopt runs only fake-quantized forward GEMMs (nvfp4, "
                "fp8_e4m3 or mxfp8 on both operands) with a bf16 straight-through backward; choose backend emulated")
    if _nvfp4_not_in_modelopts_arithmetic(recipe):
        return (f"recipe {recipe.name}: backend modelopt quantizes NVFP4 in ModelOpt's arithmetic; set "
                "nvfp4_arithmetic: modelopt (as recipe nvfp4_qat does) or choose backend emulated")
    return None


def _per_tensor_scaling(spec: OperandSpec) -> tuple[str, str, int, str]:
    """What decides a per-tensor FP8 operand's bits: its format and how its scale is found."""
    delayed = spec.scaling == "delayed"
    return spec.format, spec.scaling, spec.amax_history_len if delayed else 0, spec.amax_compute_algo if delayed else ""


def scaled_mm_refusal(recipe: Recipe) -> str | None:
    ops = dict(recipe.operands())
    # Each tensor is quantized once for both GEMMs that read it (x: fprop and wgrad; W: fprop and
    # dgrad; dy: dgrad and wgrad), so both must ask for the same bits.
    pairs = {"x in fprop and wgrad": (("fprop", "input"), ("wgrad", "input")),
             "W in fprop and dgrad": (("fprop", "weight"), ("dgrad", "weight")),
             "dy in dgrad and wgrad": (("dgrad", "grad_output"), ("wgrad", "grad_output"))}
    differing = [name for name, (a, b) in pairs.items() if _per_tensor_scaling(ops[a]) != _per_tensor_scaling(ops[b])]
    problem = None
    if any(spec.format not in PER_TENSOR_FORMATS for spec in ops.values()):
        problem = "needs per-tensor FP8 (current or delayed scaling) on all six operands"
    elif differing:
        problem = f"needs the same format and scaling for {differing[0]}"
    elif recipe.backward_source != "original":
        problem = "runs backward_source original only"
    elif recipe.fake_quant_after_steps:
        problem = "has no delayed start (fake_quant_after_steps must be 0)"
    else:
        x, w, g = (ops[k].format for k in (("fprop", "input"), ("fprop", "weight"), ("dgrad", "grad_output")))
        if x == w == "fp8_e5m2" or ("fp8_e5m2" in (x, w) and g == "fp8_e5m2"):
            problem = "cannot multiply two E5M2 operands (cuBLASLt has no E5M2 x E5M2 GEMM)"
    if problem:
        return f"recipe {recipe.name}: backend scaled_mm {problem}; choose backend emulated"
    return None


REFUSALS: dict[str, Callable[[Recipe], str | None]] = {
    "emulated": emulated_refusal,
    "te": te_refusal,
    "modelopt": modelopt_refusal,
    "torchao": torchao_refusal,
    "scaled_mm": scaled_mm_refusal,
}


def recipe_refusal(recipe: Recipe, backend: str) -> str | None:
    """None when `backend` can run `recipe` (given a machine that has what it needs), else why not."""
    return REFUSALS[backend](recipe)
