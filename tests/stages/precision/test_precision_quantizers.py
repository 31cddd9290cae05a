"""Our quantizers against torchao's reference code, bit for bit, on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from stages.precision import (
    dequantize_nvfp4,
    fake_quantize,
    quantize_fp8,
    quantize_mxfp8,
    quantize_nvfp4,
)
from stages.precision.mx import dequantize_mxfp8
from stages.precision.nvfp4 import fake_quantize_nvfp4, pack_fp4

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated  # noqa: E402
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import (  # noqa: E402
    nvfp4_quantize,
    per_tensor_amax_to_scale,
)

MODES = {"rceil": ScaleCalculationMode.RCEIL, "floor": ScaleCalculationMode.FLOOR}


def wide_random(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Normal values with per-row magnitudes spread over ~2^-40..2^40: many exponents."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * torch.exp2(torch.randint(-40, 40, (rows, 1), generator=gen).float())


def edge_cases() -> torch.Tensor:
    """One 32-element block per row (two NVFP4 blocks): the cases the hardware must get right."""
    f32 = torch.finfo(torch.float32)
    rows = [
        torch.zeros(32),  # all-zero block
        torch.full((32,), 3.0),  # all-equal block
        torch.full((32,), -1e-3),
        torch.full((32,), f32.tiny / 4),  # fp32 subnormals
        torch.linspace(-1, 1, 32) * f32.tiny,
        torch.full((32,), f32.max),  # max magnitude
        torch.linspace(-1, 1, 32) * f32.max,
        torch.tensor([448.0, -448.0, 57344.0, 6.0] * 8),  # format maxima
        torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4),  # E2M1 ties (scale 1)
        torch.tensor([2.0**-9, 2.0**-10, 2.0**-6, 2.0**-7] * 8),  # E4M3 subnormal range
        torch.cat([torch.zeros(31), torch.tensor([1e-30])]),
        torch.cat([torch.tensor([-0.0]), torch.ones(31)]),
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["rceil", "floor"])
def test_mxfp8_matches_torchao_bit_for_bit(dtype: torch.dtype, mode: str) -> None:
    x = torch.cat([wide_random(1024, 1024, seed=1), edge_cases().repeat(1, 32)]).to(dtype)  # >1e6 values
    ref_scale, ref_data = mx_tensor.to_mx(x, torch.float8_e4m3fn, 32, scaling_mode=MODES[mode])
    ours = quantize_mxfp8(x, torch.float8_e4m3fn, mode)
    assert torch.equal(ours.scale_e8m0, ref_scale.view(torch.uint8).reshape(ours.scale_e8m0.shape))
    assert torch.equal(ours.data.view(torch.uint8), ref_data.view(torch.uint8))
    ref_dq = mx_tensor.to_dtype(ref_data, ref_scale, torch.float8_e4m3fn, 32, dtype)
    assert torch.equal(dequantize_mxfp8(ours, dtype).view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       ref_dq.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_mxfp8_rceil_is_exact_where_torchao_eager_log2_rounds() -> None:
    """amax/448 one ulp above 2^k: the exact rule (cuBLAS, TE, cvt.rp.satfinite.ue8m0) rounds the
    scale up to 2^(k+1); torchao's eager fallback computes ceil(log2(.)) in fp32, loses the ulp
    and picks 2^k. We follow the hardware (see NUMERICS.md)."""
    descale = torch.tensor(2.0**-8).nextafter(torch.tensor(1.0))
    x = torch.zeros(1, 32)
    x[0, 0] = descale * 448
    ours = quantize_mxfp8(x)
    ref_scale, _ = mx_tensor.to_mx(x, torch.float8_e4m3fn, 32, scaling_mode=ScaleCalculationMode.RCEIL)
    assert ours.scale_e8m0.item() == 127 - 7  # 2^-7
    assert ref_scale.view(torch.uint8).item() == 127 - 8  # torchao eager: 2^-8
    assert ours.data[0, 0].float().item() == 224.0  # 448 (1 + 2^-23) / 2 rounds to 224


def test_mxfp8_nan_and_inf_blocks() -> None:
    x = torch.ones(3, 32)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    q = quantize_mxfp8(x)
    assert q.scale_e8m0.tolist() == [[255], [254], [127 - 8]]  # NaN block, inf -> max scale, 1/448 -> 2^-8
    out = fake_quantize(x, "mxfp8")
    assert torch.isnan(out[0]).all()  # a NaN scale poisons its block
    assert torch.equal(out[2], torch.ones(32))


def test_mxfp8_partial_last_block_equals_zero_padded_block() -> None:
    x = wide_random(64, 100, seed=2)  # 3 full blocks + 4 values
    padded = torch.nn.functional.pad(x, (0, 28))
    ref_scale, ref_data = mx_tensor.to_mx(padded, torch.float8_e4m3fn, 32, scaling_mode=ScaleCalculationMode.RCEIL)
    ours = quantize_mxfp8(x)
    assert ours.data.shape == (64, 100) and ours.scale_e8m0.shape == (64, 4)
    assert torch.equal(ours.data.view(torch.uint8), ref_data.view(torch.uint8)[:, :100])
    assert torch.equal(ours.scale_e8m0, ref_scale.view(torch.uint8).reshape(64, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_matches_torchao_bit_for_bit(dtype: torch.dtype) -> None:
    x = torch.cat([wide_random(1024, 1024, seed=3), edge_cases()[:10].repeat(1, 32) * 1e-3]).to(dtype)
    ref_scales, ref_packed = nvfp4_quantize(x, 16, per_tensor_amax_to_scale(x.abs().max()))
    ours = quantize_nvfp4(x)
    assert torch.equal(ours.block_scales.view(torch.uint8), ref_scales.view(torch.uint8))
    assert torch.equal(pack_fp4(ours.codes), ref_packed)
    assert ours.global_scale.item() == per_tensor_amax_to_scale(x.abs().max()).item()
    ref_values = f4_unpacked_to_f32(unpack_uint4(ref_packed)).reshape(x.shape[0], -1, 16)
    ref_dq = (ref_values * (ours.global_scale * ref_scales.float()).unsqueeze(-1)).reshape(x.shape)
    assert torch.equal(dequantize_nvfp4(ours), ref_dq)  # torchao's NVFP4Tensor.dequantize order


def test_nvfp4_edge_blocks_each_as_its_own_tensor() -> None:
    """Each edge row alone (so its amax is the global amax): zero, equal, subnormal, max, ties."""
    for row in edge_cases()[:11]:  # the last row holds -0.0 and ones (checked below)
        if not torch.isfinite(row.abs().max() / (448 * 6)) or row.abs().max() == 0:
            continue  # global scale would overflow/vanish: see test_nvfp4_all_zero_and_nan_tensors
        x = row.reshape(1, 32)
        ref_scales, ref_packed = nvfp4_quantize(x, 16, per_tensor_amax_to_scale(x.abs().max()))
        ours = quantize_nvfp4(x)
        assert torch.equal(ours.block_scales.view(torch.uint8), ref_scales.view(torch.uint8)), row
        assert torch.equal(pack_fp4(ours.codes), ref_packed), row


def test_nvfp4_ties_round_to_even_and_negative_zero_keeps_sign() -> None:
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.0, -0.1, 0, 0, 0, 0, 0, 0]])
    # A global amax of 448 * 6 makes g = 1 and the block scale 1: the values hit the ties exactly.
    ours = quantize_nvfp4(x, global_amax=torch.tensor(2688.0))
    assert ours.codes[0, :10].tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8, 8]
    _, ref_packed = nvfp4_quantize(x, 16, torch.tensor(1.0))
    assert torch.equal(pack_fp4(ours.codes), ref_packed)


def test_nvfp4_in_modelopts_arithmetic_divides_drops_zero_signs_and_zeroes_tiny_blocks() -> None:
    x = torch.zeros(2, 16)
    x[0, :6] = torch.tensor([3.0, 1.75, -0.1, -0.0, 0.8, -2.2])  # amax 3: block scale 448, s * g = 0.5
    x[1, :4] = torch.tensor([5e-5, -3e-5, 1e-5, 2.5e-5])  # s * g under 1e-5
    modelopt, torchao = fake_quantize_nvfp4(x, arithmetic="modelopt"), fake_quantize_nvfp4(x)
    # 1.75 / 0.5 is the tie 3.5, which rounds to even (4): torchao's x * ((1/g)/s) lands just below it.
    assert modelopt[0, :6].tolist() == [3.0, 2.0, 0.0, 0.0, 0.75, -2.0]
    assert torchao[0, :6].tolist() == [3.0, 1.5, -0.0, -0.0, 0.75, -2.0]
    assert not torch.signbit(modelopt[0, 2:4]).any() and torch.signbit(torchao[0, 2:4]).all()
    assert not modelopt[1].any() and torchao[1, :4].abs().min() > 0  # ModelOpt: scales < 1e-5 become 1.0


def test_nvfp4_all_zero_and_nan_tensors() -> None:
    zeros = torch.zeros(2, 32)
    assert torch.equal(fake_quantize(zeros, "nvfp4"), zeros)
    assert quantize_nvfp4(zeros).global_scale.item() == 1.0  # documented choice (torchao: 0 -> NaN)
    nan_row = torch.ones(2, 32)
    nan_row[0, 3] = float("nan")
    # NaN makes the global amax NaN, so the whole tensor is NaN (as torchao and TE).
    assert torch.isnan(fake_quantize(nan_row, "nvfp4")).all()
    ones = torch.ones(2, 32)
    assert torch.equal(fake_quantize(ones, "nvfp4"), ones)


def test_nvfp4_partial_last_block() -> None:
    x = wide_random(8, 40, seed=4)  # 2 blocks + 8 values
    padded = torch.nn.functional.pad(x, (0, 8))
    ref_scales, ref_packed = nvfp4_quantize(padded, 16, per_tensor_amax_to_scale(x.abs().max()))
    ours = quantize_nvfp4(x)
    assert torch.equal(ours.block_scales.view(torch.uint8), ref_scales.view(torch.uint8))
    assert torch.equal(pack_fp4(torch.nn.functional.pad(ours.codes, (0, 8))), ref_packed)


def test_nvfp4_2d_blocks_give_the_same_scales_to_w_and_w_transposed() -> None:
    w = wide_random(48, 80, seed=5)
    rows = quantize_nvfp4(w, block_2d=True)
    cols = quantize_nvfp4(w.t().contiguous(), block_2d=True)
    # One scale per 16x16 tile: every row of a tile holds it, in both orientations.
    tiles = rows.block_scales.float()[::16]  # [3 tile rows, 5 tile cols]
    assert torch.equal(rows.block_scales.float(), tiles.repeat_interleave(16, 0))
    assert torch.equal(cols.block_scales.float()[::16], tiles.t())
    assert torch.equal(dequantize_nvfp4(rows), dequantize_nvfp4(cols).t())


def test_nvfp4_stochastic_rounding_is_unbiased_and_on_grid() -> None:
    x = torch.full((4096, 16), 6.0)
    x[:, 1:] = 0.3  # between 0 and 0.5 after scaling by 1
    torch.manual_seed(0)
    out = dequantize_nvfp4(quantize_nvfp4(x, stochastic_rounding=True))
    values = set(out[:, 1:].unique().tolist())
    assert values == {0.0, 0.5}
    # 61440 independent draws of 0.5 with probability 0.6: the mean's standard deviation is
    # 0.5 * sqrt(0.6 * 0.4 / 61440) = 0.001, so 0.01 is ten of them (the draws come from the
    # seeded CPU generator, the same on every machine).
    assert math.isclose(out[:, 1:].mean().item(), 0.3, abs_tol=0.01)


@pytest.mark.parametrize("fmt, dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
@pytest.mark.parametrize("hp", [torch.float32, torch.bfloat16])
def test_fp8_per_tensor_matches_torchao(fmt: str, dtype: torch.dtype, hp: torch.dtype) -> None:
    x = torch.cat([wide_random(1024, 1024, seed=6) * 1e-12, edge_cases()[:3].repeat(1, 32)]).to(hp)
    scale = tensor_to_scale(x, dtype)
    ref = to_fp8_saturated(x.to(torch.float32) * scale, dtype)
    ours = quantize_fp8(x, dtype)
    assert ours.scale.item() == (1.0 / scale.double()).float().item()  # dequantization scale
    assert torch.equal(ours.data.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(fake_quantize(x, fmt), (ref.to(torch.float32) / scale).to(hp))


def test_fp8_saturates_with_a_delayed_amax_and_keeps_nan() -> None:
    x = torch.tensor([1.0, 2.0, 4.0, float("nan")])
    q = quantize_fp8(x, torch.float8_e4m3fn, amax=torch.tensor(2.0))  # history says 2
    assert q.data.float()[:3].tolist() == [224.0, 448.0, 448.0]  # 4.0 saturates, not inf
    assert torch.isnan(q.data.float()[3])
    assert q.scale.item() == pytest.approx(2.0 / 448)


def test_fake_quantize_keeps_dtype_and_shape_and_rejects_unknown_formats() -> None:
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    for fmt in ("bf16", "fp8_e4m3", "fp8_e5m2", "mxfp8", "nvfp4"):
        out = fake_quantize(x, fmt)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
    with pytest.raises(ValueError, match="format 'int3' is not one of bf16, fp8_e4m3"):
        fake_quantize(x, "int3")
