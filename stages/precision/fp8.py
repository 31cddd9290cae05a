"""FP8 (E4M3 / E5M2) with one FP32 scale per tensor: current or delayed scaling.

Numerics follow torchao.float8 bit for bit (see NUMERICS.md): scale = fp8_max / max(amax, 1e-12)
computed in float64 then rounded to float32; data = saturate(x_fp32 * scale) cast RNE;
dequantize = data_fp32 / scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stages.precision.dtypes import FP8_DTYPES

AMAX_EPS = 1e-12  # torchao.float8.float8_utils.EPS: an all-zero tensor gets a finite scale


class Fp8Quantized(NamedTuple):
    data: torch.Tensor  # float8, same shape as the input
    scale: torch.Tensor  # fp32 scalar dequantization scale (checkpoints' weight_scale): x ~= data * scale


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The quantization multiplier (TE's `scale`, torchao's): data = x * multiplier."""
    amax64 = amax.to(torch.float64)
    return (torch.finfo(dtype).max / torch.clamp(amax64, min=AMAX_EPS)).to(torch.float32)


def _quantize(x: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if amax is None:
        amax = x.detach().abs().max()
    multiplier = amax_to_scale(amax, dtype)
    fp8_max = torch.finfo(dtype).max
    # Clamp before the cast: saturating (not inf) on overflow, as TE and torchao do.
    data = torch.clamp(x.to(torch.float32) * multiplier, min=-fp8_max, max=fp8_max).to(dtype)
    return data, multiplier


def quantize_fp8(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, amax: torch.Tensor | None = None
) -> Fp8Quantized:
    """Per-tensor FP8. `amax` given = delayed scaling (from history); None = current scaling."""
    data, multiplier = _quantize(x, dtype, amax)
    return Fp8Quantized(data, (1.0 / multiplier.to(torch.float64)).to(torch.float32))


def fake_quantize_fp8(x: torch.Tensor, fmt: str, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize in x's dtype, dividing by the multiplier as torchao does.

    Drop a fused kernel in here later."""
    data, multiplier = _quantize(x, FP8_DTYPES[fmt], amax)
    return (data.to(torch.float32) / multiplier).to(x.dtype)
