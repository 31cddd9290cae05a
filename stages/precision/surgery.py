"""Linear-layer surgery every precision backend shares: which nn.Linear modules a recipe converts
(all but its `high_precision` globs), which of them read the same x, and swapping a module in
place by its qualified name."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import TypeVar

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


L = TypeVar("L", bound=nn.Module)

# Sibling linears that read the same x, by Hugging Face model_type: decoders whose attention is
# self-attention only. A cross-attention's k/v read other states than its q (Mllama, BART), so a
# model type not listed here shares nothing: slower, never wrong.
_SAME_INPUT_SIBLINGS: dict[str, tuple[tuple[str, ...], ...]] = {
    model_type: (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    for model_type in ("qwen3", "qwen2", "llama", "mistral")
}


def input_owners(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Each name's input owner: the first of `names` among its siblings that read the same x
    (itself when it has none), so their quantizers of x can be one."""
    config = getattr(model, "config", None)
    groups = _SAME_INPUT_SIBLINGS.get(getattr(config, "model_type", None), ())
    order = {name: index for index, name in enumerate(names)}
    owners = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        siblings = next((group for group in groups if child in group), (child,))
        qualified = [f"{parent}.{sibling}" if parent else sibling for sibling in siblings]
        owners[name] = min((sibling for sibling in qualified if sibling in order), key=order.__getitem__)
    return owners


def swap_linears(model: nn.Module, names: list[str], build: Callable[[str, nn.Linear, L | None], L]) -> dict[str, L]:
    """Each named nn.Linear replaced in place by `build(name, linear, input_owner)`, in `names`
    order; `input_owner` is the layer already built whose quantizer of x this one shares
    (input_owners), None when it is its own."""
    owners, layers = input_owners(model, names), {}
    for name in names:
        layers[name] = build(name, model.get_submodule(name), layers.get(owners[name]))
        replace_module(model, name, layers[name])
    return layers


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
