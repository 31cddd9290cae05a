"""A model in its deployed precision: weights as stored (dequantized from the packed form),
activations quantized per the recipe's fprop input format, forward only.

Sources (what `inputs.model` points at):
  export dir (export.json)   quantized/ unpacked (deployed), or bf16/ (precision bf16 or a
                             recipe without a packed form)
  train/ptq dir (model/ + precision.json)  packed in memory exactly as export would pack it,
                             then unpacked: eval-ptq sees what an export of the PTQ model deploys
  plain HF dir or hub id     as is (eval-base)
  export dir, packer torchao  quantized/ loaded by transformers as torchao tensors (int4,
                             int8_int4): torchao's own quantized forward
Int recipes from a train/ptq dir are quantized in memory with the same torchao config. Where
torchao cannot quantize so on this machine (int4 weight-only without its GPU kernels: export
then says quantized_skipped), they deploy as the recipe's forward fake quant on the bf16
weights (prepare_model with backend torchao), recorded as precision
"<inference_format>-fake-quant".
Activations: static scale from the stored input_scale when there is one (amax = input_scale *
2688 for NVFP4, * 448 for FP8: on a CUDA-packed checkpoint this may be an ulp off the
calibrated amax, as the scale is), else the tensor's own amax at run time ("dynamic");
NVFP4/MX block scales are always per block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contract.formats import INFERENCE_FORMATS
from contract.recipe import OperandSpec, Recipe
from stages.deployment.packing import UNPACKERS, input_amax_from_scale
from stages.deployment.torchao import activation_scaling
from stages.deployment.unified import pack_device, pack_linear
from stages.precision.surgery import linear_names, replace_module

QUANT_ALGO_FORMAT = {fmt.quant_algo: name for name, fmt in INFERENCE_FORMATS.items() if fmt.quant_algo}


def quantize_activation(x: torch.Tensor, spec: OperandSpec, amax: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize an fp32 activation as the deployed GEMM reads it."""
    from stages.precision.formats import fake_quantizer
    from stages.precision.nvfp4 import dequantize_nvfp4, quantize_nvfp4

    if spec.format == "nvfp4":  # the deployed GEMM scales from the calibrated amax, not the tensor's own
        return dequantize_nvfp4(quantize_nvfp4(x, global_amax=amax), torch.float32)
    try:
        return fake_quantizer(spec.format)(x, spec, amax)
    except ValueError:
        raise ValueError(f"activation format {spec.format} has no deployed form here") from None


class DeployedLinear(nn.Module):
    """y = quant(x) @ W_deployed^T + b, in float32 (the dequantized weight is exact in fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: OperandSpec, input_amax: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        self.register_buffer("input_amax", input_amax)
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = quantize_activation(x.to(torch.float32), self.spec, self.input_amax)
        return F.linear(x_q, self.weight, self.bias).to(x.dtype)


@dataclass
class Deployment:
    model: nn.Module
    precision: str  # what ran: "bf16" or the packed format (nvfp4, fp8, mxfp8)
    activation_scaling: str  # static | dynamic | none
    packer: str | None  # who packed the evaluated weights (export's packer, "ours" in memory)


def deploy_packed(model: nn.Module, recipe: Recipe, tensors: dict[str, dict[str, torch.Tensor]], fmt: str) -> str:
    """Replace each packed linear by a DeployedLinear; returns the activation scaling used."""
    static = True
    for name, packed in tensors.items():
        linear = model.get_submodule(name)
        device = linear.weight.device
        amax = input_amax_from_scale(fmt, packed.get("input_scale"))
        static = static and amax is not None
        amax = None if amax is None else amax.to(device)
        weight = UNPACKERS[fmt]({k: v.to(device) for k, v in packed.items()})
        replace_module(model, name, DeployedLinear(weight, linear.bias, recipe.fprop.input, amax))
    return "static" if static else "dynamic"


def pack_in_memory(model: nn.Module, recipe: Recipe, fmt: str, model_dir: Path) -> Deployment:
    from stages.deployment.amax import linear_amax
    from stages.hf_model import quantizer_state

    amax = linear_amax(model, linear_names(model, recipe), quantizer_state(model_dir), fmt)
    device = pack_device()  # where an export on this machine packs, so both deploy the same bytes
    tensors = {name: pack_linear(fmt, model.get_submodule(name).weight, a, device) for name, a in amax.items()}
    scaling = deploy_packed(model, recipe, tensors, fmt)
    return Deployment(model, fmt, scaling, "ours")


def load_unified(qdir: Path, recipe: Recipe, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, str, str]:
    """A ModelOpt unified HF checkpoint -> model with DeployedLinear modules; (model, fmt, scaling)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    quant = json.loads((qdir / "hf_quant_config.json").read_text())["quantization"]
    fmt = QUANT_ALGO_FORMAT.get(quant["quant_algo"])
    if fmt is None:
        raise ValueError(f"{qdir}/hf_quant_config.json: quant_algo {quant['quant_algo']} is not one of {sorted(QUANT_ALGO_FORMAT)}")
    config = AutoConfig.from_pretrained(qdir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we dequantize ourselves; HF must not pick a quantizer
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(qdir.glob("*.safetensors")):
        state.update(load_file(str(path)))
    packed_names = sorted(k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale"))
    packed = {n: {k.removeprefix(n + "."): state.pop(k) for k in list(state) if k.startswith(n + ".") and k.count(".") == n.count(".") + 1}
              for n in packed_names}
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = {f"{n}.weight" for n in packed_names}
    if config.tie_word_embeddings:
        expected_missing.add("lm_head.weight")
    if unexpected or set(missing) - expected_missing:
        raise ValueError(f"{qdir}: checkpoint does not match the architecture (missing {sorted(set(missing) - expected_missing)[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(device)
    scaling = deploy_packed(model, recipe, packed, fmt)
    return model.eval(), fmt, scaling


def torchao_deployment(model: nn.Module, recipe: Recipe) -> Deployment:
    """An int recipe's deployed form, quantized in memory as export's torchao checkpoint is."""
    from stages.precision import PrecisionUnavailable
    from stages.precision.torchao_backend import quantize_for_deployment

    try:
        quantize_for_deployment(model, recipe)
    except PrecisionUnavailable:
        return fake_quant_deployment(model, recipe)
    return Deployment(model.eval(), recipe.inference_format, activation_scaling(recipe), "torchao")


def fake_quant_deployment(model: nn.Module, recipe: Recipe) -> Deployment:
    """The recipe's forward fake quant, switched on as at the end of training (no packed form)."""
    from stages.precision import PrecisionUnavailable, prepare_model
    from stages.runtime import StageInputError

    backend = "torchao" if recipe.formats & {"int4", "int8"} else "emulated"
    try:
        prepared = prepare_model(model, recipe, backend)
    except PrecisionUnavailable as error:
        raise StageInputError(f"params.recipe: {error}") from None
    prepared.on_step(recipe.fake_quant_after_steps)
    return Deployment(prepared.model.eval(), f"{recipe.inference_format}-fake-quant", activation_scaling(recipe), None)
