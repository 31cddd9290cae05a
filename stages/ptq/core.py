"""The ptq stage: calibrate a model's forward quantizers on training data (ModelOpt `max`).

Output dir (a train dir to its consumers: eval-ptq evaluates it, train starts QAT from it):
  model/                          HF checkpoint, weights unchanged, in params.dtype + tokenizer
  model/quantizer_state.safetensors  `<linear>.input_quantizer._amax`, `<linear>.weight_quantizer._amax`
                                  (fp32 scalars, ModelOpt's names) for every quantized linear
  model/modelopt_state.pt         backend modelopt only: mto.modelopt_state (restores the quantizers)
  model/precision.json            recipe, backend, method "ptq", dtype, calibration {algorithm,
                                  samples, tokens, amax: {linear: {input, weight}}}, files
Backends: modelopt = mtq.quantize(model, <recipe preset e.g. NVFP4_DEFAULT_CFG>, forward_loop)
(NVFP4 needs CUDA: elsewhere a one-line error naming `emulated`); emulated = forward hooks on
the linears the recipe converts record amax(|x|) over the calibration batches and amax(|W|).
Calibration data: the first `calib_samples` rows of the train split, in order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from contract.files import write_json_atomic
from contract.params.ptq import PtqStageParams
from stages.batches import TokenSplit
from stages.calibration import calibration_loop, record_amax_emulated
from stages.device import resolve_device
from stages.hf_model import (
    MODELOPT_STATE_FILE,
    PRECISION_FILE,
    QUANTIZER_STATE_FILE,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
    source_revision,
)
from stages.runtime import StageContext, StageInputError


def record_amax_modelopt(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    amax: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        quantizers = {role: getattr(module, f"{role}_quantizer", None) for role in ("input", "weight")}
        if all(q is not None and q.is_enabled and q.amax is not None for q in quantizers.values()):
            amax[name] = {role: q.amax.detach().float().reshape(()) for role, q in quantizers.items()}
    return amax


def run(ctx: StageContext) -> dict[str, Any]:
    from stages.precision import PrecisionUnavailable, prepare_model
    from stages.precision.surgery import linear_names

    params = ctx.params_as(PtqStageParams)
    recipe = params.recipe
    if not (recipe.fprop.input.quantized or recipe.fprop.weight.quantized):
        raise StageInputError(f"params.recipe: {recipe.name} quantizes no forward GEMM operand; PTQ needs a quantized recipe")
    if params.backend not in ("emulated", "modelopt"):
        raise StageInputError(f"params.backend: ptq calibrates with modelopt or emulated, not {params.backend}")
    device = resolve_device(params.device)
    source = resolve_model_source(ctx.spec.inputs.get("model"), params.model, "params.model")
    revision = source_revision(ctx.spec.inputs.get("model"), params.model_revision)
    tokenizer = load_tokenizer(source, "params.model", revision)
    model = load_causal_lm(source, params.dtype, "params.model", revision=revision).to(device).eval()
    split = TokenSplit(ctx.input_dir("data"), "train")
    loop = calibration_loop(split, params.calib_samples, params.calib_batch, device)
    samples = min(params.calib_samples, len(split))

    extra: dict[str, Any] = {}
    if params.backend == "modelopt":
        try:
            model = prepare_model(model, recipe, "modelopt", calibrate=loop).model
        except PrecisionUnavailable as error:
            raise StageInputError(f"params.backend: {error}") from None
        amax = record_amax_modelopt(model)
        import modelopt.torch.opt as mto

        extra[MODELOPT_STATE_FILE] = mto.modelopt_state(model)
    else:
        amax = record_amax_emulated(model, linear_names(model, recipe), loop)

    out = ctx.output_dir / "model"
    _save(model, tokenizer, out)
    from safetensors.torch import save_file

    state = {f"{n}.{role}_quantizer._amax": v.cpu().contiguous() for n, roles in amax.items() for role, v in roles.items()}
    save_file(state, str(out / QUANTIZER_STATE_FILE))
    for name, payload in extra.items():
        torch.save(payload, out / name)
    tokens = int(sum(split.rows([i]).input_ids.numel() for i in range(samples)))
    precision = {
        "recipe": recipe.model_dump(mode="json"),
        "backend": params.backend,
        "method": "ptq",
        "dtype": params.dtype,
        "calibration": {
            "algorithm": params.algorithm,
            "samples": samples,
            "tokens": tokens,
            "amax": {n: {role: float(v) for role, v in roles.items()} for n, roles in amax.items()},
        },
        "files": {"quantizer_state": QUANTIZER_STATE_FILE, **{n: n for n in extra}},
    }
    write_json_atomic(out / PRECISION_FILE, precision)
    ctx.tracker.set_tags({"recipe": recipe.name, "backend": params.backend, "device": device.type})
    return {"calib_samples": samples, "calib_tokens": tokens, "quantized_linears": len(amax),
            "backend": params.backend, "recipe": recipe.name}


def _save(model: nn.Module, tokenizer: Any, out: Any) -> None:
    """Plain HF weights only: ModelOpt's quantizer buffers go to quantizer_state, not model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    expected = set(plain.state_dict())
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in expected}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(out)
