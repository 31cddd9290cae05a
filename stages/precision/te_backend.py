"""The `te` backend: nn.Linear -> transformer_engine.pytorch.Linear, run under te.autocast.

Recipe mapping (TE >= 2.x; see NUMERICS.md):
  fp8 (current, HYBRID)      -> Float8CurrentScaling(fp8_format=Format.HYBRID, fp8_gemm_{fprop,dgrad,wgrad}=
                                MMParams(use_split_accumulator=not <gemm>.fast_accumulation))
  fp8_delayed                -> DelayedScaling(fp8_format=Format.HYBRID, amax_history_len, amax_compute_algo);
                                its accumulation is fixed in TE (fprop fast, dgrad/wgrad split): a recipe
                                asking for another gets a one-line error
  mxfp8 (all GEMMs)          -> MXFP8BlockScaling(fp8_format=Format.E4M3)
  nvfp4 (all GEMMs)          -> NVFP4BlockScaling(disable_rht/stochastic_rounding/2d from the recipe)
  anything else              -> CustomRecipe(qfactory) built from the operand specs (per-tensor FP8
     GEMMs accumulate as in DelayedScaling, checked the same way): per TE tensor
     role, rowwise = the fprop (input, weight) or dgrad (grad_output) operand, columnwise = the
     dgrad (weight) or wgrad (input, grad_output) operand; different specs -> HybridQuantizer,
     with columnwise_source "original" (TE style) or "rowwise_dequantized" (QAT style).
Not testable here (no TE, no Blackwell): only the one-line errors are tested.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from contract.compat import te_refusal
from contract.recipe import GEMM_OPERANDS, PER_TENSOR_FORMATS, OperandSpec, Recipe
from stages.precision.errors import PrecisionUnavailable
from stages.precision.surgery import linear_names, replace_module

_SUPPORT_CHECKS = {  # format family -> (TE checker name, what it needs)
    "fp8": ("check_fp8_support", "FP8 (Hopper or newer)"),
    "mxfp8": ("check_mxfp8_support", "MXFP8 (Blackwell)"),
    "nvfp4": ("check_nvfp4_support", "NVFP4 (Blackwell)"),
}


def _family(fmt: str) -> str | None:
    if fmt.startswith("fp8"):
        return "fp8"
    if fmt.startswith("mxfp8"):
        return "mxfp8"
    return "nvfp4" if fmt == "nvfp4" else None


def import_te(recipe: Recipe) -> Any:
    try:
        import transformer_engine.pytorch as te
    except ImportError as error:
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: backend te needs Transformer Engine, which is not importable "
            f"here ({str(error).splitlines()[0]}); choose backend emulated"
        ) from None
    return te


def check_support(recipe: Recipe) -> None:
    """TE's own availability checks, turned into one-line errors naming the alternative."""
    try:
        import transformer_engine.pytorch.quantization as te_quantization
    except ImportError:  # TE before the module was renamed keeps the checks in .fp8
        import transformer_engine.pytorch.fp8 as te_quantization

    for family in sorted({_family(f) for f in recipe.formats} - {None}):
        checker_name, needs = _SUPPORT_CHECKS[family]
        checker = getattr(te_quantization, checker_name, None)
        if checker is None:
            raise PrecisionUnavailable(
                f"recipe {recipe.name}: backend te: this Transformer Engine ({te_version()}) has no "
                f"{family.upper()} support; choose backend emulated"
            )
        available, reason = checker()
        if not available:
            raise PrecisionUnavailable(
                f"recipe {recipe.name}: backend te needs {needs} ({family.upper()} unsupported: "
                f"{reason.strip() or 'no reason given'}); choose backend emulated"
            )


def _all_same(recipe: Recipe, **fields: Any) -> bool:
    specs = [op for _, op in recipe.operands()]
    return all(all(getattr(op, k) == v for k, v in fields.items()) for op in specs)


def native_te_recipe(recipe: Recipe) -> Any | None:
    """TE's built-in recipe object when the recipe is exactly one of them, else None."""
    from transformer_engine.common import recipe as te_recipe

    ops = dict(recipe.operands())
    fwd = [ops[("fprop", "input")], ops[("fprop", "weight")], ops[("dgrad", "weight")], ops[("wgrad", "input")]]
    grads = [ops[("dgrad", "grad_output")], ops[("wgrad", "grad_output")]]
    if recipe.backward_source != "original":
        return None
    hybrid_fp8 = all(o.format == "fp8_e4m3" for o in fwd) and all(o.format == "fp8_e5m2" for o in grads)
    if hybrid_fp8 and _all_same(recipe, scaling="current"):
        split = {gemm: te_recipe.MMParams(use_split_accumulator=not getattr(recipe, gemm).fast_accumulation)
                 for gemm in ("fprop", "dgrad", "wgrad")}
        return te_recipe.Float8CurrentScaling(
            fp8_format=te_recipe.Format.HYBRID,
            fp8_gemm_fprop=split["fprop"], fp8_gemm_dgrad=split["dgrad"], fp8_gemm_wgrad=split["wgrad"],
        )
    first = fwd[0]
    if hybrid_fp8 and all(o.scaling == "delayed" and o.amax_history_len == first.amax_history_len
                          and o.amax_compute_algo == first.amax_compute_algo for o in fwd + grads):
        _check_fixed_accumulation(recipe, "DelayedScaling")
        return te_recipe.DelayedScaling(
            fp8_format=te_recipe.Format.HYBRID,
            amax_history_len=first.amax_history_len,
            amax_compute_algo=first.amax_compute_algo,
        )
    if _all_same(recipe, format="mxfp8", scale_rounding="rceil"):
        return te_recipe.MXFP8BlockScaling(fp8_format=te_recipe.Format.E4M3)
    if recipe.formats == {"nvfp4"} and _nvfp4_expressible_natively(recipe):
        return te_recipe.NVFP4BlockScaling(
            disable_rht=not recipe.wgrad.input.hadamard,
            disable_stochastic_rounding=not recipe.wgrad.grad_output.stochastic_rounding,
            disable_2d_quantization=not recipe.fprop.weight.block_2d,
        )
    return None


# How TE accumulates per-tensor FP8 GEMMs outside Float8CurrentScaling (its _2X_ACC_* constants).
_TE_FIXED_FAST_ACCUMULATION = {"fprop": True, "dgrad": False, "wgrad": False}


def _check_fixed_accumulation(recipe: Recipe, te_path: str) -> None:
    """A per-tensor FP8 GEMM whose fast_accumulation TE would not honour: one-line error."""
    for gemm, te_fast in _TE_FIXED_FAST_ACCUMULATION.items():
        spec = getattr(recipe, gemm)
        per_tensor = all(getattr(spec, op).format in PER_TENSOR_FORMATS for op in GEMM_OPERANDS[gemm])
        if per_tensor and spec.fast_accumulation != te_fast:
            raise PrecisionUnavailable(
                f"recipe {recipe.name}: backend te's {te_path} accumulates FP8 fprop fast and dgrad/wgrad in "
                f"FP32, fixed; set {gemm}.fast_accumulation: {str(te_fast).lower()} or choose backend emulated"
            )


def _nvfp4_expressible_natively(recipe: Recipe) -> bool:
    """NVFP4BlockScaling has three switches: 2-D blocks on the weight (both uses), RHT on the
    wgrad operands, stochastic rounding on the gradients. Anything else needs CustomRecipe."""
    ops = dict(recipe.operands())
    weights = (ops[("fprop", "weight")], ops[("dgrad", "weight")])
    grads = (ops[("dgrad", "grad_output")], ops[("wgrad", "grad_output")])
    inputs = (ops[("fprop", "input")], ops[("wgrad", "input")])
    return (
        weights[0].block_2d == weights[1].block_2d
        and grads[0].stochastic_rounding == grads[1].stochastic_rounding
        and not any(op.stochastic_rounding for op in weights + inputs)
    )


def te_quantizer(spec: OperandSpec, recipe: Recipe) -> Any:
    """One TE quantizer for one operand spec (CustomRecipe path)."""
    from transformer_engine.pytorch.constants import DType

    fmt = spec.format
    if fmt == "bf16":
        from transformer_engine.pytorch.tensor.identity_tensor import IdentityQuantizer

        return IdentityQuantizer()
    if fmt in ("fp8_e4m3", "fp8_e5m2"):
        if spec.scaling == "delayed":
            raise PrecisionUnavailable(
                f"recipe {recipe.name}: backend te runs delayed scaling only as the plain HYBRID "
                "DelayedScaling recipe on every operand; choose backend emulated"
            )
        from transformer_engine.pytorch.tensor.float8_tensor import (
            Float8CurrentScalingQuantizer,
        )

        dtype = DType.kFloat8E4M3 if fmt == "fp8_e4m3" else DType.kFloat8E5M2
        return Float8CurrentScalingQuantizer(
            fp8_dtype=dtype, device=torch.device("cuda"), force_pow_2_scales=False, amax_epsilon=0.0
        )
    if fmt in ("mxfp8", "mxfp8_e5m2"):
        if spec.scale_rounding != "rceil":
            raise PrecisionUnavailable(
                f"recipe {recipe.name}: backend te rounds MX scales rceil only; choose backend emulated"
            )
        from transformer_engine.pytorch.tensor.mxfp8_tensor import MXFP8Quantizer

        return MXFP8Quantizer(fp8_dtype=DType.kFloat8E4M3 if fmt == "mxfp8" else DType.kFloat8E5M2)
    if fmt == "nvfp4":
        from transformer_engine.pytorch.tensor.nvfp4_tensor import NVFP4Quantizer

        return NVFP4Quantizer(
            fp4_dtype=DType.kFloat4E2M1,
            with_rht=spec.hadamard,
            with_post_rht_amax=spec.hadamard,
            with_2d_quantization=spec.block_2d,
            stochastic_rounding=spec.stochastic_rounding,
        )
    raise PrecisionUnavailable(f"recipe {recipe.name}: backend te has no {fmt}; choose backend torchao")


# TE tensor role -> (rowwise operand, columnwise operand) of our recipe.
_ROLE_OPERANDS = {
    "input": (("fprop", "input"), ("wgrad", "input")),
    "weight": (("fprop", "weight"), ("dgrad", "weight")),
    "grad_output": (("dgrad", "grad_output"), ("wgrad", "grad_output")),
}


def custom_te_recipe(recipe: Recipe) -> Any:
    from transformer_engine.common import recipe as te_recipe

    try:
        from transformer_engine.pytorch.tensor.hybrid_tensor import HybridQuantizer
    except ImportError:
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: backend te needs HybridQuantizer (TE newer than 2.18) for "
            "different forward/backward formats; choose backend emulated"
        ) from None
    _check_fixed_accumulation(recipe, "CustomRecipe")
    ops = dict(recipe.operands())
    source = "original" if recipe.backward_source == "original" else "rowwise_dequantized"

    def qfactory(role: Any) -> Any:
        tensor_type = getattr(role, "tensor_type", "") if role is not None else ""
        if tensor_type not in _ROLE_OPERANDS:
            # Outputs, grad_input and non-linear roles stay high precision.
            return te_quantizer(OperandSpec(), recipe)
        row_key, col_key = _ROLE_OPERANDS[tensor_type]
        row, col = ops[row_key], ops[col_key]
        if row == col and not (tensor_type != "grad_output" and source == "rowwise_dequantized"):
            return te_quantizer(row, recipe)
        # Gradients are never taken from a dequantized value (TE's own advice).
        role_source = "original" if tensor_type == "grad_output" else source
        return HybridQuantizer(
            rowwise_quantizer=te_quantizer(row, recipe),
            columnwise_quantizer=te_quantizer(col, recipe),
            columnwise_source=role_source,
        )

    return te_recipe.CustomRecipe(qfactory=qfactory)


def _te_linear(te: Any, linear: nn.Linear) -> nn.Module:
    new = te.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        params_dtype=linear.weight.dtype,
        device=linear.weight.device,
    )
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def convert_te(model: nn.Module, recipe: Recipe) -> Callable[[], contextlib.AbstractContextManager]:
    """Swaps the linears, returns the autocast factory. Raises PrecisionUnavailable first."""
    refusal = te_refusal(recipe)
    if refusal:
        raise PrecisionUnavailable(refusal)
    te = import_te(recipe)
    if not hasattr(te, "autocast"):
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: backend te needs a Transformer Engine with te.autocast "
            f"(found {te_version()}); choose backend emulated"
        )
    check_support(recipe)
    te_recipe_obj = None if recipe.is_high_precision else (native_te_recipe(recipe) or custom_te_recipe(recipe))
    for name in linear_names(model, recipe):
        replace_module(model, name, _te_linear(te, model.get_submodule(name)))

    @contextlib.contextmanager
    def autocast() -> Iterator[None]:
        if te_recipe_obj is None:
            yield
            return
        with te.autocast(enabled=True, recipe=te_recipe_obj):
            yield

    return autocast


def te_version() -> str:
    from importlib.metadata import version

    return version("transformer_engine")
