"""`prepare_model(model, recipe, backend)`: convert a model's linear layers for a recipe.

The backend is chosen by the caller and never swapped: a backend that cannot run the recipe
raises PrecisionUnavailable (one line, naming what to choose instead).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, get_args

import torch
from torch import nn

from contract.recipe import GEMM_OPERANDS, PrecisionBackend, Recipe
from stages.precision.delayed import AmaxHistory, histories_state, load_histories_state
from stages.precision.errors import PrecisionUnavailable

if TYPE_CHECKING:
    from stages.precision.modelopt_backend import SavedQuantizers

BACKENDS = get_args(PrecisionBackend)
Calibrate = Callable[[nn.Module], None]


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


_BACKEND_PACKAGE = {"te": "transformer_engine", "modelopt": "nvidia-modelopt", "torchao": "torchao"}


@dataclass
class PreparedModel:
    """A converted model plus what the training loop calls around it."""

    model: nn.Module
    recipe: Recipe
    backend: str
    _autocast: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext, repr=False)
    _on_step: Callable[[int], None] = field(default=lambda step: None, repr=False)
    # The delayed-scaling amax histories by `<linear name>/<role>` (emulated, scaled_mm backends).
    _amax_histories: Callable[[], dict[str, AmaxHistory]] = field(default=dict, repr=False)
    converted: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # backend-specific, added to describe()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Wrap forward + backward in it; a no-op except for backend te (te.autocast)."""
        return self._autocast()

    def on_step(self, step: int) -> None:
        """Call once per optimizer step with the number of steps done: turns delayed fake
        quant on at `fake_quant_after_steps`, rolls the delayed-scaling amax history."""
        self._on_step(step)

    def state_dict(self) -> dict[str, Any]:
        """What a training checkpoint must keep besides the weights: the quantizers' own state
        (the delayed-scaling amax histories of backends emulated and scaled_mm; empty for
        stateless recipes)."""
        return histories_state(self._amax_histories())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_histories_state(self._amax_histories(), state)

    def modelopt_state(self) -> dict[str, Any]:
        """Backend modelopt: `mto.modelopt_state` of the model (its quantizer modules and config),
        what ModelOpt's restore and export read."""
        import modelopt.torch.opt as mto

        return mto.modelopt_state(self.model)

    def describe(self) -> dict[str, str]:
        """Tags for MLflow: what ran, so nobody has to guess."""
        tags = {
            **self.tags,
            "recipe": self.recipe.name,
            "backend": self.backend,
            "inference_format": self.recipe.inference_format,
            "recipe_gemms": self.recipe.gemm_summary(),
            "converted_linears": str(len(self.converted)),
            "torch_version": torch.__version__,
        }
        arithmetics = sorted({op.nvfp4_arithmetic for _, op in self.recipe.operands() if op.format == "nvfp4"})
        if arithmetics:  # the same format rounds differently in each: MLflow shows which ran
            tags["nvfp4_arithmetic"] = ",".join(arithmetics)
        fast = [gemm for gemm in GEMM_OPERANDS if getattr(self.recipe, gemm).fast_accumulation]
        if fast and self.backend not in ("scaled_mm", "te"):
            # Only FP8 tensor cores accumulate that way; an emulated GEMM multiplies bf16 values in FP32.
            tags["fast_accumulation"] = f"not modeled by backend {self.backend} ({','.join(fast)}): FP32 accumulation"
        if self.backend in _BACKEND_PACKAGE:
            package = _BACKEND_PACKAGE[self.backend]
            tags[f"{package.replace('-', '_')}_version"] = _version(package)
        return tags


def prepare_model(
    model: nn.Module, recipe: Recipe, backend: str, calibrate: Calibrate | None = None,
    saved_quantizers: SavedQuantizers | None = None, for_compile: bool = False,
) -> PreparedModel:
    """Converts `model` in place (apply FSDP2 fully_shard after this) and returns it wrapped.

    `calibrate`: the forward loop backend modelopt calibrates with; `saved_quantizers`: a
    ModelOpt run's quantizers of this recipe, which backend modelopt restores instead.
    `for_compile`: the model will be torch.compiled; backend modelopt then computes its quantized
    linears with ModelOpt's quantizers through this project's ops (modelopt_compiled.py says why),
    and tags the run `modelopt_path` either way."""
    if backend not in BACKENDS:
        raise PrecisionUnavailable(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    before = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    if backend == "emulated":
        from stages.precision import emulated

        # All-bf16 GEMMs are nn.Linear exactly: left as they are, they compile with their neighbours.
        layers = [] if recipe.is_high_precision else emulated.convert_emulated(model, recipe)
        prepared = PreparedModel(
            model, recipe, backend,
            _on_step=lambda step: emulated.step_emulated(layers, recipe, step),
            _amax_histories=lambda: emulated.amax_histories(layers),
        )
    elif backend == "scaled_mm":
        from stages.precision import fp8_native

        fp8_layers = fp8_native.convert_scaled_mm(model, recipe)
        prepared = PreparedModel(
            model, recipe, backend,
            _on_step=lambda step: fp8_native.step_scaled_mm(fp8_layers),
            _amax_histories=lambda: fp8_native.amax_histories(fp8_layers),
        )
    elif backend == "te":
        from stages.precision.te_backend import convert_te

        prepared = PreparedModel(model, recipe, backend, _autocast=convert_te(model, recipe))
    elif backend == "modelopt":
        from stages.precision.modelopt_backend import convert_modelopt

        model = convert_modelopt(model, recipe, calibrate, saved_quantizers, own_fake_quant=for_compile)
        prepared = PreparedModel(model, recipe, backend)
        # ModelOpt swaps every nn.Linear (lm_head too) and disables the quantizers it must skip.
        prepared.converted = sorted(
            name
            for name, module in model.named_modules()
            if getattr(getattr(module, "weight_quantizer", None), "is_enabled", False)
        )
        if for_compile:
            from stages.precision.modelopt_compiled import (
                COMPILED_PATH,
                PATH_TAG,
                convert_for_compile,
                step_compiled,
            )

            compiled = convert_for_compile(model)
            prepared._on_step = lambda step: step_compiled(compiled)
            prepared.tags[PATH_TAG] = COMPILED_PATH
        else:
            from stages.precision.modelopt_compiled import EAGER_PATH, PATH_TAG

            prepared.tags[PATH_TAG] = EAGER_PATH
        return prepared
    else:
        from stages.precision.torchao_backend import convert_torchao, set_fake_quant

        layers = convert_torchao(model, recipe)

        def on_step(step: int) -> None:
            set_fake_quant(layers, step >= recipe.fake_quant_after_steps)

        prepared = PreparedModel(model, recipe, backend, _on_step=on_step)
    after = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    prepared.converted = sorted(before - after)
    return prepared


def convert_for_export(prepared: PreparedModel) -> nn.Module:
    """After training: the model as the export stage wants it.

    emulated / te / scaled_mm: every converted layer back to a plain nn.Linear holding the trained
    high-precision weights (the export stage quantizes them to recipe.inference_format).
    torchao: its QAT convert step (the PTQ-quantized model). modelopt: the model as is
    (ModelOpt's own export reads its quantizers).
    """
    model, backend = prepared.model, prepared.backend
    if backend == "torchao":
        from stages.precision.torchao_backend import convert_for_export_torchao

        return convert_for_export_torchao(model, prepared.recipe)
    if backend == "modelopt":
        return model
    from stages.precision.surgery import replace_module

    for name in prepared.converted:
        layer = model.get_submodule(name)
        bias = layer.bias if layer.bias is not None and layer.bias.numel() else None  # te: empty if none
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, bias  # te.Linear and ours hold plain Parameters
        replace_module(model, name, plain)
    return model
