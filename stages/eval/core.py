"""The eval stage: validation loss in the deployed precision, plus optional lm-eval accuracy.

Inputs: `data` (preprocess output; the `val` split), `model` (an export, ptq or train dir;
absent for eval-base, which loads params.model). See deployed.py for what "deployed" means.
val_loss = sum of next-token cross entropy over label tokens / label tokens (the first
`max_batches` micro-batches of val, in order). Output dir: `eval.json` (the summary),
`val_sequences.json` (each sequence's loss sum and label tokens: the report's bootstrap samples
them) and, with lm_eval_tasks, `lm_eval.json` (lm-eval's results).
Summary: val_loss, val_tokens, val_sequences, acc_<task> and questions_<task> (its n) per task,
precision (what ran), activation_scaling, packer (of the evaluated weights), recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from contract.files import write_json_atomic
from contract.formats import deployed_format
from contract.params.eval import EvalStageParams
from contract.recipe import Recipe
from stages.deployment.export_record import read_export_record
from stages.device import resolve_device
from stages.eval.deployed import (
    Deployment,
    fake_quant_deployment,
    load_unified,
    pack_in_memory,
    torchao_deployment,
)
from stages.hf_model import (
    DTYPES,
    causal_lm_logits,
    load_causal_lm,
    load_tokenizer,
    read_precision,
    resolve_model_source,
    source_revision,
)
from stages.runtime import StageContext, StageInputError
from stages.versions import package_versions

SEQUENCES_FILE = "val_sequences.json"  # SequenceLosses: what the report's intervals resample


def _check_recipe(params: EvalStageParams, recorded: Recipe | None, where: Path) -> Recipe:
    asked = params.recipe
    if recorded is None:
        return asked
    if recorded.name != asked.name:
        raise StageInputError(f"params.recipe: {asked.name} but {where} was made with recipe {recorded.name}")
    return recorded


def load_deployment(ctx: StageContext, params: EvalStageParams, device: torch.device) -> tuple[Deployment, Recipe, Any]:
    dtype = DTYPES[params.dtype]
    source = ctx.spec.inputs.get("model")
    export = read_export_record(Path(source)) if source is not None else None
    if export is not None:
        recipe = _check_recipe(params, export.recipe, Path(source))
        quantized = export.checkpoints.quantized
        if params.precision == "deployed" and quantized:
            qdir = Path(source) / quantized
            tokenizer = load_tokenizer(qdir, "inputs.model")
            if export.packer == "torchao":  # transformers loads it back as torchao's quantized tensors
                model = load_causal_lm(qdir, params.dtype, "inputs.model").to(device).eval()
                return Deployment(model, recipe.inference_format, export.activation_scaling, "torchao"), recipe, tokenizer
            model, fmt, scaling = load_unified(qdir, recipe, dtype, device)
            return Deployment(model, fmt, scaling, export.packer), recipe, tokenizer
        if params.precision == "deployed" and deployed_format(recipe.inference_format) and not export.quantized_skipped:
            raise StageInputError(f"inputs.model: {source} has no quantized checkpoint for {recipe.inference_format}; "
                                  "set eval.precision: bf16 or export.quantized_checkpoint: true")
        bdir = Path(source) / (export.checkpoints.bf16 or "")
        if not (bdir / "config.json").exists():
            raise StageInputError(f"inputs.model: {source} has no bf16 checkpoint; set export.bf16_checkpoint: true")
        tokenizer = load_tokenizer(bdir, "inputs.model")
        model = load_causal_lm(bdir, params.dtype, "inputs.model").to(device).eval()
        if params.precision == "deployed" and recipe.inference_format != "bf16":
            return fake_quant_deployment(model, recipe), recipe, tokenizer
        return Deployment(model, "bf16", "none", None), recipe, tokenizer
    path = resolve_model_source(source, params.model, "params.model")
    revision = source_revision(source, params.model_revision)
    precision = read_precision(Path(path)) if Path(path).is_dir() else None
    recipe = _check_recipe(params, Recipe.model_validate(precision["recipe"]) if precision else None, Path(path))
    tokenizer = load_tokenizer(path, "params.model", revision)
    model = load_causal_lm(path, params.dtype, "params.model", revision=revision).to(device).eval()
    if params.precision != "deployed" or recipe.inference_format == "bf16":
        return Deployment(model, "bf16", "none", None), recipe, tokenizer
    fmt = recipe.inference_format
    if deployed_format(fmt).checkpoint == "torchao":
        return torchao_deployment(model, recipe), recipe, tokenizer
    return pack_in_memory(model, recipe, fmt, Path(path)), recipe, tokenizer


@dataclass(frozen=True)
class SequenceLosses:
    """Per validation sequence (row of the val split, in order): the summed next-token cross
    entropy in nats and the label tokens it covers. The report bootstraps over these."""

    rows: list[int]
    loss_sums: list[float]
    tokens: list[int]

    @property
    def val_loss(self) -> float:
        return sum(self.loss_sums) / max(sum(self.tokens), 1)

    def to_json(self) -> dict[str, Any]:
        return {"unit": "nats", "rows": self.rows, "loss_sum": self.loss_sums, "tokens": self.tokens}


@torch.no_grad()
def validation_losses(model: torch.nn.Module, data_dir: Path, micro_batch: int, max_batches: int | None, device: torch.device) -> SequenceLosses:
    from stages.batches import IGNORE_INDEX, TokenSplit, validation_batches
    from stages.losses import shifted

    split = TokenSplit(data_dir, "val")
    rows: list[int] = []
    loss_sums: list[float] = []
    tokens: list[int] = []
    for batch in validation_batches(split, micro_batch, 0, 1, max_batches):
        batch = batch.to(device)
        logits = causal_lm_logits(model, batch)
        logits, labels = shifted(logits, batch.labels)
        per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        rows.extend(range(len(rows), len(rows) + labels.shape[0]))  # validation_batches reads rows in order
        loss_sums.extend(per_token.double().sum(dim=1).tolist())
        tokens.extend((labels != IGNORE_INDEX).sum(dim=1).tolist())
    return SequenceLosses(rows, loss_sums, tokens)


def run(ctx: StageContext) -> dict[str, Any]:
    params = ctx.params_as(EvalStageParams)
    device = resolve_device(params.device)
    deployment, recipe, tokenizer = load_deployment(ctx, params, device)
    losses = validation_losses(deployment.model, ctx.input_dir("data"), params.micro_batch, params.max_batches, device)
    write_json_atomic(ctx.output_dir / SEQUENCES_FILE, losses.to_json(), sort_keys=False)
    summary: dict[str, Any] = {
        "val_loss": losses.val_loss, "val_tokens": sum(losses.tokens), "val_sequences": len(losses.rows),
        "precision": deployment.precision,
        "activation_scaling": deployment.activation_scaling, "packer": deployment.packer or "none",
        "recipe": recipe.name, "versions": package_versions(),
    }
    if params.lm_eval_tasks:
        from stages.eval.harness import run_lm_eval

        results = run_lm_eval(deployment.model, tokenizer, params, device)
        write_json_atomic(ctx.output_dir / "lm_eval.json", results)
        for task, metrics in results.items():
            summary[f"acc_{task}"] = metrics["acc"]
            summary[f"questions_{task}"] = metrics["n"]
    write_json_atomic(ctx.output_dir / "eval.json", summary)
    ctx.tracker.set_tags({"precision": deployment.precision, "packer": deployment.packer or "none", "recipe": recipe.name})
    return summary
