"""Each element format's torch dtype, in one table.

Derived from the torch-free descriptions (contract/formats.py: a format's `element` type), for the
formats whose elements torch computes in. NVFP4's E2M1 codes travel two a byte (uint8) and int4
is torchao's own: neither has a dtype here. The quantizers, the Triton kernels' dispatch and the
format registry (formats.py) all read this table.
"""

from __future__ import annotations

import torch

from contract.formats import ELEMENT_FORMATS, formats_of

_TORCH_ELEMENTS = {
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}

ELEMENT_DTYPES: dict[str, torch.dtype] = {
    name: _TORCH_ELEMENTS[fmt.element] for name, fmt in ELEMENT_FORMATS.items() if fmt.element in _TORCH_ELEMENTS
}
FP8_DTYPES = {name: ELEMENT_DTYPES[name] for name in formats_of("fp8")}  # per-tensor FP8
MX_DTYPES = {name: ELEMENT_DTYPES[name] for name in formats_of("mx")}  # MX blocks' element types
