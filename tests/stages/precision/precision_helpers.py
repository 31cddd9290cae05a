"""Tiny models for the precision tests: random init, no hub, built in milliseconds."""

from __future__ import annotations

import warnings

import pytest
import torch

from contract.recipe import Recipe, load_recipe, parse_recipe


def tiny_qwen3() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Qwen3ForCausalLM(config)


def recipe_with(name: str, **changes: object) -> Recipe:
    """A built-in recipe with some top-level fields changed, validated like a user's YAML."""
    data = load_recipe(name).model_dump()
    data.update(changes)
    return parse_recipe(data, f"{name} (modified)")

