"""Blocks along the last dimension, with a zero-padded partial last block.

Zeros never change a block's amax, so padding then slicing gives the same result as a
kernel that handles a ragged tail; every format shares this one helper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """x [..., K] -> float32 [..., ceil(K/block), block] (zero padded) and the original K."""
    k = x.shape[-1]
    pad = (-k) % block
    x32 = x.to(torch.float32)
    if pad:
        x32 = F.pad(x32, (0, pad))
    return x32.reshape(*x.shape[:-1], (k + pad) // block, block), k


def from_blocks(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of to_blocks: [..., n, block] -> [..., K]."""
    return blocks.reshape(*blocks.shape[:-2], -1)[..., :k]


def divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor rounded once (IEEE), on every device.

    CUDA turns a division by a Python scalar into a multiplication by its reciprocal, which
    differs in the last bit when the divisor is not a power of two (6, 448, 2688): dividing by
    a tensor on x's device keeps GPU results equal to the CPU's (and to torchao's on CPU)."""
    return x / torch.tensor(divisor, dtype=x.dtype, device=x.device)
