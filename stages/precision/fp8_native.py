"""The `scaled_mm` backend: per-tensor FP8 GEMMs on the tensor cores (torch._scaled_mm, Hopper+).

For the `fp8` recipe (current scaling, E4M3 forward, E5M2 gradients): every operand is
quantized exactly as the emulated backend quantizes it (the same Triton kernel, bit for bit
the reference of fp8.py); only the GEMM differs: the hardware multiplies the FP8 operands
exactly and accumulates in FP32, where the emulation multiplies bf16-rounded dequantized values.

Each GEMM accumulates as its recipe's `fast_accumulation` says (the fp8 recipe: fast in fprop,
promoted to FP32 in dgrad and wgrad, as Transformer Engine does).

Per-tensor scales do not depend on the layout, so each tensor is quantized once and its
transpose (the other major order that cuBLASLt needs) is written by the same kernel:
  fprop  y  = x_q  @ W_q^T      A = x_q [M,K] row-major,  B = W_q^T (W_q is [N,K] row-major)
  dgrad  dx = dy_q @ W_q        A = dy_q [M,N],           B = (W_q^T contiguous [K,N]).t()
  wgrad  dW = dy_q^T @ x_q      A = dy_q^T contiguous,    B = (x_q^T contiguous [K,M]).t()
The weight's FP8 forms are cached per weight version (reused by the micro-batches of a step);
q/k/v (gate/up) quantize their shared x once. The GEMMs run inside linear_op's custom ops,
so a compiled decoder layer stays one graph.

Delayed scaling (the fp8_delayed recipe, Transformer Engine's DelayedScaling): each layer's x, W
and dy scale from their own amax history (delayed.py, as the emulated backend keeps it), so a
cast is one pass over the tensor that also records its amax, where current scaling reads it
twice (amax, then cast). Siblings that read the same x (q/k/v, gate/up: surgery.input_owners)
hold one x history, which is what each of theirs would hold, so they still quantize x once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contract.compat import scaled_mm_refusal
from contract.recipe import OperandSpec, Recipe
from stages.precision.delayed import AmaxBank, AmaxHistory, banks_for, roll_all
from stages.precision.dtypes import FP8_DTYPES
from stages.precision.errors import PrecisionUnavailable
from stages.precision.linear_op import OWN_QUANTIZER, SHARED_INPUTS, OpaqueLinear
from stages.precision.surgery import linear_names, swap_linears


def check_recipe(recipe: Recipe) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(x dtype, W dtype, dy dtype) of a recipe this backend runs, else PrecisionUnavailable."""
    refusal = scaled_mm_refusal(recipe)
    if refusal:
        raise PrecisionUnavailable(refusal)
    return tuple(FP8_DTYPES[spec.format] for spec in (recipe.fprop.input, recipe.fprop.weight, recipe.dgrad.grad_output))


def check_device() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise PrecisionUnavailable("backend scaled_mm needs a CUDA GPU with FP8 tensor cores (sm_89+); choose backend emulated")


def _quantize(x2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data [R, K], dequantization scale, data^T contiguous [K, R]) from one amax pass and one cast pass."""
    from stages.precision.kernels import ops

    q, q_t, _ = ops.fp8(x2, dtype, transposed=True)
    return q.data, q.scale, q_t


class TensorScaling:
    """How one tensor of a layer (x, W or dy) finds its per-tensor scale: current scaling (its own
    amax) or delayed (an amax history: the cast records the amax it saw)."""

    def __init__(self, spec: OperandSpec, banks: dict[tuple[int, str], AmaxBank]) -> None:
        self.dtype = FP8_DTYPES[spec.format]
        self.history = None
        if spec.scaling == "delayed":
            length, algo = spec.amax_history_len, spec.amax_compute_algo
            self.history = AmaxHistory(length, algo, banks_for(length, algo, banks))

    def quantize(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(data, dequantization scale, data^T contiguous) of a 2-D x."""
        if self.history is None:
            return _quantize(x2, self.dtype)
        from stages.precision.kernels import ops

        amax = self.history.scaling_amax(x2.device)
        if amax is None:  # no history yet: this tensor's own amax (as the emulated backend)
            amax = ops.amax(x2)
        q, q_t, _ = ops.fp8(x2, self.dtype, amax, transposed=True, record_amax=self.history.pending_buffer(x2.device))
        return q.data, q.scale, q_t


_KIND = {dtype: kind for kind, dtype in FP8_DTYPES.items()}  # linear_op's kind is the recipe's format name


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    """What torch._scaled_mm writes for an operand from t: t's dtype if 16-bit, else bf16."""
    return t.dtype if t.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _quantize_input(x: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """linear_op.KINDS' fp8 parts of x: [x_q [M, K], scale, x_q^T [K, M]]."""
    return list(_quantize(x.reshape(-1, x.shape[-1]), FP8_DTYPES[kind]))


class ScaledMMLinear(OpaqueLinear):
    """Drop-in for nn.Linear holding the same Parameters; GEMMs in FP8 via torch._scaled_mm."""

    def __init__(
        self, linear: nn.Linear, recipe: Recipe, banks: dict[tuple[int, str], AmaxBank] | None = None,
        input_owner: ScaledMMLinear | None = None,
    ) -> None:
        """`banks`: where the delayed-scaling histories live (shared by a model's layers: delayed.py);
        `input_owner`: a layer reading the same x, whose x scaling (one amax history under
        delayed scaling) this one uses."""
        super().__init__(linear)
        if self.in_features % 16 or self.out_features % 16:
            raise PrecisionUnavailable(
                f"backend scaled_mm needs in/out features divisible by 16, got {self.in_features}x"
                f"{self.out_features}; list the layer in high_precision or choose backend emulated"
            )
        self.recipe = recipe
        check_recipe(recipe)
        # One scaling per tensor: check_recipe made sure both GEMMs that read a tensor ask alike.
        banks = {} if banks is None else banks
        self.scaling = {
            "input": TensorScaling(recipe.fprop.input, banks) if input_owner is None else input_owner.scaling["input"],
            "weight": TensorScaling(recipe.fprop.weight, banks),
            "grad_output": TensorScaling(recipe.dgrad.grad_output, banks),
        }
        self._cache: tuple[tuple[int, int], tuple[torch.Tensor, ...]] | None = None
        self._register(input_owner)

    def weight_fp8(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fprop's B = W_q^T [K,N] (a view of W_q [N,K]), dequantization scale, dgrad's B =
        (W_q^T contiguous).t() [N,K]), once per weight version: the micro-batches of a step reuse
        them, views included (each view is host time on a host-bound step)."""
        key = (weight.data_ptr(), weight._version)
        if self._cache is None or self._cache[0] != key:
            wq, scale, wq_t = self.scaling["weight"].quantize(weight)
            self._cache = (key, (wq.t(), scale, wq_t.t()))
        return self._cache[1]  # type: ignore[return-value]

    def clear_cache(self) -> None:
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() % 16:
            # torch._scaled_mm needs every GEMM dim divisible by 16, the tokens too (wgrad's K).
            raise PrecisionUnavailable(
                f"backend scaled_mm needs the token count divisible by 16, got {x.shape[:-1].numel()}; "
                "pad the batch or choose backend emulated"
            )
        return super().forward(x)

    def kind(self, x: torch.Tensor) -> str:
        return _KIND[self.scaling["input"].dtype]

    def input_key(self) -> str:
        if self.scaling["input"].history is not None:  # stateful: the layer (or its input owner) records the amax
            return OWN_QUANTIZER
        return f"scaled_mm:{_KIND[self.scaling['input'].dtype]}"

    def quantize_input(self, x: torch.Tensor, kind: str) -> list[torch.Tensor]:
        return list(self.scaling["input"].quantize(x.reshape(-1, x.shape[-1])))

    def stateless_input_quantizer(self):
        return _quantize_input

    def linear_forward(
        self, x: torch.Tensor, parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, kind: str
    ) -> torch.Tensor:
        xq, x_scale, _ = parts
        fprop_b, w_scale, _ = self.weight_fp8(weight)
        out_dtype = _out_dtype(x)
        y = torch._scaled_mm(
            xq, fprop_b, scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype,
            use_fast_accum=self.recipe.fprop.fast_accumulation,
        )
        if bias is not None:
            y = y + bias.to(out_dtype)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def linear_backward(
        self, grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, saved: list[torch.Tensor],
        kind: str, needs_dx: bool, needs_dw: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x_scale, xq_t = saved
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        gq, g_scale, gq_t = self.scaling["grad_output"].quantize(g2)
        out_dtype = _out_dtype(g2)
        dx = dw = None
        if needs_dx:
            _, w_scale, dgrad_b = self.weight_fp8(weight)
            dx = torch._scaled_mm(
                gq, dgrad_b, scale_a=g_scale, scale_b=w_scale, out_dtype=out_dtype,
                use_fast_accum=self.recipe.dgrad.fast_accumulation,
            )
            dx = dx.reshape(*grad_y.shape[:-1], self.in_features)
            dx = dx if dx.dtype == grad_y.dtype else dx.to(grad_y.dtype)
        if needs_dw:
            dw = torch._scaled_mm(
                gq_t, xq_t.t(), scale_a=g_scale, scale_b=x_scale, out_dtype=out_dtype,
                use_fast_accum=self.recipe.wgrad.fast_accumulation,
            )
            dw = dw if dw.dtype == weight.dtype else dw.to(weight.dtype)
        return dx, dw

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe.name}"


def convert_scaled_mm(model: nn.Module, recipe: Recipe) -> dict[str, ScaledMMLinear]:
    """Every linear the recipe quantizes, swapped in place; by name."""
    check_recipe(recipe)
    check_device()
    banks: dict[tuple[int, str], AmaxBank] = {}
    return swap_linears(model, linear_names(model, recipe),
                        lambda name, linear, owner: ScaledMMLinear(linear, recipe, banks, owner))


def step_scaled_mm(layers: dict[str, ScaledMMLinear]) -> None:
    """Once per optimizer step: drop the cached FP8 weights (their version moved on anyway)
    and the last shared activation; roll the delayed-scaling amax histories."""
    for layer in layers.values():
        layer.clear_cache()
    SHARED_INPUTS.clear()
    roll_all(list(amax_histories(layers).values()))


def amax_histories(layers: dict[str, ScaledMMLinear]) -> dict[str, AmaxHistory]:
    """The delayed-scaling histories, keyed `<linear name>/<tensor>` (input, weight, grad_output)."""
    return {
        f"{name}/{tensor}": scaling.history
        for name, layer in layers.items()
        for tensor, scaling in layer.scaling.items()
        if scaling.history is not None
    }


def reference_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """What the FP8 GEMM computes, in fp32: the dequantized operands' exact product
    (for tests: equal to the native output up to accumulation order and precision, and the bf16 output)."""
    from stages.precision.fp8 import quantize_fp8

    x_dtype, w_dtype, _ = check_recipe(recipe)
    xq, wq = quantize_fp8(x, x_dtype), quantize_fp8(weight, w_dtype)
    return F.linear(xq.data.float() * xq.scale, wq.data.float() * wq.scale)
