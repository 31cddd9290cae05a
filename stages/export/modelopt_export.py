"""ModelOpt's own exporter (`export_hf_checkpoint`) for a model dir quantized by ModelOpt.

It needs CUDA (NVFP4 quantizers assert on CUDA tensors) and the dir's `modelopt_state.pt`
(written by ptq/train with backend modelopt) to rebuild the quantizers, whose calibrated
amax come from `quantizer_state.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stages.hf_model import (
    MODELOPT_STATE_FILE,
    load_causal_lm,
    modelopt_state,
    quantizer_state,
)


def modelopt_unavailable(model_dir: Path) -> str | None:
    """Why ModelOpt's exporter cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not (Path(model_dir) / MODELOPT_STATE_FILE).exists():
        return f"{model_dir} has no {MODELOPT_STATE_FILE} (the model was not quantized by ModelOpt)"
    try:
        import modelopt.torch.export  # noqa: F401
    except ImportError as error:
        return f"nvidia-modelopt not importable ({error})"
    return None


def restore_modelopt_model(model_dir: Path, device: torch.device) -> nn.Module:
    """The HF model with ModelOpt's quantizers restored and their amax loaded."""
    from stages.precision.modelopt_backend import SavedQuantizers, restore_quantizers

    model = load_causal_lm(model_dir, "bfloat16", "inputs.model").to(device).eval()
    return restore_quantizers(model, SavedQuantizers(modelopt_state(model_dir), quantizer_state(model_dir)))


def export_with_modelopt(model_dir: Path, target: Path) -> Path:
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoTokenizer

    model = restore_modelopt_model(model_dir, torch.device("cuda"))
    target.mkdir(parents=True, exist_ok=True)
    export_hf_checkpoint(model, export_dir=str(target))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return target
