"""ModelOpt's unified Hugging Face checkpoint, written by our packer.

`quantized/` holds: config.json (with `quantization_config`), model.safetensors (quantized
linears as packing.py says, every other tensor as in the model), hf_quant_config.json, the
tokenizer and generation config. The two json documents come from ModelOpt's own torch-free
helpers (`process_layer_quant_config`, `convert_hf_quant_config_format`) so they match what
`export_hf_checkpoint` writes field for field; the producer version is the installed ModelOpt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contract.formats import INFERENCE_FORMATS
from stages.deployment.packing import PACKERS, LinearAmax
from stages.device import resolve_device

HF_QUANT_CONFIG = "hf_quant_config.json"
def hf_quant_config(model: nn.Module, fmt: str, quantized: set[str]) -> dict[str, Any]:
    """hf_quant_config.json as ModelOpt's get_quant_config builds it: mtq.quantize gives every
    nn.Linear and nn.Embedding quantizers; the ones left high precision are listed as excluded."""
    try:
        import modelopt
        from modelopt.torch.export.quant_utils import process_layer_quant_config
    except ImportError as error:
        raise RuntimeError(f"writing hf_quant_config.json needs nvidia-modelopt ({error}); pip install nvidia-modelopt") from None
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            layers[f"{name}.quantization"] = fmt if name in quantized else None
            layers[f"{name}.awq_block_size"] = INFERENCE_FORMATS[fmt].block_size if name in quantized else 0
    quantization: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": None}
    quantization.update(process_layer_quant_config(layers))
    return {"producer": {"name": "modelopt", "version": modelopt.__version__}, "quantization": quantization}


def pack_device() -> torch.device:
    """Where packing runs: CUDA when there is one (ModelOpt's device; see packing.py)."""
    return resolve_device("auto")


def pack_linear(fmt: str, weight: torch.Tensor, amax: LinearAmax, device: torch.device) -> dict[str, torch.Tensor]:
    on_device = LinearAmax(amax.weight.to(device), None if amax.input is None else amax.input.to(device))
    return {k: v.contiguous().cpu() for k, v in PACKERS[fmt](weight.detach().to(device), on_device).items()}


def quantized_state_dict(
    model: nn.Module, fmt: str, amax: dict[str, LinearAmax], device: torch.device
) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, linear_amax in amax.items():
        weight = state.pop(f"{name}.weight")
        for suffix, tensor in pack_linear(fmt, weight, linear_amax, device).items():
            state[f"{name}.{suffix}"] = tensor
    return state


def write_unified_checkpoint(
    model: nn.Module, tokenizer: Any, out_dir: Path, fmt: str, amax: dict[str, LinearAmax]
) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = hf_quant_config(model, fmt, set(amax))
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    state = quantized_state_dict(model, fmt, amax, pack_device())
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # HF ties it back on load
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    config_json = json.loads((out_dir / "config.json").read_text())
    config_json["quantization_config"] = convert_hf_quant_config_format(config)
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=4))
    (out_dir / HF_QUANT_CONFIG).write_text(json.dumps(config, indent=4))
    tokenizer.save_pretrained(out_dir)
    return out_dir
