"""Our packer: one linear's weight into ModelOpt's unified HF tensors, and back.

The arithmetic copies ModelOpt 0.47's export path op for op (modelopt/torch/export/
unified_export_hf.py `_export_quantized_weight`, quant_utils.py `to_quantized_weight`,
qtensor/nvfp4_tensor.py, qtensor/mxfp8_tensor.py), so both packers write the same bytes:

NVFP4 (`weight` uint8 [N, K/2], `weight_scale` float8_e4m3fn [N, K/16], `weight_scale_2` and
`input_scale` fp32 scalars):
  weight_scale_2 = amax_w / (6 * 448)
  weight_scale   = e4m3(clamp(block_amax / (6 * weight_scale_2), 2^-9, 448)), 0 -> 1.0 first
  code           = e2m1_rne(w_fp32 / (weight_scale * weight_scale_2)), sign from (w < 0)
  byte           = code[2i] | code[2i+1] << 4           (even element in the low nibble)
  input_scale    = amax_x / (6 * 448)
FP8 per tensor (`weight` float8_e4m3fn, `weight_scale`, `input_scale` fp32 scalars):
  weight_scale = amax_w / 448 (fp32); weight = e4m3(w / weight_scale) computed
  in the weight's dtype (a 0-dim fp32 divisor does not promote a bf16 tensor)
MXFP8 (`weight` float8_e4m3fn, `weight_scale` uint8 E8M0 [N, K/32]):
  e = clamp(ceil(log2(block_amax / 448)), -127, 127) + 127; weight = e4m3(clamp(w * 2^(127-e), +-448))
Pack on the device ModelOpt would use: PyTorch divides a tensor by a Python scalar exactly on
CPU but as a multiplication by the fp32 reciprocal on CUDA, so the scalar scales (amax / 2688,
amax / 448) differ by an ulp between the two; export packs on CUDA when there is one, where
ModelOpt's exporter runs, and the bytes then match (tests/stages/export/test_export_gpu.py).
Where this differs from stages.precision's fake quant (the training numerics): the NVFP4 block
scale floor is 2^-9 here, 2^-6 there, and an all-zero block gets scale 1.0; -0.0 packs as +0.
Neither changes a weight with non-degenerate blocks (tests/stages/export check it bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from contract.formats import INFERENCE_FORMATS, InferenceFormat

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
MXFP8_BLOCK = 32
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
@dataclass(frozen=True)
class LinearAmax:
    """Calibrated (or computed) per-tensor amax of one linear, after fused-group unification."""

    weight: torch.Tensor  # fp32 scalar
    input: torch.Tensor | None  # fp32 scalar; None: no calibration, activations scale dynamically


def _cast_fp4(scaled: torch.Tensor) -> torch.Tensor:
    """ModelOpt NVFP4QTensor._cast_fp4: searchsorted on the bounds, ties at odd bounds go up."""
    bounds = torch.tensor(_E2M1_BOUNDS, device=scaled.device)
    sign = (scaled < 0).to(torch.uint8)
    magnitude = scaled.abs()
    code = torch.searchsorted(bounds, magnitude, out_int32=True).to(torch.uint8)
    at_odd_bound = torch.any(magnitude.unsqueeze(-1) == bounds[[1, 3, 5]], dim=-1).to(torch.uint8)
    return (sign << 3) + code + at_odd_bound


def pack_nvfp4(weight: torch.Tensor, amax: LinearAmax) -> dict[str, torch.Tensor]:
    n, k = weight.shape
    if k % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 export needs in_features divisible by {NVFP4_BLOCK}, got {k}")
    scale_2 = amax.weight.float() / (E2M1_MAX * E4M3_MAX)
    blocks = weight.reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    per_block = blocks.abs().amax(dim=-1).float() / (E2M1_MAX * scale_2)
    per_block[per_block == 0] = 1.0
    weight_scale = per_block.clamp(min=2**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = blocks / (weight_scale.to(torch.float32) * scale_2).unsqueeze(-1)
    codes = _cast_fp4(scaled.reshape(n, k))
    out = {"weight": (codes[..., 1::2] << 4) | codes[..., 0::2], "weight_scale": weight_scale,
           "weight_scale_2": scale_2.squeeze()}
    if amax.input is not None:
        out["input_scale"] = (amax.input.float() / (E2M1_MAX * E4M3_MAX)).squeeze()
    return out


def unpack_nvfp4(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Packed bytes -> fp32 weight: e2m1(code) * weight_scale * weight_scale_2."""
    packed = tensors["weight"]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    values = torch.tensor(_E2M1_VALUES, device=packed.device)[codes.long()]
    n, k = values.shape
    scale = tensors["weight_scale"].to(torch.float32) * tensors["weight_scale_2"].float()
    return (values.reshape(n, k // NVFP4_BLOCK, NVFP4_BLOCK) * scale.unsqueeze(-1)).reshape(n, k)


def pack_fp8(weight: torch.Tensor, amax: LinearAmax) -> dict[str, torch.Tensor]:
    # ModelOpt 0.47 keeps a per-tensor amax 0-dim, so it takes its `torch.tensor(amax / maxbound)`
    # branch: an fp32 division.
    weight_scale = (amax.weight.float() / E4M3_MAX).reshape(())
    out = {"weight": (weight / weight_scale.to(weight.device)).to(torch.float8_e4m3fn),
           "weight_scale": weight_scale}
    if amax.input is not None:
        out["input_scale"] = (amax.input.float() / E4M3_MAX).squeeze()
    return out


def unpack_fp8(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors["weight"].to(torch.float32) * tensors["weight_scale"].float()


def pack_mxfp8(weight: torch.Tensor, amax: LinearAmax) -> dict[str, torch.Tensor]:
    n, k = weight.shape
    if k % MXFP8_BLOCK:
        raise ValueError(f"MXFP8 export needs in_features divisible by {MXFP8_BLOCK}, got {k}")
    blocks = weight.reshape(n, k // MXFP8_BLOCK, MXFP8_BLOCK)
    descale = blocks.abs().amax(dim=-1).float() / E4M3_MAX
    log2 = torch.where(descale > 0, torch.log2(descale), torch.tensor(-127.0, device=weight.device))
    scale = (torch.clamp(torch.ceil(log2), min=-127, max=127) + 127).to(torch.uint8)
    scaled = blocks * torch.exp2(127 - scale.float()).unsqueeze(-1)
    data = torch.clamp(scaled, min=-E4M3_MAX, max=E4M3_MAX).to(torch.float8_e4m3fn)
    return {"weight": data.reshape(n, k), "weight_scale": scale}


def unpack_mxfp8(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    data = tensors["weight"].to(torch.float32)
    n, k = data.shape
    scale = torch.exp2(tensors["weight_scale"].float() - 127)
    return (data.reshape(n, k // MXFP8_BLOCK, MXFP8_BLOCK) * scale.unsqueeze(-1)).reshape(n, k)


@dataclass(frozen=True)
class DeployedFormat:
    """The data plane's side of an inference format (contract.formats): its packer and unpacker.
    A packed linear holds `weight` plus the describing format's `weight_tensors`."""

    describes: InferenceFormat
    pack: Callable[[torch.Tensor, LinearAmax], dict[str, torch.Tensor]]
    unpack: Callable[[dict[str, torch.Tensor]], torch.Tensor]


# Registered once, for every inference format deployed as ModelOpt's unified HF checkpoint.
DEPLOYED: dict[str, DeployedFormat] = {
    name: DeployedFormat(INFERENCE_FORMATS[name], pack, unpack)
    for name, pack, unpack in (("nvfp4", pack_nvfp4, unpack_nvfp4), ("fp8", pack_fp8, unpack_fp8),
                               ("mxfp8", pack_mxfp8, unpack_mxfp8))
}
assert set(DEPLOYED) == {n for n, f in INFERENCE_FORMATS.items() if f.checkpoint == "unified"}
PACKERS = {name: fmt.pack for name, fmt in DEPLOYED.items()}
UNPACKERS = {name: fmt.unpack for name, fmt in DEPLOYED.items()}


def input_amax_from_scale(fmt: str, input_scale: torch.Tensor | None) -> torch.Tensor | None:
    """The calibrated activation amax a stored input_scale stands for."""
    if input_scale is None:
        return None
    bound = E2M1_MAX * E4M3_MAX if fmt == "nvfp4" else E4M3_MAX
    return input_scale.float() * bound
