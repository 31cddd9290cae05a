"""Loading the student/teacher and writing the final Hugging Face checkpoint.

The final `model/` is plain HF (safetensors, the architecture's own parameter names, in the
training dtype) whatever the recipe did to the modules: the gathered state dict is filtered
to the keys of a fresh model of the same config (built on the meta device, so no memory),
which strips fake-quantizer modules (torchao, ModelOpt) without converting anything. The
quantizer tensors that were left out (amax, scales) go to `quantizer_state.safetensors` and
the recipe to `precision.json`, for export and eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from stages.contract import write_json_atomic
from stages.runtime import StageInputError
from stages.train.distributed import World

MODEL_DIR = "model"
PRECISION_FILE = "precision.json"
QUANTIZER_STATE_FILE = "quantizer_state.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_model_source(role_dir: Path | None, fallback: str | None, field: str) -> str:
    """An upstream stage dir holds its checkpoint in `model/`; a plain HF dir or hub id is used as is."""
    if role_dir is not None:
        for candidate in (Path(role_dir) / MODEL_DIR, Path(role_dir)):
            if (candidate / "config.json").exists():
                return str(candidate)
        raise StageInputError(f"{field}: {role_dir} holds no HF checkpoint (no config.json in it or in model/)")
    if not fallback:
        raise StageInputError(f"{field}: no model given; set params.model or give the stage a 'model' input")
    if fallback.startswith(("/", "./", "../", "~")) and not (Path(fallback).expanduser() / "config.json").exists():
        raise StageInputError(f"{field}: {fallback} is not a Hugging Face model dir (no config.json)")
    return fallback


def load_causal_lm(source: str, dtype: str, field: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StageInputError(f"{field}: cannot load {source!r} ({first})") from None


def load_tokenizer(source: str, field: str) -> Any:
    """Checked at start, so a missing tokenizer fails before training, not after."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StageInputError(f"{field}: no tokenizer loadable from {source!r} ({first})") from None


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


def read_precision(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / PRECISION_FILE).read_text())
