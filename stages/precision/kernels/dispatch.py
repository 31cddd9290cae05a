"""Which operand quantizations run as Triton kernels (CUDA tensors) and which stay reference.

The emulated backend calls these: on a CUDA tensor the kernels give the reference's bits
faster; on CPU the caller keeps the PyTorch reference. NVFP4 with `block_2d` or
`stochastic_rounding` has no kernel yet: it runs the reference code on the GPU (same numbers,
slower), which `kernel_covers` says so callers and tests can tell.
"""

from __future__ import annotations

import weakref

import torch

from contract.recipe import OperandSpec
from stages.precision.dtypes import FP8_DTYPES, MX_DTYPES
from stages.precision.errors import PrecisionUnavailable


def kernel_covers(spec: OperandSpec) -> bool:
    if spec.format in MX_DTYPES or spec.format in FP8_DTYPES:
        return True
    return spec.format == "nvfp4" and not spec.block_2d and not spec.stochastic_rounding


def _ops():
    try:
        from stages.precision.kernels import ops
    except ImportError as error:
        raise PrecisionUnavailable(
            f"Triton quantizer kernels unavailable ({error}); install triton or run backend emulated on CPU"
        ) from None
    return ops


def fake_quantize_cuda(x: torch.Tensor, spec: OperandSpec, amax: torch.Tensor | None = None) -> torch.Tensor | None:
    """Kernel fake quant of a CUDA tensor along its last dim, or None where no kernel covers
    the spec (the caller then runs the reference). `amax`: delayed-scaling FP8 amax."""
    if not x.is_cuda or not kernel_covers(spec):
        return None
    ops = _ops()
    if spec.format in FP8_DTYPES:
        return ops.fake_fp8(x, FP8_DTYPES[spec.format], amax)
    if spec.format in MX_DTYPES:
        return ops.fake_mxfp8(x, MX_DTYPES[spec.format], spec.scale_rounding)
    return ops.fake_nvfp4(x, spec.nvfp4_arithmetic)


def fused_pair_supported(row_spec: OperandSpec, col_spec: OperandSpec) -> bool:
    """Whether the fused kernel runs this (row, column) pair: rows nvfp4 or MX, columns MX."""
    if col_spec.format not in MX_DTYPES or not kernel_covers(row_spec) or row_spec.format not in (*MX_DTYPES, "nvfp4"):
        return False
    return row_spec.format not in MX_DTYPES or row_spec.scale_rounding == col_spec.scale_rounding


def fused_rows_and_cols(
    x2: torch.Tensor, row_spec: OperandSpec, col_spec: OperandSpec
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One read of a 2-D CUDA x for two roles: row_spec along K (fprop x, dgrad dy) and the
    MXFP8 col_spec along the rows (wgrad x^T, dy^T), both returned in x's layout.
    None when the pair is not a (nvfp4 | mx, mx) pair the fused kernel runs."""
    if not x2.is_cuda or x2.dim() != 2 or not fused_pair_supported(row_spec, col_spec):
        return None
    return _ops().fake_rows_and_cols(
        x2, row_spec.format, MX_DTYPES[col_spec.format], col_spec.scale_rounding, row_spec.nvfp4_arithmetic
    )


class ActivationMemo:
    """The last activation quantized in a forward, by identity: q_proj, k_proj and v_proj
    (gate_proj and up_proj) read the same x, so it is quantized once for all of them.

    Keyed on the tensor object (a weak reference: a live x cannot share its storage with a
    new one), its version counter (an in-place change misses) and the recipe's operand specs.
    Holds one entry; clear() at each optimizer step releases it."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple | None = None
        self._value: tuple | None = None

    def get(self, x: torch.Tensor, key: tuple) -> tuple | None:
        if self._ref is not None and self._ref() is x and self._key == (x._version, key):
            return self._value
        return None

    def put(self, x: torch.Tensor, key: tuple, value: tuple) -> None:
        self._ref, self._key, self._value = weakref.ref(x), (x._version, key), value

    def clear(self) -> None:
        self._ref = self._key = self._value = None
