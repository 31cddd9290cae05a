"""`fake_quantize(tensor, fmt)`: one entry point over the formats (quantize-dequantize)."""

from __future__ import annotations

import torch

from contract.recipe import OperandSpec
from stages.precision.formats import fake_quantizer


def fake_quantize(tensor: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize-dequantize in the input dtype with the format's default scaling. fp8_*:
    per-tensor current scaling; mxfp8 and nvfp4: blocks along the last dim (last block may be
    partial). `bf16` returns the input."""
    return fake_quantizer(fmt)(tensor, OperandSpec(format=fmt), None)
