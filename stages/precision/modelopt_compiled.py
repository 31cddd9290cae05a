"""Backend modelopt under torch.compile: ModelOpt's quantizers, this project's kernels and ops.

Why ModelOpt's own modules do not compile (torch 2.11, the H200 machine's): every read of a
QuantLinear's `self.weight` goes through `DynamicModule.__getattr__`, which builds a new
`_FoldedCallback` (modelopt/torch/opt/dynamic.py) and calls it. Dynamo traces that constructor, so
the real object standing for the new callback is made by `object.__new__` alone (its `_callbacks`
live in dynamo's side effects, not on it), and then `InstructionTranslatorBase.call_function` tests
the callee's truth (`if inner_fn and callable(inner_fn) and is_forbidden(inner_fn)`), which calls
`_FoldedCallback.__len__` -> AttributeError `_callbacks` -> InternalTorchDynamoError. Torch 2.13
tests `inner_fn is not None` there; with it the same QuantLinear traces (seen on CPU, INT8).

What runs instead, with `prepare_model(..., for_compile=True)`: each QuantLinear becomes a
`CompiledQuantLinear` holding the same Parameters and the same TensorQuantizer modules (so the
state dict, the checkpoints, `mto.modelopt_state` and the export are ModelOpt's), whose forward is
linear_op's custom ops: x and W fake-quantized by our kernel in ModelOpt's NVFP4 arithmetic
(bit for bit its `fp4_fake_quant_block`, NUMERICS.md) scaled by each quantizer's own calibrated
amax, as ModelOpt's static quantizers do; the GEMM on the fake-quantized operands; a
straight-through backward (ModelOpt's `pass_through_bwd`, its default), so dgrad multiplies the
fake-quantized W and wgrad the fake-quantized x. A quantizer this does not reproduce exactly
(another format, no amax, a pre-quant scale, a rotation, calibration on) is refused in one line.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.precision.errors import PrecisionUnavailable
from stages.precision.linear_op import (
    OWN_QUANTIZER,
    OpaqueLinear,
    _QuantizedLinearFunction,
)
from stages.precision.nvfp4 import fake_quantize_nvfp4
from stages.precision.surgery import replace_module

KIND = "quantized_input"  # linear_op.KINDS: the backward multiplies the fake-quantized x
NVFP4_BLOCK_SIZES = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
PATH_TAG = "modelopt_path"
COMPILED_PATH = "compiled: faster_qat kernels, ModelOpt NVFP4 arithmetic and amax"
EAGER_PATH = "eager: ModelOpt modules"

_LIB = torch.library.Library("faster_qat", "FRAGMENT")
_LIB.define("nvfp4_modelopt_fake(Tensor x, Tensor amax) -> Tensor")


def nvfp4_modelopt_fake_impl(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's NVFP4 fake quant of x with a given (static) amax: the Triton kernel on a GPU,
    the PyTorch reference on a CPU."""
    if x.is_cuda:
        from stages.precision.kernels import ops

        return ops.fake_nvfp4(x, "modelopt", amax)
    return fake_quantize_nvfp4(x, arithmetic="modelopt", global_amax=amax)


for _device in ("CPU", "CUDA"):
    _LIB.impl("nvfp4_modelopt_fake", nvfp4_modelopt_fake_impl, _device)
torch.library.register_fake("faster_qat::nvfp4_modelopt_fake", lambda x, amax: torch.empty_like(x), lib=_LIB)
nvfp4_modelopt_fake = torch.ops.faster_qat.nvfp4_modelopt_fake.default


def quantizer_refusal(name: str, quantizer: Any) -> str | None:
    """Why an enabled ModelOpt TensorQuantizer is not ModelOpt's static NVFP4 fake quant that
    CompiledQuantLinear reproduces; None when it is."""
    checks = {
        "NVFP4 (num_bits (2, 1), dynamic 16-blocks, E4M3 scales)":
            tuple(quantizer.num_bits) == (2, 1) and _block_sizes(quantizer) == NVFP4_BLOCK_SIZES,
        "a calibrated per-tensor amax": getattr(quantizer, "_amax", None) is not None
        and quantizer._amax.numel() == 1,
        "fake quant": quantizer.fake_quant,
        "a straight-through backward (pass_through_bwd)": getattr(quantizer, "_pass_through_bwd", False),
        "no pre-quant scale, rotation, bias or custom backend": quantizer.pre_quant_scale is None
        and not quantizer.rotate_is_enabled and getattr(quantizer, "bias_calibrator", None) is None
        and quantizer.backend is None,
        "calibration finished": not quantizer._if_calib,
    }
    missing = [what for what, ok in checks.items() if not ok]
    return f"{name} lacks {', '.join(missing)}" if missing else None


def _block_sizes(quantizer: Any) -> dict | None:
    sizes = quantizer.block_sizes
    return None if sizes is None else {k: (tuple(v) if isinstance(v, list) else v) for k, v in sizes.items()}


class CompiledQuantLinear(OpaqueLinear):
    """A ModelOpt QuantLinear's Parameters and quantizers, computed through linear_op's custom ops.
    With its quantizers disabled (ModelOpt's lm_head, a high-precision glob) it is nn.Linear."""

    def __init__(self, quant_linear: nn.Module, name: str) -> None:
        linear = nn.Linear(quant_linear.in_features, quant_linear.out_features, bias=False, device="meta")
        linear.weight = quant_linear._parameters["weight"]  # not .weight: ModelOpt's dynamic attribute
        linear.bias = quant_linear._parameters.get("bias")
        super().__init__(linear)
        self.name = name
        # The TensorQuantizers themselves, under their own names and in their order: the state dict
        # and `mto.modelopt_state` stay ModelOpt's.
        for child_name, child in quant_linear.named_children():
            self.add_module(child_name, child)
        if self.output_quantizer.is_enabled:
            raise PrecisionUnavailable(f"{name}.output_quantizer is enabled: compiled ModelOpt QAT quantizes inputs "
                                       "and weights only; set compile: false")
        self.quantized = self.input_quantizer.is_enabled or self.weight_quantizer.is_enabled
        if self.quantized:
            for role in ("input_quantizer", "weight_quantizer"):
                refusal = quantizer_refusal(f"{name}.{role}", getattr(self, role))
                if refusal:
                    raise PrecisionUnavailable(f"compiled ModelOpt QAT: {refusal}; set compile: false")
        self._weight_cache: tuple[tuple[int, int], torch.Tensor] | None = None
        self._register()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.weight, self.bias)
        x_q = nvfp4_modelopt_fake(x.detach(), self.input_quantizer._amax)
        return _QuantizedLinearFunction.apply(x, self.weight, self.bias, self.handle, KIND, x_q)

    def fake_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W fake-quantized with the weight quantizer's amax, once per weight version (the
        micro-batches of one optimizer step share it; the update bumps the version)."""
        key = (weight.data_ptr(), weight._version)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, nvfp4_modelopt_fake_impl(weight.detach(), self.weight_quantizer._amax))
        return self._weight_cache[1]

    def clear_weight_cache(self) -> None:
        self._weight_cache = None

    def kind(self, x: torch.Tensor) -> str:
        return KIND

    def input_key(self) -> str:
        return OWN_QUANTIZER

    def quantize_input(self, x: torch.Tensor, kind: str) -> list[torch.Tensor]:
        return [nvfp4_modelopt_fake_impl(x, self.input_quantizer._amax)]

    def linear_forward(
        self, x: torch.Tensor, parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, kind: str
    ) -> torch.Tensor:
        return F.linear(parts[0], self.fake_weight(weight).to(x.dtype), None if bias is None else bias.to(x.dtype))

    def linear_backward(
        self, grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, saved: list[torch.Tensor],
        kind: str, needs_dx: bool, needs_dw: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        dx = dw = None
        if needs_dx:
            dx = (g2 @ self.fake_weight(weight).to(g2.dtype)).reshape(*grad_y.shape[:-1], self.in_features)
        if needs_dw:
            dw = (g2.t() @ saved[0].reshape(-1, self.in_features).to(g2.dtype)).to(weight.dtype)
        return dx, dw

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quantized={self.quantized}"


def convert_for_compile(model: nn.Module) -> list[CompiledQuantLinear]:
    """Every ModelOpt QuantLinear of `model` (after `mtq.quantize` or a restore) -> CompiledQuantLinear."""
    names = [name for name, module in model.named_modules() if _is_quant_linear(module)]
    if not names:
        raise PrecisionUnavailable("compiled ModelOpt QAT: the model has no ModelOpt QuantLinear; set compile: false")
    layers = []
    for name in names:
        layer = CompiledQuantLinear(model.get_submodule(name), name)
        replace_module(model, name, layer)
        layers.append(layer)
    return layers


def _is_quant_linear(module: nn.Module) -> bool:
    from modelopt.torch.quantization.nn.modules.quant_linear import _QuantLinear

    return isinstance(module, _QuantLinear)


def step_compiled(layers: list[CompiledQuantLinear]) -> None:
    """After each optimizer step: drop the fake-quantized weights of the last one."""
    for layer in layers:
        layer.clear_weight_cache()

