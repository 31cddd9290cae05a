"""The export stage: deployable checkpoints of a trained (or PTQ'd) model.

Output dir:
  bf16/          plain HF checkpoint in bfloat16 + tokenizer (every run)
  quantized/     recipes whose inference_format is nvfp4, fp8 or mxfp8: ModelOpt's unified HF
                 checkpoint (see unified.py, packing.py): packed weights + scales,
                 hf_quant_config.json, quantization_config in config.json;
                 int4 or int8_int4 (TorchAO QAT): a torchao-quantized HF checkpoint
                 (torchao_export.py)
  export.json    stages/deployment/export_record.py's ExportRecord: {recipe, inference_format,
                  packer ("modelopt" | "ours" | "torchao" | null), activation_scaling ("static":
                  input_scale from calibration | "dynamic" | "none": bf16 activations),
                  source_backend, checkpoints: {bf16, quantized}, calibrated_in_export,
                  quantized_skipped: why there is no quantized/ for a quantized recipe (torchao
                  cannot quantize so on this machine, e.g. int4 weight-only without its GPU
                  kernels) or null}
Calibration: the model dir's `quantizer_state.safetensors` amax (ptq, ModelOpt QAT); a model
without calibrated input amax (SFT with emulated/te) is calibrated here when the stage has a
`data` input (first `calib_samples` train rows), else it is exported without input_scale
(activation_scaling "dynamic"), which NVFP4 deployments (TRT-LLM, vLLM) do not accept.
Eval reads `quantized/` (deployed precision) or `bf16/`. The packer: ModelOpt's
export_hf_checkpoint where it runs (CUDA, and a model dir with modelopt_state.pt to restore
its quantizers), our packer otherwise; `auto` picks, the choice is recorded (`packer` tag).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contract.formats import INFERENCE_FORMATS, deployed_format
from contract.params.export import ExportParams
from stages.deployment.amax import linear_amax
from stages.deployment.export_record import Checkpoints, ExportRecord
from stages.deployment.torchao import activation_scaling as torchao_activation_scaling
from stages.deployment.torchao import write_torchao_checkpoint
from stages.deployment.unified import write_unified_checkpoint
from stages.device import resolve_device
from stages.hf_model import (
    load_causal_lm,
    load_tokenizer,
    model_dir_of,
    quantizer_state,
    read_precision,
)
from stages.precision.errors import PrecisionUnavailable
from stages.runtime import StageContext, StageInputError

BF16_DIR = "bf16"
QUANTIZED_DIR = "quantized"


def choose_packer(requested: str, model_dir: Path) -> str:
    from stages.export.modelopt_export import modelopt_unavailable

    reason = modelopt_unavailable(model_dir)
    if requested == "modelopt" and reason:
        raise StageInputError(f"params.packer: modelopt cannot pack here ({reason}); choose packer ours")
    if requested == "auto":
        return "ours" if reason else "modelopt"
    return requested


def run(ctx: StageContext) -> dict[str, Any]:
    from contract.recipe import Recipe
    from stages.precision.surgery import linear_names

    params = ctx.params_as(ExportParams)
    model_dir = model_dir_of(ctx.input_dir("model"))
    precision = read_precision(model_dir)
    if precision is None:
        raise StageInputError(f"inputs.model: {model_dir} has no precision.json; export needs the train or ptq stage's output")
    recipe = Recipe.model_validate(precision["recipe"])
    tokenizer = load_tokenizer(model_dir, "inputs.model")
    model = load_causal_lm(model_dir, "bfloat16", "inputs.model").eval()
    summary: dict[str, Any] = {"recipe": recipe.name, "inference_format": recipe.inference_format}
    checkpoints = Checkpoints()
    if params.bf16_checkpoint:
        model.save_pretrained(ctx.output_dir / BF16_DIR, safe_serialization=True)
        tokenizer.save_pretrained(ctx.output_dir / BF16_DIR)
        checkpoints.bf16 = BF16_DIR
    deployed = deployed_format(recipe.inference_format) if params.quantized_checkpoint else None
    fmt = deployed.name if deployed else None
    skipped = None
    packer = None
    activation_scaling = None
    calibrated_here = False
    if deployed is not None and deployed.checkpoint == "torchao":
        try:
            write_torchao_checkpoint(model_dir, model, tokenizer, ctx.output_dir / QUANTIZED_DIR, recipe)
        except PrecisionUnavailable as error:
            skipped = str(error)
            ctx.log.warning("export: no quantized checkpoint: %s", skipped)
            if not params.bf16_checkpoint:
                raise StageInputError(f"params.bf16_checkpoint: false leaves nothing to export: {skipped}") from None
        else:
            packer = "torchao"
            activation_scaling = torchao_activation_scaling(recipe)
            checkpoints.quantized = QUANTIZED_DIR
    elif fmt is not None:
        packer = choose_packer(params.packer, model_dir)
        target = ctx.output_dir / QUANTIZED_DIR
        if packer == "modelopt":
            from stages.export.modelopt_export import export_with_modelopt

            export_with_modelopt(model_dir, target)
            activation_scaling = "static"
        else:
            names = linear_names(model, recipe)
            state = quantizer_state(model_dir)
            calibrated_here = INFERENCE_FORMATS[fmt].static_input_scale and "data" in ctx.spec.inputs and not _has_input_amax(state, names)
            if calibrated_here:
                state = {**state, **_calibrate_inputs(model, names, ctx.input_dir("data"), params.calib_samples)}
            amax = linear_amax(model, names, state, fmt)
            write_unified_checkpoint(model, tokenizer, target, fmt, amax)
            activation_scaling = "static" if all(a.input is not None for a in amax.values()) else "dynamic"
        checkpoints.quantized = QUANTIZED_DIR
    ExportRecord(recipe=recipe, inference_format=recipe.inference_format, packer=packer,
                 activation_scaling=activation_scaling, source_backend=precision.get("backend"),
                 checkpoints=checkpoints, calibrated_in_export=calibrated_here,
                 quantized_skipped=skipped).write(ctx.output_dir)
    ctx.tracker.set_tags({"packer": packer or "none", "inference_format": recipe.inference_format})
    if skipped:
        ctx.tracker.set_tags({"quantized_skipped": skipped[:250]})
    return {**summary, "packer": packer or "none", "activation_scaling": activation_scaling or "none",
            "quantized_checkpoint": checkpoints.quantized is not None}


def _has_input_amax(state: dict[str, torch.Tensor], names: list[str]) -> bool:
    return all(f"{n}.input_quantizer._amax" in state for n in names)


def _calibrate_inputs(model: torch.nn.Module, names: list[str], data_dir: Path, samples: int) -> dict[str, torch.Tensor]:
    """ModelOpt `max` calibration of the activations on the first `samples` training rows."""
    from stages.batches import TokenSplit
    from stages.calibration import calibration_loop, record_amax_emulated

    device = resolve_device("auto")
    model.to(device)
    amax = record_amax_emulated(model, names, calibration_loop(TokenSplit(data_dir, "train"), samples, 4, device))
    model.to("cpu")
    return {f"{n}.input_quantizer._amax": roles["input"].cpu() for n, roles in amax.items()}
