"""Precision recipes, exact quantizers and model converters.

`from stages.precision import load_recipe, prepare_model, PrecisionUnavailable, fake_quantize`.
The control plane imports `contract.recipe` (torch-free), which runs this file too:
so everything that needs torch is imported lazily, on first attribute access (PEP 562).
"""

from __future__ import annotations

from typing import Any

from contract.recipe import Recipe, RecipeError, builtin_recipe_names, load_recipe
from stages.precision.errors import PrecisionUnavailable

_LAZY = {
    "fake_quantize": "stages.precision.quantize",
    "quantize_fp8": "stages.precision.fp8",
    "quantize_mxfp8": "stages.precision.mx",
    "quantize_nvfp4": "stages.precision.nvfp4",
    "dequantize_nvfp4": "stages.precision.nvfp4",
    "prepare_model": "stages.precision.convert",
    "convert_for_export": "stages.precision.convert",
    "PreparedModel": "stages.precision.convert",
    "BACKENDS": "stages.precision.convert",
}

__all__ = [
    "BACKENDS",
    "PrecisionUnavailable",
    "PreparedModel",
    "Recipe",
    "RecipeError",
    "builtin_recipe_names",
    "convert_for_export",
    "dequantize_nvfp4",
    "fake_quantize",
    "load_recipe",
    "prepare_model",
    "quantize_fp8",
    "quantize_mxfp8",
    "quantize_nvfp4",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'stages.precision' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(module_name), name)
