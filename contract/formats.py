"""Number formats, each described once: what a recipe may name and what export may deploy.

Torch-free: recipes, the compatibility rules and the control plane read these descriptions; the
data plane registers each format's quantizer (stages/precision/formats.py) and packer
(stages/deployment/packing.py) against the same names. Adding a format: describe it here, then
register its quantizer (and, if it deploys, its packer) there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["none", "fp8", "mx", "nvfp4", "int"]


@dataclass(frozen=True)
class ElementFormat:
    """The format of one operand of one GEMM during training."""

    name: str  # what a recipe writes, e.g. `mxfp8`
    element: str  # the element type: bfloat16, float8_e4m3fn, float8_e5m2, float4_e2m1, int4, int8
    block_size: int | None  # elements per scale along K (mx 32, nvfp4 16); None: per tensor or per row
    scale: str | None  # e8m0 (MX), e4m3_fp32 (NVFP4: E4M3 block scales x one FP32), fp32, None (unscaled)
    family: Family  # who implements it: per-tensor fp8, OCP MX, NVFP4, integer (torchao QAT)
    emulated: bool  # stages.precision has an exact quantize-dequantize of it (backend emulated)


ELEMENT_FORMATS: dict[str, ElementFormat] = {f.name: f for f in (
    ElementFormat("bf16", "bfloat16", None, None, "none", emulated=True),
    ElementFormat("fp8_e4m3", "float8_e4m3fn", None, "fp32", "fp8", emulated=True),
    ElementFormat("fp8_e5m2", "float8_e5m2", None, "fp32", "fp8", emulated=True),
    ElementFormat("mxfp8", "float8_e4m3fn", 32, "e8m0", "mx", emulated=True),
    ElementFormat("mxfp8_e5m2", "float8_e5m2", 32, "e8m0", "mx", emulated=True),
    ElementFormat("nvfp4", "float4_e2m1", 16, "e4m3_fp32", "nvfp4", emulated=True),
    ElementFormat("int4", "int4", None, "fp32", "int", emulated=False),
    ElementFormat("int8", "int8", None, "fp32", "int", emulated=False),
)}


def formats_of(family: Family) -> tuple[str, ...]:
    return tuple(name for name, fmt in ELEMENT_FORMATS.items() if fmt.family == family)


PER_TENSOR_FORMATS = formats_of("fp8")
INT_FORMATS = formats_of("int")
EMULATED_FORMATS = tuple(name for name, fmt in ELEMENT_FORMATS.items() if fmt.emulated)


@dataclass(frozen=True)
class InferenceFormat:
    """What an exported model deploys as (a recipe's `inference_format`)."""

    name: str
    checkpoint: Literal["bf16", "unified", "torchao"]  # bf16 only, ModelOpt's unified HF, torchao's HF
    block_size: int = 0  # ModelOpt's awq_block_size in hf_quant_config.json (0: per tensor)
    quant_algo: str | None = None  # ModelOpt's name of it (hf_quant_config.json)
    weight_tensors: tuple[str, ...] = ()  # what a packed linear stores beside `weight`
    static_input_scale: bool = False  # deployments need a calibrated input_scale


INFERENCE_FORMATS: dict[str, InferenceFormat] = {f.name: f for f in (
    InferenceFormat("bf16", "bf16"),
    InferenceFormat("fp8", "unified", 0, "FP8", ("weight_scale", "input_scale"), static_input_scale=True),
    InferenceFormat("mxfp8", "unified", 32, "MXFP8", ("weight_scale",)),
    InferenceFormat("nvfp4", "unified", 16, "NVFP4", ("weight_scale", "weight_scale_2", "input_scale"),
                    static_input_scale=True),
    InferenceFormat("int4", "torchao"),
    InferenceFormat("int8_int4", "torchao"),
)}


def deployed_format(name: str) -> InferenceFormat | None:
    """The quantized checkpoint an inference format deploys as; None for bf16 (nothing to pack)."""
    fmt = INFERENCE_FORMATS[name]
    return None if fmt.checkpoint == "bf16" else fmt
