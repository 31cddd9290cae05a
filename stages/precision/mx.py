"""MXFP8: FP8 elements in 32-element blocks along the last dim, one E8M0 (power of 2) scale each.

Scale rounding (see NUMERICS.md): `rceil` (default) is the cuBLAS/Transformer Engine rule,
scale = 2^ceil(log2(amax / fp8_max)) computed exactly on the fp32 bits (what the
`cvt.rp.satfinite.ue8m0` instruction does); `floor` is the OCP MX 1.0 rule,
scale = 2^(floor(log2 amax) - emax_elem). Elements: x * (1/scale), saturate, cast RNE.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stages.precision.blocks import divide, from_blocks, to_blocks
from stages.precision.dtypes import MX_DTYPES

MX_BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 255
# floor(log2(max normal)) of the element format: 8 for E4M3 (448), 15 for E5M2 (57344).
ELEM_EMAX = {torch.float8_e4m3fn: 8, torch.float8_e5m2: 15}


class MxQuantized(NamedTuple):
    data: torch.Tensor  # float8, same shape as the input
    scale_e8m0: torch.Tensor  # uint8 biased exponents [..., ceil(K/32)]; 255 = NaN block


def _e8m0_rceil(descale: torch.Tensor) -> torch.Tensor:
    """Round fp32 `descale` up to a power of two, exactly (bits, not log2), saturating at 2^127."""
    bits = descale.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa_nonzero = (bits & 0x7FFFFF) != 0
    # Normal: exponent + 1 unless already a power of 2. Subnormal: above 2^-127 rounds up to
    # 2^-126 (biased 1), else 2^-127 (biased 0); zero -> 0. As TE's float_to_e8m0 fallback.
    subnormal_up = (bits & 0x7FFFFF) > 0x400000
    biased = torch.where(exponent == 0, subnormal_up.to(torch.int32), exponent + mantissa_nonzero.to(torch.int32))
    biased = torch.clamp(biased, max=254)
    biased = torch.where(torch.isinf(descale), 254, biased)
    biased = torch.where(torch.isnan(descale), E8M0_NAN, biased)
    return biased.to(torch.uint8)


def _e8m0_floor(amax: torch.Tensor, elem_dtype: torch.dtype) -> torch.Tensor:
    unbiased = ((amax.view(torch.int32) >> 23) & 0xFF) - E8M0_BIAS - ELEM_EMAX[elem_dtype]
    biased = torch.clamp(unbiased, min=-E8M0_BIAS, max=E8M0_BIAS + 1) + E8M0_BIAS
    return torch.where(torch.isnan(amax), E8M0_NAN, biased).to(torch.uint8)


def e8m0_to_fp32(scale_e8m0: torch.Tensor) -> torch.Tensor:
    """2^(e - 127) as float32 (e = 0 is the fp32 subnormal 2^-127); 255 -> NaN."""
    value = torch.exp2(scale_e8m0.to(torch.float32) - E8M0_BIAS)
    return torch.where(scale_e8m0 == E8M0_NAN, float("nan"), value)


def quantize_mxfp8(
    x: torch.Tensor, elem_dtype: torch.dtype = torch.float8_e4m3fn, scale_rounding: str = "rceil"
) -> MxQuantized:
    blocks, k = to_blocks(x, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    max_pos = torch.finfo(elem_dtype).max
    if scale_rounding == "rceil":
        scale = _e8m0_rceil(divide(amax, max_pos))
        # Reciprocal as TE's ptx.cuh exp2f_rcp: biased 0 -> 1.0, NaN stays NaN, else 2^(127-e).
        reciprocal = torch.where(
            scale == 0, 1.0, torch.exp2(E8M0_BIAS - scale.to(torch.float32))
        )
        reciprocal = torch.where(scale == E8M0_NAN, float("nan"), reciprocal)
        scaled = blocks * reciprocal
    elif scale_rounding == "floor":
        scale = _e8m0_floor(amax, elem_dtype)
        # torchao divides by the scale, floored at the smallest normal (a zero block stays zero).
        scale_fp32 = torch.clamp((scale.to(torch.int32) << 23).view(torch.float32), min=2.0**-126)
        scaled = blocks / scale_fp32
    else:
        raise ValueError(f"scale_rounding: '{scale_rounding}' is not one of rceil, floor")
    data = torch.clamp(scaled, min=-max_pos, max=max_pos).to(elem_dtype)
    return MxQuantized(from_blocks(data, k), scale.squeeze(-1))


def dequantize_mxfp8(q: MxQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    blocks, k = to_blocks(q.data.to(torch.float32), MX_BLOCK)
    return from_blocks(blocks * e8m0_to_fp32(q.scale_e8m0).unsqueeze(-1), k).to(dtype)


def fake_quantize_mxfp8(x: torch.Tensor, fmt: str = "mxfp8", scale_rounding: str = "rceil") -> torch.Tensor:
    """Quantize-dequantize along the last dim in x's dtype. Drop a fused kernel in here later."""
    return dequantize_mxfp8(quantize_mxfp8(x, MX_DTYPES[fmt], scale_rounding), x.dtype)
