"""Which recipe runs on which backend on this machine, and why not where it does not.

Each cell is the real thing, not a lookup table: `prepare_model` on a two-layer MLP on the
device, then one forward and backward in bfloat16. What fails says so in the same one line
a training run would stop with (and names what to choose instead).
`python -m stages.precision [--device cpu|cuda] [--json] [recipe ...]` prints the matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from contract.recipe import Recipe
from stages.precision.convert import BACKENDS, prepare_model
from stages.precision.errors import PrecisionUnavailable

WIDTH = 256  # divisible by every block and group size the built-ins use


def _probe_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH)).to(device, torch.bfloat16)


def why_not(recipe: Recipe, backend: str, device: torch.device) -> str | None:
    """None when `recipe` trains on `backend` here, else the one-line reason."""
    model = _probe_model(device)
    x = torch.randn(32, WIDTH, device=device, dtype=torch.bfloat16)
    try:
        prepared = prepare_model(model, recipe, backend, calibrate=lambda m: m(x))
        with prepared.autocast():
            prepared.model(x).float().square().mean().backward()
    except PrecisionUnavailable as error:
        return str(error)
    except (RuntimeError, NotImplementedError, AssertionError, TypeError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"recipe {recipe.name}: backend {backend} failed here ({type(error).__name__}: {first[:200]})"
    return None


def support_matrix(recipes: list[Recipe], device: torch.device) -> dict[str, dict[str, str | None]]:
    """recipe name -> backend -> None (runs) or why not."""
    return {recipe.name: {backend: why_not(recipe, backend, device) for backend in BACKENDS} for recipe in recipes}
