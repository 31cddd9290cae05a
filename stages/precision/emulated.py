"""The `emulated` backend: nn.Linear -> QuantizedLinear whose autograd Function fake-quantizes
each operand of each GEMM per the recipe, then runs a high-precision matmul.

Scaling blocks always run along the GEMM's reduction dim K (as the hardware needs):
  fprop  x [M,K] and W [N,K] along K;  dgrad  dy [M,N] and W^T [K,N] along N;
  wgrad  dy^T [N,M] and x^T [K,M] along the tokens M.
backward_source=original (TE): backward operands are quantized from the saved high-precision
x and W. backward_source=forward_quantized (QAT, STE): the saved tensors are the fake-quantized
forward x_q and W_q, and the quantizer itself passes gradients straight through.
"""

from __future__ import annotations

import fnmatch
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stages.precision.errors import PrecisionUnavailable
from stages.precision.fp8 import FP8_DTYPES, fake_quantize_fp8
from stages.precision.kernels.dispatch import ActivationMemo, fake_quantize_cuda, fused_rows_and_cols
from stages.precision.mx import ELEM_DTYPES, fake_quantize_mxfp8
from stages.precision.nvfp4 import apply_hadamard, fake_quantize_nvfp4, hadamard_16
from stages.precision.recipe import OperandSpec, Recipe

EMULATED_FORMATS = ("bf16", *FP8_DTYPES, *ELEM_DTYPES, "nvfp4")
_ACTIVATIONS = ActivationMemo()  # CUDA only: one quantization of x shared by the linears reading it


class OperandQuantizer:
    """Fake-quantizes one operand role (e.g. `dgrad.grad_output`) along the last dim.

    Owns the delayed-scaling state of that role: the amax seen during the current optimizer
    step (max over micro-batches) and the history of previous steps. A plain object, not an
    nn.Module: FSDP2 shards parameters only, and this state is per-rank bookkeeping.
    """

    def __init__(self, spec: OperandSpec) -> None:
        self.spec = spec
        self.history: torch.Tensor | None = None  # [amax_history_len], newest first
        self.steps_recorded = 0
        self.pending_amax: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.spec.format
        if fmt == "bf16":
            return x
        amax = self._delayed_amax(x) if fmt in FP8_DTYPES and self.spec.scaling == "delayed" else None
        if x.is_cuda:  # Triton kernels, bit-exact with the reference below (None: no kernel for the spec)
            out = fake_quantize_cuda(x, self.spec, amax)
            if out is not None:
                return out
        if fmt in FP8_DTYPES:
            return fake_quantize_fp8(x, fmt, amax)
        if fmt in ELEM_DTYPES:
            return fake_quantize_mxfp8(x, fmt, self.spec.scale_rounding)
        if fmt == "nvfp4":
            return fake_quantize_nvfp4(x, self.spec.block_2d, self.spec.stochastic_rounding)
        raise PrecisionUnavailable(f"format {fmt}: backend emulated does not run it; choose backend torchao")

    def _delayed_amax(self, x: torch.Tensor) -> torch.Tensor:
        amax_now = x.detach().abs().max().to(torch.float32)
        self.pending_amax = amax_now if self.pending_amax is None else torch.maximum(self.pending_amax, amax_now)
        if self.steps_recorded == 0 or self.history is None:
            # No history yet (first step): scale from the current amax rather than TE's initial
            # scale of 1.0, which would saturate or underflow most tensors on step 0.
            return amax_now
        if self.spec.amax_compute_algo == "most_recent":
            return self.history[0]
        return self.history.max()

    def roll(self) -> None:
        """End of an optimizer step: push this step's amax into the history."""
        if self.pending_amax is None:
            return
        if self.history is None:
            self.history = torch.zeros(self.spec.amax_history_len, device=self.pending_amax.device)
        self.history = torch.roll(self.history, 1)
        self.history[0] = self.pending_amax
        self.steps_recorded += 1
        self.pending_amax = None


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):  # type: ignore[override]
        q = layer.quantizers
        recipe = layer.recipe
        # Without autocast grad_y has x's dtype, so wgrad would quantize this same x.
        fuse = recipe.backward_source == "original" and layer.hadamard is None and not torch.is_autocast_enabled(x.device.type)
        memo_key = (recipe.fprop.input, recipe.wgrad.input if fuse else None)
        use_memo = x.is_cuda and recipe.fprop.input.scaling != "delayed"  # delayed: each layer records its amax
        hit = _ACTIVATIONS.get(x, memo_key) if use_memo else None
        if hit is not None:
            x_q, x_wgrad = hit
        else:
            x_wgrad = None  # wgrad's quantized x, when one fused kernel read gives it with fprop's
            pair = fused_rows_and_cols(x.reshape(-1, x.shape[-1]), recipe.fprop.input, recipe.wgrad.input) if fuse else None
            if pair is not None:
                x_q, x_wgrad = pair[0].reshape(x.shape), pair[1]
            else:
                x_q = q["fprop.input"](x)  # blocks along the last dim = K, for any leading shape
            if use_memo:
                _ACTIVATIONS.put(x, memo_key, (x_q, x_wgrad))
        w_q = layer.cached_weight("fprop.weight", weight, lambda w: q["fprop.weight"](w).to(x.dtype))
        # No reshape of the output: FSDP2 warns about (and mishandles in-place ops on) views.
        y = F.linear(x_q, w_q, None if bias is None else bias.to(x.dtype))
        if recipe.backward_source == "original":
            ctx.save_for_backward(x if x_wgrad is None else x_wgrad, weight)
        else:
            ctx.save_for_backward(x_q, w_q)
        ctx.x_wgrad_quantized = x_wgrad is not None
        ctx.x_shape = x.shape
        ctx.layer = layer
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x_saved, w_src = ctx.saved_tensors
        x_shape = ctx.x_shape
        x_src = x_saved.reshape(-1, x_shape[-1])
        layer = ctx.layer
        q = layer.quantizers
        recipe = layer.recipe
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        dx = dw = db = None
        g_pair = None
        if all(ctx.needs_input_grad[:2]) and layer.hadamard is None:
            g_pair = fused_rows_and_cols(g2, recipe.dgrad.grad_output, recipe.wgrad.grad_output)
        if ctx.needs_input_grad[0]:
            g_q = q["dgrad.grad_output"](g2) if g_pair is None else g_pair[0]
            w_q = layer.cached_weight(  # blocks along N
                "dgrad.weight", w_src, lambda w: q["dgrad.weight"](w.t().to(g2.dtype)).t(), cache=w_src is layer.weight
            )
            dx = (g_q @ w_q).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            g_t, x_t = g2.t(), x_src.t().to(g2.dtype)
            if layer.hadamard is not None:
                h = layer.hadamard.to(g2.device)
                g_t, x_t = apply_hadamard(g_t, h), apply_hadamard(x_t, h)
            g_wq = q["wgrad.grad_output"](g_t) if g_pair is None else g_pair[1].t()
            x_wq = x_t if ctx.x_wgrad_quantized else q["wgrad.input"](x_t)  # already quantized in forward
            dw = (g_wq @ x_wq.t()).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0).to(ctx.weight_dtype)
        return dx, dw, db, None


@torch._dynamo.disable
def _apply_quantized(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """Eager under torch.compile: the quantizers are Triton kernels with per-step caches, and
    tracing the Function recompiled it for every weight shape."""
    return _QuantizedLinearFn.apply(x, layer.weight, layer.bias, layer)


class QuantizedLinear(nn.Module):
    """Drop-in for nn.Linear: the same Parameter objects (FSDP2 may shard them after this swap);
    each forward quantizes from self.weight. Fake quant can be switched off (QAT delay)."""

    def __init__(self, linear: nn.Linear, recipe: Recipe, name: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.recipe = recipe
        self.fake_quant_enabled = recipe.fake_quant_after_steps == 0
        self.quantizers = {f"{gemm}.{operand}": OperandQuantizer(spec) for (gemm, operand), spec in recipe.operands()}
        self.hadamard: torch.Tensor | None = None
        # Quantized weights by role, reused across the micro-batches of one optimizer step:
        # keyed on the weight's storage and version counter (an optimizer update bumps it), and
        # cleared by step_emulated at every step.
        self._weight_cache: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
        if recipe.wgrad.grad_output.hadamard:
            # One fixed random sign vector per layer, reproducible from its name.
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            signs = torch.randint(0, 2, (16,), generator=gen) * 2 - 1
            self.hadamard = hadamard_16(signs)

    def cached_weight(self, role: str, weight: torch.Tensor, quantize, cache: bool = True) -> torch.Tensor:
        """quantize(weight), computed once per weight version (delayed scaling: never cached,
        its amax bookkeeping must see every call)."""
        if not cache or self.quantizers[role].spec.scaling == "delayed":
            return quantize(weight)
        key = (weight.data_ptr(), weight._version)
        hit = self._weight_cache.get(role)
        if hit is not None and hit[0] == key:
            return hit[1]
        out = quantize(weight)
        self._weight_cache[role] = (key, out)
        return out

    def clear_weight_cache(self) -> None:
        self._weight_cache.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return F.linear(x, self.weight, self.bias)
        return _apply_quantized(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe.name}"


def stays_high_precision(name: str, patterns: list[str]) -> bool:
    """A pattern matches the module's qualified name or any module above it."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def linear_names(model: nn.Module, recipe: Recipe) -> list[str]:
    """Qualified names of the nn.Linear modules a recipe converts."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not stays_high_precision(name, recipe.high_precision)
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_emulated(model: nn.Module, recipe: Recipe) -> list[QuantizedLinear]:
    unsupported = sorted(recipe.formats - set(EMULATED_FORMATS))
    if unsupported:
        raise PrecisionUnavailable(
            f"recipe {recipe.name}: backend emulated does not implement {', '.join(unsupported)} "
            "fake quant; choose backend torchao"
        )
    layers = []
    for name in linear_names(model, recipe):
        layer = QuantizedLinear(model.get_submodule(name), recipe, name)
        replace_module(model, name, layer)
        layers.append(layer)
    return layers


def step_emulated(layers: list[QuantizedLinear], recipe: Recipe, step: int) -> None:
    """Once per optimizer step: QAT delay, and the delayed-scaling amax history roll.

    Under torch.distributed the step's amaxes are max-reduced first (one collective for all
    layers), so every rank scales with the same history, as TE does."""
    for layer in layers:
        layer.fake_quant_enabled = step >= recipe.fake_quant_after_steps
        layer.clear_weight_cache()
    _ACTIVATIONS.clear()
    if not recipe.uses_delayed_scaling:
        return
    pending = [qz for layer in layers for qz in layer.quantizers.values() if qz.pending_amax is not None]
    if pending and dist.is_available() and dist.is_initialized():
        stacked = torch.stack([qz.pending_amax for qz in pending])
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
        for qz, amax in zip(pending, stacked, strict=True):
            qz.pending_amax = amax
    for qz in pending:
        qz.roll()
