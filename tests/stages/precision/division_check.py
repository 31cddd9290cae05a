"""A Triton kernel for the GPU test of triton_jit._div_with_reciprocal (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stages.precision.kernels import triton_jit as jit


@triton.jit
def _mismatches(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < n, other=1.0)
    b = tl.load(b_ptr + i, mask=i < n, other=1.0)
    y = tl.math.div_rn(tl.full(b.shape, 1.0, tl.float32), b)
    fast = jit._div_with_reciprocal(a, b, y).to(tl.int32, bitcast=True)
    differ = fast != tl.math.div_rn(a, b).to(tl.int32, bitcast=True)
    tl.store(out_ptr + i, differ.to(tl.int8), mask=i < n)


def division_mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements of a / b (b broadcast to a) the reciprocal-and-FMA division gets wrong."""
    b = b.expand_as(a).contiguous()
    out = torch.empty(a.numel(), dtype=torch.int8, device=a.device)
    _mismatches[(triton.cdiv(a.numel(), 1024),)](a, b, out, a.numel(), BLOCK=1024)
    return int(out.sum().item())
