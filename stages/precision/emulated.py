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

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from contract.compat import emulated_refusal
from contract.recipe import OperandSpec, Recipe
from stages.precision.delayed import AmaxBank, AmaxHistory, banks_for, roll_all
from stages.precision.errors import PrecisionUnavailable
from stages.precision.formats import FORMATS, fake_quantizer
from stages.precision.kernels.dispatch import (
    fake_quantize_cuda,
    fused_pair_supported,
    fused_rows_and_cols,
)
from stages.precision.linear_op import OWN_QUANTIZER, SHARED_INPUTS, OpaqueLinear
from stages.precision.nvfp4 import apply_hadamard, hadamard_16
from stages.precision.surgery import linear_names, swap_linears


class OperandQuantizer(AmaxHistory):
    """Fake-quantizes one operand role (e.g. `dgrad.grad_output`) along the last dim; under
    delayed scaling it is that role's amax history too."""

    def __init__(self, spec: OperandSpec, banks: dict[tuple[int, str], AmaxBank] | None = None) -> None:
        delayed = spec.scaling == "delayed" and banks is not None
        bank = banks_for(spec.amax_history_len, spec.amax_compute_algo, banks) if delayed else None
        super().__init__(spec.amax_history_len, spec.amax_compute_algo, bank)
        self.spec = spec

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.spec.format
        if fmt == "bf16":
            return x
        delayed = FORMATS[fmt].describes.family == "fp8" and self.spec.scaling == "delayed"
        amax = self._delayed_amax(x) if delayed else None
        if x.is_cuda:  # Triton kernels, bit-exact with the reference below (None: no kernel for the spec)
            out = fake_quantize_cuda(x, self.spec, amax)
            if out is not None:
                return out
        try:
            return fake_quantizer(fmt)(x, self.spec, amax)
        except ValueError as error:
            raise PrecisionUnavailable(f"backend emulated: {error}") from None

    def _delayed_amax(self, x: torch.Tensor) -> torch.Tensor:
        amax_now = x.detach().abs().max().to(torch.float32)
        self.record(amax_now)
        scaling = self.scaling_amax(x.device)
        return amax_now if scaling is None else scaling


def _quantize_input(fprop_input: OperandQuantizer, recipe: Recipe, x: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """x's quantized forms for linear_op.KINDS[kind]: fprop's (blocks along K) and, for
    input_cols, wgrad's (blocks along the tokens) from the same fused kernel read."""
    if kind == "input_cols":
        x_q, x_wgrad = fused_rows_and_cols(x.reshape(-1, x.shape[-1]), recipe.fprop.input, recipe.wgrad.input)
        return [x_q.reshape(x.shape), x_wgrad]
    return [fprop_input(x)]


class QuantizedLinear(OpaqueLinear):
    """Drop-in for nn.Linear: each forward quantizes from self.weight (cached per weight
    version). Fake quant can be switched off (QAT delay)."""

    def __init__(
        self, linear: nn.Linear, recipe: Recipe, name: str, banks: dict[tuple[int, str], AmaxBank] | None = None,
        input_owner: QuantizedLinear | None = None,
    ) -> None:
        """`banks`: where the delayed-scaling histories live (shared by a model's layers: delayed.py);
        `input_owner`: a layer reading the same x, whose fprop input quantizer (one amax history
        under delayed scaling) this one uses."""
        super().__init__(linear)
        self.name = name
        self.recipe = recipe
        self.fake_quant_enabled = recipe.fake_quant_after_steps == 0
        banks = {} if banks is None else banks
        self.quantizers: dict[str, OperandQuantizer] = {}
        for (gemm, operand), spec in recipe.operands():
            role = f"{gemm}.{operand}"
            shared = input_owner is not None and role == "fprop.input"
            self.quantizers[role] = input_owner.quantizers[role] if shared else OperandQuantizer(spec, banks)
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
        self._register(input_owner)

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
        return super().forward(x)

    def kind(self, x: torch.Tensor) -> str:
        recipe = self.recipe
        if recipe.backward_source != "original":
            return "quantized_input"
        # Without autocast grad_y has x's dtype, so wgrad would quantize this same x: one fused
        # kernel read then gives fprop's and wgrad's quantized x.
        fuse = (
            x.is_cuda and self.hadamard is None and not torch.is_autocast_enabled(x.device.type)
            and fused_pair_supported(recipe.fprop.input, recipe.wgrad.input)
        )
        return "input_cols" if fuse else "input"

    def input_key(self) -> str:
        if self.recipe.fprop.input.scaling == "delayed":  # stateful: the layer (or its input owner) records the amax
            return OWN_QUANTIZER
        return f"emulated:{self.recipe.fprop.input.model_dump_json()}|{self.recipe.wgrad.input.model_dump_json()}"

    def input_passthrough(self) -> bool:
        return self.recipe.fprop.input.format == "bf16"

    def quantize_input(self, x: torch.Tensor, kind: str) -> list[torch.Tensor]:
        return _quantize_input(self.quantizers["fprop.input"], self.recipe, x, kind)

    def stateless_input_quantizer(self):
        fprop_input, recipe = OperandQuantizer(self.recipe.fprop.input), self.recipe
        return lambda x, kind: _quantize_input(fprop_input, recipe, x, kind)

    def _weight_fprop(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.cached_weight("fprop.weight", weight, lambda w: self.quantizers["fprop.weight"](w).to(dtype))

    def linear_forward(
        self, x: torch.Tensor, parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, kind: str
    ) -> torch.Tensor:
        # No reshape of the output: FSDP2 warns about (and mishandles in-place ops on) views.
        return F.linear(parts[0], self._weight_fprop(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    def linear_backward(
        self, grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, saved: list[torch.Tensor],
        kind: str, needs_dx: bool, needs_dw: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        q, recipe = self.quantizers, self.recipe
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        x_src = (x if kind == "input" else saved[0]).reshape(-1, self.in_features)
        # QAT (STE): the backward multiplies the fake-quantized W the forward used.
        w_src = self._weight_fprop(weight, g2.dtype) if kind == "quantized_input" else weight
        dx = dw = None
        g_pair = None
        if needs_dx and needs_dw and self.hadamard is None:
            g_pair = fused_rows_and_cols(g2, recipe.dgrad.grad_output, recipe.wgrad.grad_output)
        if needs_dx:
            g_q = q["dgrad.grad_output"](g2) if g_pair is None else g_pair[0]
            w_q = self.cached_weight(  # blocks along N
                "dgrad.weight", w_src, lambda w: q["dgrad.weight"](w.t().to(g2.dtype)).t(), cache=w_src is weight
            )
            dx = (g_q @ w_q).reshape(*grad_y.shape[:-1], self.in_features)
        if needs_dw:
            g_t, x_t = g2.t(), x_src.t().to(g2.dtype)
            if self.hadamard is not None:
                h = self.hadamard.to(g2.device)
                g_t, x_t = apply_hadamard(g_t, h), apply_hadamard(x_t, h)
            g_wq = q["wgrad.grad_output"](g_t) if g_pair is None else g_pair[1].t()
            x_wq = x_t if kind == "input_cols" else q["wgrad.input"](x_t)  # input_cols: quantized in the forward
            dw = (g_wq @ x_wq.t()).to(weight.dtype)
        return dx, dw

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe.name}"


def convert_emulated(model: nn.Module, recipe: Recipe) -> list[QuantizedLinear]:
    refusal = emulated_refusal(recipe)
    if refusal:
        raise PrecisionUnavailable(refusal)
    banks: dict[tuple[int, str], AmaxBank] = {}
    layers = swap_linears(model, linear_names(model, recipe),
                          lambda name, linear, owner: QuantizedLinear(linear, recipe, name, banks, owner))
    return list(layers.values())


def step_emulated(layers: list[QuantizedLinear], recipe: Recipe, step: int) -> None:
    """Once per optimizer step: QAT delay, and the delayed-scaling amax history roll.

    Under torch.distributed the step's amaxes are max-reduced first (one collective for all
    layers), so every rank scales with the same history, as TE does."""
    for layer in layers:
        layer.fake_quant_enabled = step >= recipe.fake_quant_after_steps
        layer.clear_weight_cache()
    SHARED_INPUTS.clear()
    if recipe.uses_delayed_scaling:
        roll_all(list(amax_histories(layers).values()))


def amax_histories(layers: list[QuantizedLinear]) -> dict[str, OperandQuantizer]:
    """The delayed-scaling quantizers, keyed `<linear name>/<gemm.operand>`."""
    return {
        f"{layer.name}/{role}": quantizer
        for layer in layers
        for role, quantizer in layer.quantizers.items()
        if quantizer.spec.scaling == "delayed"
    }

