"""Shared by the ptq, export and eval tests (import as `tests.stages.ptq.quant_testkit`): the tiny
Qwen3 fixture, a tiny dataset in the preprocess format, stage specs, and a hand-written
reference of the deployed NVFP4 forward."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contract.files import write_json_atomic
from contract.markers import mark_succeeded
from tests.spec_files import write_spec_file

REPO = Path(__file__).resolve().parents[3]
TINY_MODEL = REPO / "fixtures" / "models" / "tiny-qwen3"
MMLU_TINY = REPO / "fixtures" / "mmlu_tiny"
SEQ_LEN = 32
# The linears a recipe converts in the tiny Qwen3 (lm_head and embeddings stay high precision).
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def linear_names(layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS]


def write_token_dataset(data_dir: Path, n_train: int = 12, n_val: int = 8) -> Path:
    """train/ and val/ with int32 input_ids, labels (-100 on the first quarter), position_ids."""
    import datasets

    def rows(n: int, offset: int) -> dict[str, list[list[int]]]:
        ids = [[10 + (7 * (i + offset) + (1 + (i + offset) % 3) * t) % 200 for t in range(SEQ_LEN)] for i in range(n)]
        prompt = SEQ_LEN // 4
        return {"input_ids": ids, "labels": [[-100] * prompt + r[prompt:] for r in ids],
                "position_ids": [list(range(SEQ_LEN)) for _ in range(n)]}

    features = datasets.Features({c: datasets.Sequence(datasets.Value("int32")) for c in ("input_ids", "labels", "position_ids")})
    datasets.Dataset.from_dict(rows(n_train, 0), features=features).save_to_disk(str(data_dir / "train"))
    datasets.Dataset.from_dict(rows(n_val, 1000), features=features).save_to_disk(str(data_dir / "val"))
    mark_succeeded(data_dir, "data-fingerprint")
    return data_dir


def stage_spec(out: Path, kind: str, inputs: dict[str, Path], params: dict[str, Any]) -> Path:
    return write_spec_file(out, kind, params, inputs)


def fake_train_dir(out: Path, recipe: str, source: Path = TINY_MODEL) -> Path:
    """A succeeded train stage dir: `model/` = the fixture model, precision.json naming the recipe."""
    from stages.precision import load_recipe

    shutil.copytree(source, out / "model")
    write_json_atomic(out / "model" / "precision.json", {
        "recipe": load_recipe(recipe).model_dump(mode="json"), "recipe_source": recipe, "backend": "emulated",
        "method": "sft", "dtype": "bfloat16", "files": {"quantizer_state": None}})
    mark_succeeded(out, "fp-train")
    return out


def val_rows(data_dir: Path, rows: int):
    from stages.batches import TokenSplit

    return TokenSplit(data_dir, "val").rows(list(range(rows)))


def mean_ce(model: nn.Module, batch) -> float:
    from stages.losses import cross_entropy_sum

    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return float(cross_entropy_sum(logits, batch.labels).double()) / batch.label_tokens


class HandNvfp4Linear(nn.Module):
    """The deployed NVFP4 GEMM written from stages.precision's quantizer: weight quantized with
    the (fused) weight amax as global amax, input with the calibrated input amax, fp32 matmul."""

    def __init__(self, linear: nn.Linear, weight_amax: float, input_amax: float) -> None:
        super().__init__()
        from stages.precision import dequantize_nvfp4, quantize_nvfp4

        w = quantize_nvfp4(linear.weight.detach(), global_amax=torch.tensor(weight_amax))
        self.weight = dequantize_nvfp4(w)
        self.input_amax = torch.tensor(input_amax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from stages.precision import dequantize_nvfp4, quantize_nvfp4

        x_q = dequantize_nvfp4(quantize_nvfp4(x.float(), global_amax=self.input_amax))
        return F.linear(x_q, self.weight).to(x.dtype)


def fused_amax(amax: dict[str, dict[str, float]], role: str) -> dict[str, float]:
    """Per-linear amax after ModelOpt's fusion: q/k/v and gate/up share their max."""
    out = {name: roles[role] for name, roles in amax.items()}
    for layer in range(2):
        for group in FUSED:
            names = [f"model.layers.{layer}.{p}" for p in group]
            shared = max(out[n] for n in names)
            out.update({n: shared for n in names})
    return out
