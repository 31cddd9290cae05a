"""`fake_quantize(tensor, fmt)`: one entry point over the format families (quantize-dequantize)."""

from __future__ import annotations

import torch

from stages.precision.fp8 import FP8_DTYPES, fake_quantize_fp8
from stages.precision.mx import ELEM_DTYPES, fake_quantize_mxfp8
from stages.precision.nvfp4 import fake_quantize_nvfp4

FAKE_QUANT_FORMATS = ("bf16", *FP8_DTYPES, *ELEM_DTYPES, "nvfp4")


def fake_quantize(tensor: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize-dequantize in the input dtype. fp8_*: per-tensor current scaling; mxfp8 and
    nvfp4: blocks along the last dim (last block may be partial). `bf16` returns the input."""
    if fmt == "bf16":
        return tensor
    if fmt in FP8_DTYPES:
        return fake_quantize_fp8(tensor, fmt)
    if fmt in ELEM_DTYPES:
        return fake_quantize_mxfp8(tensor, fmt)
    if fmt == "nvfp4":
        return fake_quantize_nvfp4(tensor)
    raise ValueError(f"fake_quantize: format '{fmt}' is not one of {', '.join(FAKE_QUANT_FORMATS)}")
