"""Calibration shared by PTQ, export and training: forward passes over training rows, and the
amax (max |x|, max |W|) of the linears a recipe quantizes, as ModelOpt's `max` algorithm keeps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stages.batches import TokenSplit


def calibration_loop(split: TokenSplit, samples: int, batch: int, device: torch.device) -> Callable[[nn.Module], None]:
    rows = list(range(min(samples, len(split))))

    def forward_loop(model: nn.Module) -> None:
        with torch.no_grad():
            for start in range(0, len(rows), batch):
                b = split.rows(rows[start : start + batch]).to(device)
                model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False)

    return forward_loop


def record_amax_emulated(model: nn.Module, names: list[str], loop: Callable[[nn.Module], None]) -> dict[str, dict[str, torch.Tensor]]:
    """amax per linear: max |input| seen over the loop, max |weight| (ModelOpt `max` calibration)."""
    amax: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)
        amax[name] = {"weight": module.weight.detach().abs().max().float()}

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            seen = args[0].detach().abs().max().float()
            previous = amax[name].get("input")
            amax[name]["input"] = seen if previous is None else torch.maximum(previous, seen)

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        loop(model)
    finally:
        for handle in hooks:
            handle.remove()
    return amax
