"""NVFP4: E2M1 elements in 16-element blocks, E4M3 block scales, one FP32 global scale.

Two-level scaling as torchao's nvfp4_quantize (bit for bit) and TE's NVFP4BlockScaling:
  global  g = amax(x) / (448 * 6)              (FP32; 1.0 for an all-zero tensor)
  block   s = e4m3(clamp(amax_b / 6 / g, min=2^-6, max=448))      (round to nearest even)
  element q = e2m1(clamp(x * ((1/g) / s), -6, 6))     (RNE, or stochastic rounding)
  value   x ~= q * (g * s)
See NUMERICS.md for the rounding choices and where TE differs.

`fake_quantize_nvfp4(..., arithmetic="modelopt")` is ModelOpt's NVFP4 fake quant instead
(fp4_fake_quant_block, the QAT baseline), which orders the same steps differently:
  global  g  = amax(x) * fl(1/2688)            (CUDA's division by a scalar; 1e-12 if not > 0)
  block   s' = e4m3(min(amax_b / (6 g), 448)) * g   (subnormal E4M3 allowed; 1.0 if s' < 1e-5)
  element x ~= sign(x) * e2m1(|x| / s') * s'   (a zero result is +0.0 whatever the sign of x)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from stages.precision.blocks import divide, from_blocks, to_blocks

NVFP4_BLOCK = 16
F4_MAX = 6.0
E4M3_MAX = 448.0
E4M3_EPS = 2.0**-6  # smallest normal E4M3 (torchao: finfo.tiny): blocks scales never go subnormal
ARITHMETICS = ("torchao", "modelopt")
# ModelOpt's constants: the smallest effective block scale it divides by, and its global scale
# floor (an all-zero tensor's amax).
MODELOPT_MIN_BLOCK_SCALE = 1e-5
MODELOPT_MIN_GLOBAL_SCALE = 1e-12
# E2M1 magnitudes by code 0..7; code | 8 is the negative value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Round-to-nearest-even thresholds between consecutive codes: at a tie the even code wins,
# so a tie counts as "above" only when the upper code is even (codes 2, 4, 6).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_GOES_UP = (False, True, False, True, False, True, False)


class Nvfp4Quantized(NamedTuple):
    codes: torch.Tensor  # uint8 E2M1 codes 0..15 (bit 3 = sign), same shape as the input
    block_scales: torch.Tensor  # float8_e4m3fn [..., ceil(K/16)]
    global_scale: torch.Tensor  # fp32 scalar g (decode): x ~= e2m1(code) * block_scale * g


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.to(torch.float32)
    # An all-zero tensor gets g = 1 (torchao would divide 0 by 0); NaN and inf propagate.
    return torch.where(amax == 0, torch.ones_like(amax), divide(amax, E4M3_MAX * F4_MAX))


def e2m1_round(v: torch.Tensor, generator: torch.Generator | None = None, stochastic: bool = False) -> torch.Tensor:
    """fp32 values already clamped to [-6, 6] -> uint8 codes (RNE, or stochastic rounding)."""
    mag = v.abs()
    if stochastic:
        grid = torch.tensor(E2M1_VALUES, device=v.device)
        lower = torch.bucketize(mag, grid, right=True) - 1  # index of the grid point <= mag
        lower = lower.clamp(0, 7)
        upper = (lower + 1).clamp(max=7)
        lo, hi = grid[lower], grid[upper]
        frac = torch.where(hi > lo, (mag - lo) / (hi - lo), torch.zeros_like(mag))
        noise = torch.rand(mag.shape, generator=generator, device=v.device)
        code = torch.where(noise < frac, upper, lower).to(torch.uint8)
    else:
        code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
        for mid, up in zip(_MIDPOINTS, _TIE_GOES_UP, strict=True):
            code += (mag >= mid) if up else (mag > mid)
    # The sign bit is kept even for zero (-0.0 and tiny negatives -> code 8), as torchao does.
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_to_fp32(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES + tuple(-x for x in E2M1_VALUES), device=codes.device)
    return table[codes.long()]


def _block_amax_2d(x: torch.Tensor) -> torch.Tensor:
    """[N, K] -> per-(row, 16-block) amax where each 16x16 tile shares its amax."""
    n, k = x.shape
    padded = F.pad(x.to(torch.float32).abs(), (0, (-k) % 16, 0, (-n) % 16))
    tiles = padded.reshape(padded.shape[0] // 16, 16, padded.shape[1] // 16, 16).amax(dim=(1, 3))
    return tiles.repeat_interleave(16, dim=0)[:n].unsqueeze(-1)


def quantize_nvfp4(
    x: torch.Tensor,
    global_amax: torch.Tensor | None = None,
    block_2d: bool = False,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
) -> Nvfp4Quantized:
    """Blocks along the last dim (the last block may be partial). NaN in a block -> NaN block."""
    blocks, k = to_blocks(x, NVFP4_BLOCK)
    if global_amax is None:
        global_amax = x.detach().abs().max()
    g = global_scale_from_amax(global_amax)
    if block_2d:
        if x.dim() != 2:
            raise ValueError(f"block_2d needs a 2-D weight, got shape {tuple(x.shape)}")
        block_amax = _block_amax_2d(x)
    else:
        block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = torch.clamp(divide(block_amax, F4_MAX) / g, min=E4M3_EPS, max=E4M3_MAX).to(torch.float8_e4m3fn)
    reciprocal = (1.0 / g) / block_scale.to(torch.float32)
    scaled = torch.clamp(blocks * reciprocal, -F4_MAX, F4_MAX)
    codes = e2m1_round(scaled, generator, stochastic_rounding)
    return Nvfp4Quantized(from_blocks(codes, k), block_scale.squeeze(-1), g)


def dequantize_nvfp4(q: Nvfp4Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values, k = to_blocks(e2m1_to_fp32(q.codes), NVFP4_BLOCK)
    scale = q.global_scale * q.block_scales.to(torch.float32)
    return from_blocks(values * scale.unsqueeze(-1), k).to(dtype)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, even index in the low nibble (torchao pack_uint4 / checkpoint layout)."""
    flat = codes.reshape(*codes.shape[:-1], -1, 2)
    return flat[..., 0] | (flat[..., 1] << 4)


def fake_quantize_nvfp4(
    x: torch.Tensor,
    block_2d: bool = False,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
    arithmetic: str = "torchao",
    global_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize in x's dtype (torchao: a NaN anywhere makes all NaN, the global amax
    is NaN). `arithmetic="modelopt"`: ModelOpt's fake quant (1-D blocks, round to nearest even).
    `global_amax`: scale from this amax rather than x's own (a calibrated, static amax)."""
    if arithmetic == "modelopt":
        if block_2d or stochastic_rounding:
            raise ValueError("NVFP4 arithmetic 'modelopt' has 1-D blocks and round to nearest even only")
        return _fake_quantize_nvfp4_modelopt(x, global_amax)
    if arithmetic != "torchao":
        raise ValueError(f"NVFP4 arithmetic '{arithmetic}' is not one of {', '.join(ARITHMETICS)}")
    q = quantize_nvfp4(x, global_amax, block_2d, stochastic_rounding, generator)
    return dequantize_nvfp4(q, x.dtype)


def modelopt_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's `global_amax.float() / (6.0 * 448.0)` as CUDA computes it: times the fp32
    reciprocal (blocks.divide says why), floored at 1e-12 where not positive (NaN too)."""
    amax = amax.to(torch.float32)
    reciprocal = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(E4M3_MAX * F4_MAX, dtype=torch.float32)
    g = amax * reciprocal.to(amax.device)
    return torch.where(g > 0, g, torch.full_like(g, MODELOPT_MIN_GLOBAL_SCALE))


def _fake_quantize_nvfp4_modelopt(x: torch.Tensor, global_amax: torch.Tensor | None = None) -> torch.Tensor:
    """modelopt fp4_fake_quant_block with IEEE divisions (its Triton kernel's are approximate,
    which can differ only where a quotient lies within 2 ulp of a rounding threshold)."""
    blocks, k = to_blocks(x, NVFP4_BLOCK)
    g = modelopt_global_scale(x.detach().abs().max() if global_amax is None else global_amax.to(x.device))
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = torch.clamp(block_amax / (g * F4_MAX), max=E4M3_MAX).to(torch.float8_e4m3fn)
    scale = block_scale.to(torch.float32) * g
    scale = torch.where(scale >= MODELOPT_MIN_BLOCK_SCALE, scale, torch.ones_like(scale))
    codes = e2m1_round(torch.clamp(blocks.abs() / scale, max=F4_MAX))
    magnitude = e2m1_to_fp32(codes & 7) * scale
    # 0.0 - m, not -m: ModelOpt's negation (Triton's) turns a zero into +0.0.
    values = torch.where(blocks >= 0, magnitude, 0.0 - magnitude)
    return from_blocks(values, k).to(x.dtype)


def hadamard_16(signs: torch.Tensor) -> torch.Tensor:
    """Orthonormal random Hadamard matrix diag(signs) @ H16 / 4 (float32, 16x16)."""
    h = torch.ones(1, 1)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (signs.to(torch.float32).unsqueeze(1) * h.to(signs.device)) / 4.0


def apply_hadamard(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Rotate each 16-block along the last dim (zero-padded); product of two rotated operands
    along that dim equals the unrotated product because the matrix is orthonormal."""
    blocks, _ = to_blocks(x, 16)
    return (blocks @ matrix).reshape(*x.shape[:-1], -1)
