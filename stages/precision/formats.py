"""The data plane's side of each element format: its torch dtype and its exact quantizer.

Registered once, by the format names of contract/formats.py (which describes each: element type,
block size, scale type). The emulated backend, `fake_quantize` and the deployed eval look a
format up here; a format without a quantizer (int4/int8: torchao QAT) is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from contract.formats import ELEMENT_FORMATS, ElementFormat
from contract.recipe import OperandSpec
from stages.precision.dtypes import ELEMENT_DTYPES
from stages.precision.fp8 import fake_quantize_fp8
from stages.precision.mx import fake_quantize_mxfp8
from stages.precision.nvfp4 import fake_quantize_nvfp4

# (x, the operand's spec, a delayed-scaling amax or None) -> x quantized and dequantized, x's dtype.
FakeQuantize = Callable[[torch.Tensor, OperandSpec, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Format:
    describes: ElementFormat
    dtype: torch.dtype | None  # the element's torch dtype where torch has one (dtypes.py)
    fake_quantize: FakeQuantize | None

    @property
    def name(self) -> str:
        return self.describes.name


def _bf16(x: torch.Tensor, spec: OperandSpec, amax: torch.Tensor | None) -> torch.Tensor:
    return x


def _fp8(x: torch.Tensor, spec: OperandSpec, amax: torch.Tensor | None) -> torch.Tensor:
    return fake_quantize_fp8(x, spec.format, amax)


def _mx(x: torch.Tensor, spec: OperandSpec, amax: torch.Tensor | None) -> torch.Tensor:
    return fake_quantize_mxfp8(x, spec.format, spec.scale_rounding)


def _nvfp4(x: torch.Tensor, spec: OperandSpec, amax: torch.Tensor | None) -> torch.Tensor:
    return fake_quantize_nvfp4(x, spec.block_2d, spec.stochastic_rounding, arithmetic=spec.nvfp4_arithmetic)


_QUANTIZERS: dict[str, FakeQuantize | None] = {
    "bf16": _bf16,
    "fp8_e4m3": _fp8,
    "fp8_e5m2": _fp8,
    "mxfp8": _mx,
    "mxfp8_e5m2": _mx,
    "nvfp4": _nvfp4,
    "int4": None,  # torchao QAT: its own fake quantizers
    "int8": None,
}
assert set(_QUANTIZERS) == set(ELEMENT_FORMATS), "every described format is registered"
assert all((q is not None) == ELEMENT_FORMATS[n].emulated for n, q in _QUANTIZERS.items())

FORMATS: dict[str, Format] = {
    name: Format(ELEMENT_FORMATS[name], ELEMENT_DTYPES.get(name), quantize) for name, quantize in _QUANTIZERS.items()
}


def fake_quantizer(name: str) -> FakeQuantize:
    """The exact quantize-dequantize of a format; ValueError naming the ones there are."""
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"format '{name}' is not one of {', '.join(FORMATS)}")
    if fmt.fake_quantize is None:
        known = ", ".join(n for n, f in FORMATS.items() if f.fake_quantize is not None)
        raise ValueError(f"format '{name}' has no exact quantizer here (ones that do: {known}); "
                         "int formats train with backend torchao")
    return fmt.fake_quantize
