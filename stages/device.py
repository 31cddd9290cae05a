"""Where a stage computes: the one place that turns `device: auto|cpu|cuda` into a torch device."""

from __future__ import annotations

import torch

from stages.runtime import StageInputError


def resolve_device(choice: str, field: str = "params.device") -> torch.device:
    """auto: cuda when a CUDA device is visible, else cpu; cuda without one is bad input."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise StageInputError(f"{field}: cuda requested but no CUDA device is visible; choose cpu or auto")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
