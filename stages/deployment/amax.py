"""The per-linear amax the packers need, read from a model stage's output (stages/hf_model.py).
Shared by export (packs) and eval (deploys a ptq/train dir as exported).

amax of a linear, in order of preference:
  weight  `<linear>.weight_quantizer._amax` from `model/quantizer_state.safetensors` (ModelOpt
          names; written by ptq and by ModelOpt QAT), else max|W| of the stored weight
  input   `<linear>.input_quantizer._amax` likewise, else None (no calibration: activations
          are scaled per tensor at run time, and the export has no input_scale)
For block formats (nvfp4, mxfp8) linears that read the same input tensor (q/k/v, gate/up)
share the max of their amax, as ModelOpt's export does (`_fuse_shared_input_modules` ->
`preprocess_linear_fusion`: a fused GEMM has one global scale); it leaves per-tensor FP8 alone.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.deployment.packing import LinearAmax


def shared_input_groups(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Groups of linears fed the very same tensor in one forward (ModelOpt finds fusions so)."""
    seen: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []  # held so no later tensor reuses an address seen here
    hooks = []
    for name in names:
        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            alive.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.ones(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return [group for group in seen.values() if len(group) > 1]


UNFUSED_FORMATS = ("fp8",)


def linear_amax(model: nn.Module, names: list[str], state: dict[str, torch.Tensor], fmt: str) -> dict[str, LinearAmax]:
    """Per-linear amax (fp32 scalars); for block formats, fused groups unified to their max."""
    out: dict[str, LinearAmax] = {}
    for name in names:
        weight = state.get(f"{name}.weight_quantizer._amax")
        if weight is None:
            weight = model.get_submodule(name).weight.detach().abs().max()
        x = state.get(f"{name}.input_quantizer._amax")
        out[name] = LinearAmax(weight.float().reshape(()), None if x is None else x.float().reshape(()))
    if fmt in UNFUSED_FORMATS:
        return out
    for group in shared_input_groups(model, names):
        weight = torch.stack([out[n].weight for n in group]).max()
        inputs = [out[n].input for n in group]
        x = torch.stack(inputs).max() if all(v is not None for v in inputs) else None  # type: ignore[misc]
        for name in group:
            out[name] = LinearAmax(weight, x)
    return out
