"""Linear-layer surgery every precision backend shares: which nn.Linear modules a recipe converts
(all but its `high_precision` globs) and swapping a module in place by its qualified name."""

from __future__ import annotations

import fnmatch

from torch import nn

from contract.recipe import Recipe


def stays_high_precision(name: str, patterns: list[str]) -> bool:
    """A pattern matches the module's qualified name or any module above it."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def linear_names(model: nn.Module, recipe: Recipe) -> list[str]:
    """Qualified names of the nn.Linear modules a recipe converts."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not stays_high_precision(name, recipe.high_precision)
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
