"""The torchao-quantized Hugging Face checkpoint of an int recipe (int4 weight-only, int8
dynamic activations + int4 weights): the seed's deploy step (`quantize_` after QAT) as a
checkpoint that `from_pretrained` loads back quantized.

`quantized/` holds config.json with a `quantization_config` of quant_method torchao (the exact
torchao config, high-precision linears excluded), the weights as torchao tensors in
safetensors, the tokenizer and generation config.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from contract.recipe import Recipe
from stages.hf_model import load_causal_lm


def write_torchao_checkpoint(model_dir: Path, model: nn.Module, tokenizer: Any, target: Path, recipe: Recipe) -> None:
    """Quantize the trained weights in `model_dir` as `recipe` deploys them and save to `target`.
    `model` is the same checkpoint already loaded (it names the linears that stay bf16)."""
    from stages.precision.torchao_backend import deployment_config

    config = deployment_config(model, recipe)
    quantized = load_causal_lm(model_dir, "bfloat16", "inputs.model", quantization_config=config)
    partial = target.with_name(f".{target.name}.partial")  # renamed when complete: never half a checkpoint
    shutil.rmtree(partial, ignore_errors=True)
    quantized.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def activation_scaling(recipe: Recipe) -> str:
    """int8_int4 quantizes activations per token at run time; int4 weight-only leaves them bf16."""
    return "dynamic" if recipe.fprop.input.quantized else "none"
