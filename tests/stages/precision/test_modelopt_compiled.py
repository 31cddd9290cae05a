"""Backend modelopt for torch.compile: ModelOpt's QuantLinears computed by our ops with their own
quantizers (stages/precision/modelopt_compiled.py). On CPU the ops run the PyTorch reference of
ModelOpt's NVFP4 arithmetic; the GPU kernels' bits are test_kernels_cuda's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from precision_helpers import tiny_qwen3

from stages.precision import PrecisionUnavailable, load_recipe
from stages.precision.modelopt_compiled import CompiledQuantLinear, convert_for_compile
from stages.precision.nvfp4 import fake_quantize_nvfp4

mtq = pytest.importorskip("modelopt.torch.quantization")


def modelopt_nvfp4_model(input_amax: float | None = 3.0):
    """The tiny Qwen3 with ModelOpt's NVFP4 quantizers as nvfp4_qat configures them: weight amax
    calibrated by ModelOpt (no forward loop: its NVFP4 forward needs CUDA), input amax given."""
    from stages.precision.modelopt_backend import modelopt_config

    model = mtq.quantize(tiny_qwen3(), modelopt_config(load_recipe("nvfp4_qat"), mtq), None)
    if input_amax is not None:
        for name, module in model.named_modules():
            if name.endswith("input_quantizer") and module.is_enabled:
                module.amax = torch.tensor(input_amax)
    return model


def fake(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    return fake_quantize_nvfp4(x, arithmetic="modelopt", global_amax=amax)


def test_quant_linears_keep_modelopt_state_and_names() -> None:
    import modelopt.torch.opt as mto

    model = modelopt_nvfp4_model()
    keys, state = list(model.state_dict()), str(mto.modelopt_state(model))
    layers = convert_for_compile(model)
    assert len(layers) == 15 and type(model.lm_head) is CompiledQuantLinear  # 2 x 7 projections + lm_head
    assert [layer.quantized for layer in layers].count(False) == 1 and not model.lm_head.quantized
    assert list(model.state_dict()) == keys  # weights and amax under ModelOpt's names: checkpoints, export
    assert str(mto.modelopt_state(model)) == state


def test_forward_and_straight_through_backward_are_modelopt_static_nvfp4() -> None:
    model = modelopt_nvfp4_model()
    convert_for_compile(model)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    w_q = fake(layer.weight.detach(), layer.weight_quantizer._amax)
    x_q = fake(x.detach(), layer.input_quantizer._amax)
    assert torch.equal(y, F.linear(x_q, w_q))
    grad = torch.randn_like(y)
    y.backward(grad)
    g2 = grad.reshape(-1, grad.shape[-1])
    assert torch.allclose(x.grad, (g2 @ w_q).reshape(x.shape), rtol=0, atol=1e-6)
    assert torch.allclose(layer.weight.grad, g2.t() @ x_q.reshape(-1, 64), rtol=0, atol=1e-6)


def test_static_amax_saturates_what_exceeds_it() -> None:
    """ModelOpt's static input amax: values past it clip at the largest code of the largest scale."""
    x = torch.tensor([[0.5, 100.0] + [0.0] * 14])
    assert fake(x, torch.tensor(10.0))[0, 1].item() == pytest.approx(10.0, rel=1e-6)  # 6 x 448 x (10 / 2688)
    assert fake(x, torch.tensor(100.0))[0, 1].item() == pytest.approx(100.0, rel=1e-6)


def test_a_decoder_layer_traces_whole_with_dynamo() -> None:
    """No graph break and no dynamo error (ModelOpt's own QuantLinear raises one on torch 2.11)."""
    model = modelopt_nvfp4_model()
    convert_for_compile(model)
    layer = model.model.layers[0]
    h = torch.randn(1, 8, 64)
    positions = torch.arange(8).unsqueeze(0)
    rope = model.model.rotary_emb(h, positions)
    eager = layer(h, position_embeddings=rope, position_ids=positions)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(h, position_embeddings=rope, position_ids=positions)
    eager, compiled = (out[0] if isinstance(out, tuple) else out for out in (eager, compiled))
    assert torch.equal(eager, compiled)


def test_a_quantizer_it_cannot_reproduce_is_refused_in_one_line() -> None:
    model = modelopt_nvfp4_model(input_amax=None)  # inputs never calibrated: ModelOpt would scale dynamically
    with pytest.raises(PrecisionUnavailable, match=r"model\.layers\.0\.self_attn\.q_proj\.input_quantizer lacks "
                       r"a calibrated per-tensor amax; set compile: false"):
        convert_for_compile(model)
    fp8 = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    with pytest.raises(PrecisionUnavailable, match=r"lacks NVFP4"):
        convert_for_compile(mtq.quantize(tiny_qwen3(), fp8, lambda m: m(input_ids=torch.tensor([[1, 2, 3]]))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ModelOpt's NVFP4 kernel needs CUDA")
@pytest.mark.parametrize("amax_scale", [0.25, 1.0, 4.0])  # a static amax under, at and over x's own
def test_the_op_on_a_gpu_is_modelopt_bits_with_its_static_amax(amax_scale: float) -> None:
    from modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper import (
        fp4_fake_quant_block,
    )

    from stages.precision.modelopt_compiled import nvfp4_modelopt_fake

    x = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(3)).bfloat16().cuda()
    amax = x.abs().amax().float() * amax_scale
    ours, theirs = nvfp4_modelopt_fake(x, amax), fp4_fake_quant_block(x, amax)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
