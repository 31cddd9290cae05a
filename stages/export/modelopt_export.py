"""ModelOpt's own exporter (`export_hf_checkpoint`) for a model dir quantized by ModelOpt.

It needs CUDA (NVFP4 quantizers assert on CUDA tensors) and the dir's `modelopt_state.pt`
(written by ptq/train with backend modelopt) to rebuild the quantizers, whose calibrated
amax come from `quantizer_state.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stages.export.sources import quantizer_state

MODELOPT_STATE = "modelopt_state.pt"


def modelopt_unavailable(model_dir: Path) -> str | None:
    """Why ModelOpt's exporter cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not (Path(model_dir) / MODELOPT_STATE).exists():
        return f"{model_dir} has no {MODELOPT_STATE} (the model was not quantized by ModelOpt)"
    try:
        import modelopt.torch.export  # noqa: F401
    except ImportError as error:
        return f"nvidia-modelopt not importable ({error})"
    return None


def restore_modelopt_model(model_dir: Path, device: torch.device) -> nn.Module:
    """The HF model with ModelOpt's quantizers restored and their amax loaded."""
    import modelopt.torch.opt as mto
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    state = torch.load(Path(model_dir) / MODELOPT_STATE, weights_only=False)
    model = mto.restore_from_modelopt_state(model, state)
    amax = {k: v.to(device) for k, v in quantizer_state(model_dir).items()}
    missing = [k for k in amax if k not in model.state_dict()]
    if missing:
        raise RuntimeError(f"restored ModelOpt model lacks quantizer buffers {missing[:3]}")
    model.load_state_dict(amax, strict=False)
    return model


def export_with_modelopt(model_dir: Path, target: Path) -> Path:
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoTokenizer

    model = restore_modelopt_model(model_dir, torch.device("cuda"))
    target.mkdir(parents=True, exist_ok=True)
    export_hf_checkpoint(model, export_dir=str(target))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return target
