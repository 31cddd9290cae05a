"""Loading the student/teacher and writing the final Hugging Face checkpoint.

The final `model/` is plain HF (safetensors, the architecture's own parameter names, in the
training dtype) whatever the recipe did to the modules: the gathered state dict is filtered
to the keys of a fresh model of the same config (built on the meta device, so no memory),
which strips fake-quantizer modules (torchao, ModelOpt) without converting anything. The
quantizer tensors that were left out (amax, scales) go to `quantizer_state.safetensors` and
the recipe to `precision.json`, for export and eval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)

from contract.files import write_json_atomic
from stages.hf_model import MODEL_DIR, PRECISION_FILE, QUANTIZER_STATE_FILE
from stages.train.distributed import World


def save_final(
    model: nn.Module, tokenizer: Any, out_dir: Path, world: World, precision: dict[str, Any], extra_files: dict[str, Any]
) -> Path:
    """Write `<out>/model/` on rank 0 (the full state dict is gathered collectively first).

    `extra_files` maps a file name inside model/ to an object torch.save writes (e.g. ModelOpt's
    `modelopt_state`).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    target = Path(out_dir) / MODEL_DIR
    if world.is_main:
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config)
        expected = set(plain.state_dict())
        missing = sorted(expected - set(full))
        if missing:
            raise RuntimeError(f"the prepared model lost HF parameters {missing[:3]}...; the recipe must keep their names")
        weights = {k: v.contiguous() for k, v in full.items() if k in expected}
        quantizer = {k: v.contiguous() for k, v in full.items() if k not in expected and isinstance(v, torch.Tensor)}
        plain.config.architectures = [type(plain).__name__]
        target.mkdir(parents=True, exist_ok=True)
        plain.save_pretrained(target, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(target)
        if quantizer:
            save_file(quantizer, str(target / QUANTIZER_STATE_FILE))
        for name, payload in extra_files.items():
            torch.save(payload, target / name)
        files = {"quantizer_state": QUANTIZER_STATE_FILE if quantizer else None, **{n: n for n in extra_files}}
        write_json_atomic(target / PRECISION_FILE, {**precision, "files": files})
    return target

