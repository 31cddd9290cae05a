"""Our packer on hand-made weights, against ModelOpt's NVFP4 tensor code, and the reload path."""

from __future__ import annotations

import pytest
import torch

from stages.deployment.packing import (
    LinearAmax,
    pack_fp8,
    pack_nvfp4,
    unpack_fp8,
    unpack_nvfp4,
)
from tests.stages.ptq.quant_testkit import TINY_MODEL


def _amax(weight: torch.Tensor, input_amax: float | None = None) -> LinearAmax:
    return LinearAmax(weight.abs().max().float(), None if input_amax is None else torch.tensor(input_amax))


def test_nvfp4_packs_a_hand_made_2x32_weight() -> None:
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    weight = torch.zeros(2, 32)
    # Row 0, block 0: every positive E2M1 value, then every negative one (-0.0 packs as +0).
    weight[0, :16] = torch.tensor(grid + [-v for v in grid])
    # Row 0, block 1: the grid halved (amax 3): block scale 224 = 3 / (6 * 6/2688); codes as block 0.
    weight[0, 16:] = weight[0, :16] / 2
    # Row 1: block 0 all zero (scale 1.0, ModelOpt's rule), block 1 one value at the midpoint 1.25*g*s.
    weight[1, 16] = 1.25 * 448 / 448 * 0.5  # 0.625 in a block of amax 0.625 scales to 6, i.e. code 7
    weight[1, 17] = 0.625 * 1.25 / 6  # scaled: exactly 1.25 (a tie between 1.0 and 1.5): RNE -> 1.0
    packed = pack_nvfp4(weight, _amax(weight, input_amax=5.376))

    assert packed["weight"].dtype == torch.uint8 and packed["weight"].shape == (2, 16)
    row0_block = [0x10, 0x32, 0x54, 0x76, 0x90, 0xBA, 0xDC, 0xFE]  # low nibble = even element
    assert packed["weight"][0].tolist() == row0_block + row0_block
    assert packed["weight"][1].tolist() == [0x00] * 8 + [0x27] + [0x00] * 7  # code 7 (6.0), code 2 (1.0)
    assert packed["weight_scale"].dtype == torch.float8_e4m3fn and packed["weight_scale"].shape == (2, 2)
    g = torch.tensor(6.0) / (6 * 448)
    assert packed["weight_scale"].float().tolist() == [[448.0, 224.0], [1.0, (torch.tensor(0.625) / (6 * g)).to(torch.float8_e4m3fn).float().item()]]
    assert packed["weight_scale_2"].shape == () and packed["weight_scale_2"].item() == g.item()
    assert packed["input_scale"].item() == pytest.approx(5.376 / 2688, rel=1e-7)
    restored = unpack_nvfp4(packed)
    assert torch.equal(restored[0], weight[0].abs() * weight[0].sign() + 0.0)  # exact, -0 -> +0
    assert restored[1, 17].item() == pytest.approx(0.625 / 6, rel=0.1)  # 1.0 on the grid, not 1.5


def test_fp8_packs_per_tensor_with_scale_amax_over_448() -> None:
    weight = torch.tensor([[448.0, -224.0, 1.0, 0.0], [2.0, -0.5, 3.0, 100.0]], dtype=torch.bfloat16) / 64
    packed = pack_fp8(weight, _amax(weight, input_amax=44.8))
    assert packed["weight_scale"].item() == 7.0 / 448
    assert packed["weight"].dtype == torch.float8_e4m3fn
    assert packed["weight"].float().tolist() == [[448.0, -224.0, 1.0, 0.0], [2.0, -0.5, 3.0, 96.0]]  # 100 -> 96 in E4M3
    assert packed["input_scale"].item() == pytest.approx(0.1)
    assert torch.equal(unpack_fp8(packed), packed["weight"].float() * (7.0 / 448))


def _tiny_weights() -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16)
    return [m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def test_nvfp4_packer_writes_modelopt_qtensor_bytes() -> None:
    """The functions ModelOpt's exporter calls, run on CPU: same scales, same packed bytes."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    for weight in _tiny_weights():
        ours = pack_nvfp4(weight, _amax(weight))
        scale_2 = NVFP4QTensor.get_weights_scaling_factor_2(weight)
        scale = NVFP4QTensor.get_weights_scaling_factor(weight, 16, scale_2)[0]
        qtensor = NVFP4QTensor.quantize(weight, 16, scale, scale_2)[0]
        assert torch.equal(ours["weight_scale_2"], scale_2.squeeze())
        assert torch.equal(ours["weight_scale"].view(torch.uint8), scale.view(torch.uint8))
        assert torch.equal(ours["weight"], qtensor._quantized_data)


def test_reload_restores_the_fake_quantized_weight() -> None:
    """unpack(pack(W)) == stages.precision's NVFP4 quantize-dequantize of W with the same global
    amax, except where the scaled value sits on an E2M1 rounding midpoint (within 2 fp32 ulps):
    ModelOpt divides by scale*g, stages.precision multiplies by (1/g)/scale, and at a tie the
    last ulp decides. There both pick a neighbour of the midpoint."""
    from stages.precision import dequantize_nvfp4, quantize_nvfp4

    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    ties = total = 0
    for weight in _tiny_weights():
        packed = pack_nvfp4(weight, _amax(weight))
        restored = unpack_nvfp4(packed)
        ours = quantize_nvfp4(weight, global_amax=weight.abs().max())
        reference = dequantize_nvfp4(ours)
        # A block scale may differ too, when amax_b / (6 g) sits on an E4M3 tie: same story.
        scale_differs = packed["weight_scale"].view(torch.uint8) != ours.block_scales.view(torch.uint8)
        pre_cast = weight.float().reshape(weight.shape[0], -1, 16).abs().amax(-1) / (6 * packed["weight_scale_2"])
        tie = (packed["weight_scale"].float() + ours.block_scales.float()) / 2
        assert torch.all((pre_cast - tie).abs()[scale_differs] <= 2 * torch.finfo(torch.float32).eps * tie[scale_differs])
        same_block = ~scale_differs.repeat_interleave(16, dim=1)
        scale = (packed["weight_scale"].float() * packed["weight_scale_2"]).repeat_interleave(16, dim=1)
        scaled = (weight.float() / scale).abs()
        near_tie = ((scaled.unsqueeze(-1) - midpoints).abs() <= 2 * torch.finfo(torch.float32).eps * midpoints).any(-1)
        differs = (restored != reference) & same_block
        assert not (differs & ~near_tie).any()
        step = (restored - reference).abs() / scale
        assert torch.all(step[differs] <= 2.0)  # adjacent grid points (the widest gap is 4 -> 6)
        ties += int(differs.sum())
        total += weight.numel()
    assert ties < total * 1e-3
