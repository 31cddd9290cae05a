"""The `modelopt` backend: `mtq.quantize(model, <preset>, forward_loop)` (ModelOpt QAT).

ModelOpt fake-quantizes the forward GEMM operands (input and weight quantizers) and passes
gradients straight through, with a high-precision backward: so it runs exactly the recipes
whose fprop is one format on both operands, whose dgrad/wgrad are bf16, and whose
backward_source is forward_quantized. Presets: nvfp4 -> NVFP4_DEFAULT_CFG,
fp8_e4m3 -> FP8_DEFAULT_CFG, mxfp8 -> MXFP8_DEFAULT_CFG.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from contract.compat import modelopt_preset, modelopt_refusal
from contract.recipe import Recipe
from stages.precision.errors import PrecisionUnavailable


@dataclass(frozen=True)
class SavedQuantizers:
    """What a ModelOpt PTQ or QAT run keeps beside its plain weights: `mto.modelopt_state`
    (the quantizer modules and their config) and the calibrated amax by state-dict key."""

    modelopt_state: dict[str, Any]
    amax: dict[str, torch.Tensor]


def modelopt_preset_name(recipe: Recipe) -> str:
    preset = modelopt_preset(recipe)
    if preset is None:
        raise PrecisionUnavailable(modelopt_refusal(recipe))
    return preset


def modelopt_config(recipe: Recipe, mtq: Any) -> dict[str, Any]:
    config = copy.deepcopy(getattr(mtq, modelopt_preset_name(recipe)))
    # Our high-precision globs (module names) switch off every quantizer under those modules.
    config["quant_cfg"] = list(config["quant_cfg"]) + [
        {"quantizer_name": f"{pattern}.*", "enable": False} for pattern in recipe.high_precision
    ]
    return config


def restore_quantizers(model: nn.Module, saved: SavedQuantizers) -> nn.Module:
    """ModelOpt's resume (its QAT guide): the quantizers first, then their amax; no calibration."""
    import modelopt.torch.opt as mto

    model = mto.restore_from_modelopt_state(model, saved.modelopt_state)
    buffers = model.state_dict()
    missing = [key for key in saved.amax if key not in buffers]
    if missing:
        raise PrecisionUnavailable(f"the saved ModelOpt quantizers do not fit the model: it has no {missing[:3]}")
    model.load_state_dict({key: value.to(buffers[key].device) for key, value in saved.amax.items()}, strict=False)
    return model


def convert_modelopt(
    model: nn.Module, recipe: Recipe, calibrate: Callable[[nn.Module], None] | None,
    saved: SavedQuantizers | None = None, own_fake_quant: bool = False,
) -> nn.Module:
    """`mtq.quantize` with `calibrate` as its forward loop, or, given `saved` (a ModelOpt run of
    this recipe), those quantizers restored with their calibrated amax. `own_fake_quant`: ModelOpt's
    fake quant will not run after a restore (modelopt_compiled computes it), so no CUDA is needed."""
    preset = modelopt_preset_name(recipe)
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as error:
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: backend modelopt needs nvidia-modelopt ({error}); choose backend emulated"
        ) from None
    if calibrate is None and saved is None:
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: backend modelopt needs a calibration forward loop "
            "(prepare_model(..., calibrate=fn)); choose backend emulated for none"
        )
    device = next(model.parameters()).device
    if preset == "NVFP4_DEFAULT_CFG" and device.type != "cuda" and not (saved is not None and own_fake_quant):
        # ModelOpt's dynamic NVFP4 block quantizer asserts "amax must be a CUDA tensor".
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: backend modelopt runs NVFP4 fake quant only on CUDA "
            f"(model is on {device.type}); choose backend emulated"
        )
    if saved is not None:
        return restore_quantizers(model, saved)
    try:
        return mtq.quantize(model, modelopt_config(recipe, mtq), calibrate)
    except (AssertionError, RuntimeError, NotImplementedError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: backend modelopt failed ({first_line}); choose backend emulated"
        ) from error


def modelopt_version() -> str:
    from importlib.metadata import version

    return version("nvidia-modelopt")
