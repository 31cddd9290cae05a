"""A quantized linear layer as custom ops that torch.compile keeps in one graph.

The quantizers are Triton kernels with Python state around them: the quantized weights cached
for the micro-batches of a step, delayed-scaling amax histories. A traced graph cannot hold that
state. Wrapping each linear in `torch._dynamo.disable` kept it, but split every compiled decoder
layer at its seven linears, so RMSNorm, SiLU * up and the residual adds compiled in pieces.
Custom ops are opaque to the compiler without breaking the graph:

  parts = faster_qat::quantize_input(x, key, kind, layer)   the activation's quantized forms
  y     = faster_qat::quantized_linear(x, parts, W, b, handle, kind)   GEMMs, weight cache
          (its backward: faster_qat::quantized_linear_backward, the two joined by an autograd.Function)

`quantize_input` is a pure function of x and a recipe (`key`), so when q/k/v (gate/up) read the
same x the compiler's common-subexpression pass leaves one call, and the graph knows the parts
are shared (its memory planning may reuse a buffer once its last reader ran; a Python-side memo
returning the same tensors from three calls would hide that from it). In eager mode a memo
keyed on x's identity does the sharing instead. A layer whose quantizer has state of its own
(delayed scaling records each layer's amax) has the key OWN_QUANTIZER and passes the handle of
its input owner as `layer`: siblings that read the same x (surgery.input_owners) hold one
quantizer, so their calls are equal and one remains, as for a stateless key; every layer still
runs the same graph (a key naming the layer would be a constant in it: a recompile per layer,
and past dynamo's limit of 8, eager layers).

`handle` finds the layer: a CPU int64 tensor, so one compiled graph serves every decoder layer
(an int would be a constant: a recompile per layer). `kind` says which quantized forms exist
and which the backward keeps; it depends only on the recipe and the device, so it is the same
constant in every layer and the fake (shape-only) functions know every shape from it.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import torch
from torch import nn

from stages.precision.dtypes import FP8_DTYPES
from stages.precision.kernels.dispatch import ActivationMemo

# Eager mode: one quantization of x shared by the linears that read the same x.
SHARED_INPUTS = ActivationMemo()


def _fp8_parts(dtype: torch.dtype) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    def like(x: torch.Tensor) -> list[torch.Tensor]:
        m, k = x.shape[:-1].numel(), x.shape[-1]
        return [x.new_empty(m, k, dtype=dtype), x.new_empty((), dtype=torch.float32), x.new_empty(k, m, dtype=dtype)]

    return like


# kind -> (the quantized forms of x as empty tensors shaped like the real ones,
#          the indices of those the backward keeps, whether the backward reads the original x)
KINDS: dict[str, tuple[Callable[[torch.Tensor], list[torch.Tensor]], tuple[int, ...], bool]] = {
    # emulated: fake-quantized x for fprop; wgrad quantizes the original x itself
    "input": (lambda x: [torch.empty_like(x)], (), True),
    # emulated: fprop's x and wgrad's x (blocks along the tokens, [M, K]) from one fused read
    "input_cols": (lambda x: [torch.empty_like(x), x.new_empty(x.shape[:-1].numel(), x.shape[-1])], (1,), False),
    # emulated QAT (STE): the backward multiplies the fake-quantized x the forward multiplied
    "quantized_input": (lambda x: [torch.empty_like(x)], (0,), False),
    # native FP8 (one kind per format): x as FP8 [M, K], its fp32 dequantization scale, x^T as
    # FP8 [K, M] for wgrad
    **{name: (_fp8_parts(dtype), (1, 2), False) for name, dtype in FP8_DTYPES.items()},
}

OWN_QUANTIZER = "layer"  # input_key of a layer whose input quantizer is its own (stateful)
_LAYERS: dict[int, weakref.ref] = {}
_HANDLES = itertools.count()
_INPUT_QUANTIZERS: dict[str, Callable[[torch.Tensor, str], list[torch.Tensor]]] = {}


class OpaqueLinear(nn.Module):
    """Drop-in for nn.Linear holding the same Parameters (FSDP2 may shard them after the swap),
    whose quantization and GEMMs run inside the custom ops. Subclasses implement `kind`,
    `input_key`, `quantize_input`, `linear_forward` and `linear_backward`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def _register(self, input_owner: OpaqueLinear | None = None) -> None:
        """`input_owner`: a layer reading the same x whose input quantizer this layer uses (its
        own one, stateful, is then the owner's: surgery.input_owners)."""
        number = next(_HANDLES)
        if "handle" in self.__dict__:
            # A copy (deepcopy, unpickling): its siblings' input_handle is this same tensor
            # object (the copy's memo), so it takes the new number in place.
            self.handle.fill_(number)
        else:
            # A plain attribute, not a buffer: .to(device) leaves it on the CPU (reading it costs
            # no GPU sync) and state_dict leaves it out.
            self.handle = torch.tensor(number, dtype=torch.int64)
        _LAYERS[number] = weakref.ref(self)
        if input_owner is not None:
            self.input_handle = input_owner.handle
        elif "input_handle" not in self.__dict__:
            self.input_handle = self.handle
        self._input_key = key = self.input_key()  # a str once: the compiled forward only reads it
        if key != OWN_QUANTIZER:  # stateless: any layer of the same key quantizes alike
            _INPUT_QUANTIZERS.setdefault(key, self.stateless_input_quantizer())

    def __setstate__(self, state: dict) -> None:
        # deepcopy and unpickling: the copy is a layer of its own, with its own caches.
        super().__setstate__(state)
        self._register()

    def kind(self, x: torch.Tensor) -> str:
        raise NotImplementedError

    def input_key(self) -> str:
        """Names how x is quantized: equal keys quantize alike (OWN_QUANTIZER when stateful)."""
        raise NotImplementedError

    def quantize_input(self, x: torch.Tensor, kind: str) -> list[torch.Tensor]:
        """x's quantized forms, as KINDS[kind] lays them out."""
        raise NotImplementedError

    def stateless_input_quantizer(self) -> Callable[[torch.Tensor, str], list[torch.Tensor]]:
        """quantize_input as a function that keeps no reference to this layer (stateless keys only)."""
        raise NotImplementedError

    def linear_forward(
        self, x: torch.Tensor, parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, kind: str
    ) -> torch.Tensor:
        raise NotImplementedError

    def linear_backward(
        self, grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, saved: list[torch.Tensor],
        kind: str, needs_dx: bool, needs_dw: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(dx shaped like x in grad_y's dtype, dW in the weight's dtype); None where not needed."""
        raise NotImplementedError

    def input_passthrough(self) -> bool:
        """True when x's only quantized form is x itself (a bf16 fprop input)."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind, key = self.kind(x), self._input_key
        own = self.input_handle if key == OWN_QUANTIZER else None
        if self.input_passthrough():
            parts = [x.detach()]  # an op may not return its input; this needs no op
        elif torch.compiler.is_compiling():
            parts = quantize_input(x.detach(), key, kind, own)  # shared through the graph (see module doc)
        else:
            shared_as = (key, kind, None if own is None else int(own))
            parts = SHARED_INPUTS.get(x, shared_as)
            if parts is None:
                parts = quantize_input(x.detach(), key, kind, own)
                SHARED_INPUTS.put(x, shared_as, parts)
        return _QuantizedLinearFunction.apply(x, self.weight, self.bias, self.handle, kind, *parts)


def _layer(handle: torch.Tensor) -> OpaqueLinear:
    layer = _LAYERS[int(handle)]()
    if layer is None:
        raise RuntimeError(f"quantized linear {int(handle)} no longer exists")
    return layer


# The ops are registered with torch.library.Library, not torch.library.custom_op: the latter's
# Python wrapper spent ~0.45 ms of its own time per call under cProfile on the H100 machine
# (torch 2.11; `python -m bench.step --tiny --profile`), 18 calls per decoder layer and
# micro-batch, which the GPU waited on. Here the dispatcher calls the functions below directly.
_LIB = torch.library.Library("faster_qat", "DEF")
_LIB.define("quantize_input(Tensor x, str key, str kind, Tensor? layer) -> Tensor[]")
_LIB.define(
    "quantized_linear(Tensor x, Tensor[] parts, Tensor weight, Tensor? bias, Tensor handle, str kind) -> Tensor"
)
_LIB.define(
    "quantized_linear_backward(Tensor grad_y, Tensor? x, Tensor weight, Tensor[] saved, Tensor handle, str kind, "
    "bool needs_dx, bool needs_dw) -> Tensor[]"
)


def _input_quantizer(key: str, layer: torch.Tensor | None) -> Callable[[torch.Tensor, str], list[torch.Tensor]]:
    """How x is quantized: the stateless quantizer of `key`, or the layer's own."""
    return _INPUT_QUANTIZERS[key] if layer is None else _layer(layer).quantize_input


def _quantize_input_impl(x: torch.Tensor, key: str, kind: str, layer: torch.Tensor | None) -> list[torch.Tensor]:
    return _input_quantizer(key, layer)(x, kind)


def _quantize_input_fake(x, key, kind, layer):
    return KINDS[kind][0](x)


def _quantized_linear_impl(
    x: torch.Tensor, parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
    handle: torch.Tensor, kind: str,
) -> torch.Tensor:
    return _layer(handle).linear_forward(x, parts, weight, bias, kind).contiguous()


def _quantized_linear_fake(x, parts, weight, bias, handle, kind):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _quantized_linear_backward_impl(
    grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, saved: list[torch.Tensor],
    handle: torch.Tensor, kind: str, needs_dx: bool, needs_dw: bool,
) -> list[torch.Tensor]:
    dx, dw = _layer(handle).linear_backward(grad_y, x, weight, saved, kind, needs_dx, needs_dw)
    empty = grad_y.new_empty(0)
    return [empty if dx is None else dx.contiguous(), empty if dw is None else dw.contiguous()]


def _quantized_linear_backward_fake(grad_y, x, weight, saved, handle, kind, needs_dx, needs_dw):
    dx = grad_y.new_empty(*grad_y.shape[:-1], weight.shape[1]) if needs_dx else grad_y.new_empty(0)
    return [dx, torch.empty_like(weight) if needs_dw else grad_y.new_empty(0)]


for _name, _impl, _fake in (
    ("quantize_input", _quantize_input_impl, _quantize_input_fake),
    ("quantized_linear", _quantized_linear_impl, _quantized_linear_fake),
    ("quantized_linear_backward", _quantized_linear_backward_impl, _quantized_linear_backward_fake),
):
    for _device in ("CPU", "CUDA"):
        _LIB.impl(_name, _impl, _device)
    torch.library.register_fake(f"faster_qat::{_name}", _fake, lib=_LIB)

quantize_input = torch.ops.faster_qat.quantize_input.default
quantized_linear = torch.ops.faster_qat.quantized_linear.default
quantized_linear_backward = torch.ops.faster_qat.quantized_linear_backward.default


class _QuantizedLinearFunction(torch.autograd.Function):
    """quantized_linear and its backward op. The ops themselves have no autograd formula: a
    compiled forward calls them straight through the dispatcher, where an op with
    torch.library.register_autograd goes through a Python autograd wrapper on every call, also
    without grad (the step's forward was host-bound on the H100 machine: bench.step --tiny)."""

    @staticmethod
    def forward(ctx, x, weight, bias, handle, kind, *parts):
        _, kept, reads_input = KINDS[kind]
        ctx.kind, ctx.has_bias, ctx.n_parts, ctx.reads_input = kind, bias is not None, len(parts), reads_input
        ctx.save_for_backward(*([x] if reads_input else []), weight, handle, *(parts[i] for i in kept))
        return quantized_linear(x, list(parts), weight, bias, handle, kind)

    @staticmethod
    def backward(ctx, grad_y):
        saved = list(ctx.saved_tensors)
        x = saved.pop(0) if ctx.reads_input else None
        weight, handle, *kept = saved
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        dx, dw = quantized_linear_backward(grad_y, x, weight, kept, handle, ctx.kind, needs_dx, needs_dw)
        db = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(weight.dtype) if ctx.has_bias and needs_db else None
        return (dx if needs_dx else None, dw if needs_dw else None, db, None, None, *([None] * ctx.n_parts))
