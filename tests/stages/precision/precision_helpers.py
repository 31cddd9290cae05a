"""Tiny models for the precision tests: random init, no hub, built in milliseconds."""

from __future__ import annotations

import warnings

import pytest
import torch

from contract.recipe import Recipe, load_recipe, parse_recipe


def tiny_qwen3(layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
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



FP32_UNIT_ROUNDOFF = 2.0**-24


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n fp32 roundings, e.g. of
    a dot product of length n (|computed - exact| <= gamma_n * sum |a_i b_i|)."""
    return n * FP32_UNIT_ROUNDOFF / (1 - n * FP32_UNIT_ROUNDOFF)


def nvfp4_error_bound(x: torch.Tensor) -> torch.Tensor:
    """Per element, how far NVFP4 (torchao's arithmetic, blocks of 16 along the last dim) may
    move x: one step of its block, from the format's definition alone.

    The decoded block scale is s = e4m3(amax_b / (6 g)) * g, g = amax / (6 * 448), never below
    2^-6 g (no subnormal scales); E4M3 rounds it by at most 2^-4 relative. Round to nearest on
    the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} errs by at most half a gap, <= 1 unit of s (the
    4..6 gap); when s rounded down the clamp at 6 s errs by amax_b - 6 s < s. So |q - x| <= s.
    """
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x.float(), (0, (-k) % 16))
    blocks = padded.reshape(*padded.shape[:-1], -1, 16)
    g = x.float().abs().max() / (6 * 448)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    s = torch.maximum(block_amax / 6 * (1 + 2.0**-4), 2.0**-6 * g) * (1 + 2.0**-20)  # fp32 slack
    return s.expand_as(blocks).reshape(padded.shape)[..., :k]
