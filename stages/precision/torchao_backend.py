"""The `torchao` backend: TorchAO QAT (`quantize_(model, QATConfig(...))`) for int4/int8 recipes.

Prepare: FakeQuantizedLinear with IntxFakeQuantizeConfig built from the recipe's fprop operands
(int8 per-token dynamic activations, int4 weights in groups); backward is torchao's STE.
Delayed fake quant: the fake quantizers stay disabled until `fake_quant_after_steps`.
Convert (for export): back to nn.Linear, then the matching PTQ config
(Int8DynamicActivationIntxWeightConfig or Int4WeightOnlyConfig); `deployment_config` is the same
quantization as a transformers TorchAoConfig, for the export stage's torchao-quantized checkpoint.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from contract.compat import torchao_refusal
from contract.recipe import OperandSpec, Recipe
from stages.precision.errors import PrecisionUnavailable
from stages.precision.surgery import stays_high_precision

_INT_DTYPES = {"int4": torch.int4, "int8": torch.int8}


def _check(recipe: Recipe) -> None:
    refusal = torchao_refusal(recipe)
    if refusal:
        raise PrecisionUnavailable(refusal)


def _fake_quant_config(spec: OperandSpec, is_activation: bool) -> Any:
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    dtype = _INT_DTYPES[spec.format]
    if spec.group_size is None:
        granularity = "per_token" if is_activation else "per_channel"
        return IntxFakeQuantizeConfig(dtype, granularity, is_symmetric=spec.symmetric, is_dynamic=True)
    return IntxFakeQuantizeConfig(dtype, group_size=spec.group_size, is_symmetric=spec.symmetric, is_dynamic=True)


def _filter(recipe: Recipe) -> Any:
    def keep(module: nn.Module, name: str) -> bool:
        return type(module) is nn.Linear and not stays_high_precision(name, recipe.high_precision)

    return keep


def _check_group_sizes(model: nn.Module, recipe: Recipe) -> None:
    groups = [op.group_size for op in (recipe.fprop.input, recipe.fprop.weight) if op.group_size]
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or stays_high_precision(name, recipe.high_precision):
            continue
        for group in groups:
            if module.in_features % group:
                raise PrecisionUnavailable(
                    f"recipe {recipe.name}: group_size {group} does not divide in_features "
                    f"{module.in_features} of {name}; choose a group_size that does"
                )


def convert_torchao(model: nn.Module, recipe: Recipe) -> list[nn.Module]:
    _check(recipe)
    _check_group_sizes(model, recipe)
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: backend torchao is not installed ({error}); "
            "pip install torchao, or choose backend emulated for float recipes"
        ) from None
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    act = recipe.fprop.input
    config = QATConfig(
        activation_config=_fake_quant_config(act, True) if act.format != "bf16" else None,
        weight_config=_fake_quant_config(recipe.fprop.weight, False),
        step="prepare",
    )
    quantize_(model, config, filter_fn=_filter(recipe))
    layers = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    set_fake_quant(layers, recipe.fake_quant_after_steps == 0)
    return layers


def set_fake_quant(layers: list[nn.Module], enabled: bool) -> None:
    from torchao.quantization.qat.linear import enable_linear_fake_quant

    for layer in layers:
        enable_linear_fake_quant(layer, enabled)


def ptq_config(recipe: Recipe) -> Any:
    """The torchao PTQ config an exported model is converted with."""
    _check(recipe)
    weight = recipe.fprop.weight
    group = weight.group_size
    if recipe.fprop.input.format == "int8" and weight.format == "int4":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group) if group else PerAxis(0),
            weight_scale_dtype=torch.float32,
        )
    if recipe.fprop.input.format == "bf16" and weight.format == "int4" and group:
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group)
    raise PrecisionUnavailable(f"recipe {recipe.name}: torchao has no PTQ config for this recipe; export as bf16")


def _quantize_or_explain(model: nn.Module, config: Any, recipe: Recipe, filter_fn: Any = None) -> None:
    from torchao.quantization import quantize_

    try:
        quantize_(model, config, filter_fn=filter_fn)
    except (ImportError, RuntimeError, NotImplementedError) as error:  # e.g. int4 needs the mslk GPU kernels
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: torchao cannot quantize for deployment here ({first}); "
            "export the bf16 weights instead"
        ) from None


def convert_for_export_torchao(model: nn.Module, recipe: Recipe) -> nn.Module:
    """After training: FakeQuantizedLinear -> nn.Linear, then the matching PTQ quantization."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    base = ptq_config(recipe)
    quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, _: isinstance(m, FakeQuantizedLinear))
    _quantize_or_explain(model, base, recipe, _filter(recipe))
    return model


def deployment_config(model: nn.Module, recipe: Recipe) -> Any:
    """transformers' TorchAoConfig of the recipe's deployed int form of `model`.

    The recipe's PTQ config on every linear QAT fake-quantized, none on the high-precision
    ones. Loading the trained weights with it (`from_pretrained(..., quantization_config=)`)
    gives what QAT's convert step gives; transformers then saves and reloads the model as a
    torchao-quantized HF checkpoint (vLLM and SGLang load that form too). Raises
    PrecisionUnavailable where torchao cannot quantize so on this machine.
    """
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    base = ptq_config(recipe)
    group = recipe.fprop.weight.group_size or 32
    _quantize_or_explain(nn.Sequential(nn.Linear(group, 8, bias=False, dtype=torch.bfloat16)), base, recipe)  # a probe
    keep = _filter(recipe)
    linears = [(name, keep(module, name)) for name, module in model.named_modules() if type(module) is nn.Linear]
    pattern = names_pattern([name for name, quantized in linears if quantized], [name for name, quantized in linears if not quantized])
    return TorchAoConfig(quant_type=FqnToConfig({f"re:{pattern}": base}))


def names_pattern(names: list[str], others: list[str]) -> str:
    """A regex that fully matches every one of `names` and none of `others`: layer indices
    folded to \\d+ where that stays exact (one entry per projection, not per layer, in config.json)."""
    def fold(name: str) -> str:
        return re.sub(r"\\\.\d+\\\.", lambda _: r"\.\d+\.", re.escape(name))

    folded = "|".join(sorted({fold(n) for n in names}))
    if any(re.fullmatch(folded, other) for other in others):  # some layers keep that projection high precision
        return "|".join(re.escape(n) for n in names)
    return folded


def torchao_version() -> str:
    from importlib.metadata import version

    return version("torchao")


def quantize_for_deployment(model: nn.Module, recipe: Recipe) -> nn.Module:
    """`model` (trained, plain linears) quantized in place as deployment_config says.

    Only deployment_config's probe may refuse (PrecisionUnavailable, before the model is
    touched); a failure half-way through the model's own linears is an error, not a refusal."""
    from torchao.quantization import quantize_

    quantize_(model, deployment_config(model, recipe).quant_type, filter_fn=None)  # FqnToConfig takes no filter
    return model
