"""Hugging Face models as the stages hand them on, and loading them with one-line errors.

A model stage (train, ptq) writes `<stage>/model/`: a plain HF checkpoint, `precision.json`
(the recipe it was made with), `quantizer_state.safetensors` (amax and scales left out of
the checkpoint) and, when ModelOpt quantized it, `modelopt_state.pt`. The stages that read
one (train, ptq, export, eval) take either such a stage dir, a plain HF dir, or a hub id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.batches import Batch, sequence_breaks
from stages.runtime import StageInputError

MODEL_DIR = "model"
PRECISION_FILE = "precision.json"
QUANTIZER_STATE_FILE = "quantizer_state.safetensors"
MODELOPT_STATE_FILE = "modelopt_state.pt"  # backend modelopt only: mto.modelopt_state (its quantizer modules)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def model_dir_of(stage_dir: Path, field: str = "inputs.model") -> Path:
    """`<stage>/model` when it holds an HF checkpoint, else the dir itself (a plain HF dir)."""
    for candidate in (Path(stage_dir) / MODEL_DIR, Path(stage_dir)):
        if (candidate / "config.json").exists():
            return candidate
    raise StageInputError(f"{field}: {stage_dir} holds no HF checkpoint (no config.json in it or in model/)")


def resolve_model_source(stage_dir: Path | None, model: str | None, field: str, input_field: str = "inputs.model") -> str:
    """The upstream stage's model when the stage has that input, else `model` (params `field`):
    an HF dir or a hub id."""
    if stage_dir is not None:
        return str(model_dir_of(stage_dir, input_field))
    if not model:
        raise StageInputError(f"{field}: no model given; set {field} or give the stage a '{input_field.split('.')[-1]}' input")
    if model.startswith(("/", "./", "../", "~")) and not (Path(model).expanduser() / "config.json").exists():
        raise StageInputError(f"{field}: {model} is not a Hugging Face model dir (no config.json)")
    return model


def source_revision(stage_dir: Path | None, revision: str | None) -> str | None:
    """The hub revision to load `resolve_model_source`'s answer at: none for an upstream stage's
    model dir (the run made it), the params' revision for a hub id (params refuse one with a path)."""
    return None if stage_dir is not None else revision


def _at(revision: str | None) -> str:
    return f" at revision {revision}" if revision else ""


def read_precision(model_dir: Path) -> dict[str, Any] | None:
    """The recipe record a model stage wrote next to its checkpoint; None for a plain HF dir."""
    path = Path(model_dir) / PRECISION_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StageInputError(f"inputs.model: {path}: invalid JSON ({error.msg} at line {error.lineno})") from None


def quantizer_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The amax (and scale) tensors a model stage kept beside its weights, by state-dict key."""
    path = Path(model_dir) / QUANTIZER_STATE_FILE
    if not path.exists():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def modelopt_state(model_dir: Path) -> dict[str, Any] | None:
    path = Path(model_dir) / MODELOPT_STATE_FILE
    return torch.load(path, weights_only=False) if path.exists() else None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_causal_lm(source: str | Path, dtype: str, field: str, quantization_config: Any = None,
                   revision: str | None = None) -> nn.Module:
    """`quantization_config` (e.g. a TorchAoConfig) quantizes the weights as they load; `revision`
    pins a hub id (None: the hub's main, or a local dir as it is)."""
    from transformers import AutoModelForCausalLM

    # Passed only when given: an explicit None would drop the quantization_config a torchao checkpoint carries.
    quantization = {} if quantization_config is None else {"quantization_config": quantization_config}
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], revision=revision, **quantization)
    except OSError as error:
        raise StageInputError(f"{field}: cannot load {str(source)!r}{_at(revision)} ({_first_line(error)})") from None


def load_tokenizer(source: str | Path, field: str, revision: str | None = None) -> Any:
    """Called before the model is, so a missing tokenizer fails before any real work."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        raise StageInputError(
            f"{field}: no tokenizer loadable from {str(source)!r}{_at(revision)} ({_first_line(error)})") from None


def causal_lm_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits for a batch, with its attention masks made from what the host knows.

    Given position_ids and no mask, transformers finds out whether rows are packed by reading a
    device tensor on the host in every forward (masking_utils.find_packed_sequence_indices). That
    read waits for the GPU to finish everything queued, so the host loses the lead it built during
    the backward and each micro-batch's forward runs at the host's pace: the train stage's fp8
    step on an H200 was 1.5-5% slower than the same step in bench.step, which never reads back.
    `Batch.packed` was found on the host; from it, the masks transformers would build (equal
    bits, tests/stages/test_hf_model.py). A model whose masks are made otherwise (sliding-window
    layers, attention other than sdpa) gets transformers' own."""
    masks = _causal_masks(model.config, batch)
    return model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=masks, use_cache=False).logits


def _causal_masks(config: Any, batch: Batch) -> dict[str, torch.Tensor | None] | None:
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return None
    if not batch.packed:
        return {"full_attention": None}  # sdpa's is_causal, as transformers chooses for unpacked rows
    positions = batch.position_ids
    sequence = sequence_breaks(positions).cumsum(-1)
    tokens = positions.shape[-1]
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=positions.device).tril()
    # [B, 1, T, T], True where a token attends: earlier tokens of its own sequence.
    return {"full_attention": ((sequence[:, :, None] == sequence[:, None, :]) & causal)[:, None]}
