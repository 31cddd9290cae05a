"""`python -m stages.precision`: the recipe x backend support matrix of this machine (support.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from contract.recipe import RecipeError, builtin_recipe_names, load_recipe
from stages.device import resolve_device
from stages.precision.support import support_matrix
from stages.runtime import StageInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.precision", description=__doc__)
    parser.add_argument("recipes", nargs="*", help="built-in names or YAML paths (default: every built-in)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", action="store_true", help="the matrix as JSON: recipe -> backend -> null or why not")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device, "--device")
    except StageInputError as error:
        print(error, file=sys.stderr)
        return 2
    try:
        recipes = [load_recipe(name) for name in args.recipes or builtin_recipe_names()]
    except RecipeError as error:
        print(f"recipes: {error}", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):  # libraries print as they convert (ModelOpt: "Inserted N quantizers")
        matrix = support_matrix(recipes, device)
    if args.json:
        print(json.dumps(matrix, indent=2))
        return 0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# What trains here ({where}, torch {torch.__version__})\n")
    for recipe, cells in matrix.items():
        runs = [backend for backend, reason in cells.items() if reason is None]
        print(f"{recipe}: {', '.join(runs) or 'no backend'}")
        for backend, reason in cells.items():
            if reason is not None:
                print(f"  {backend}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
