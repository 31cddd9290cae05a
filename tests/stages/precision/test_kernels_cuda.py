"""The Triton quantizers give the PyTorch reference's bits on a GPU; the scaled_mm backend
multiplies the same FP8 operands as the emulated one.

GPU tests are skipped without CUDA (CI has none): run them on a GPU machine with
`pytest tests/stages/precision/test_kernels_cuda.py`. The recipe checks run everywhere.
(Triton's CPU interpreter is no oracle here: its FP8 casts round ties and subnormals
differently from the hardware's cvt.rn.satfinite.)
"""

from __future__ import annotations

import pytest
import torch
from precision_helpers import recipe_with, tiny_qwen3

from bench.modelopt_nvfp4 import inputs as modelopt_inputs
from contract.recipe import Recipe
from stages.precision import load_recipe, prepare_model
from stages.precision.errors import PrecisionUnavailable
from stages.precision.fp8 import fake_quantize_fp8, quantize_fp8
from stages.precision.fp8_native import check_recipe
from stages.precision.mx import fake_quantize_mxfp8, quantize_mxfp8
from stages.precision.nvfp4 import fake_quantize_nvfp4, quantize_nvfp4

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels, FP8 GEMMs)")
needs_fp8_gemm = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with FP8 tensor cores (sm_89+)",
)
DTYPES = [torch.float32, torch.bfloat16]


def ops():
    from stages.precision.kernels import ops as kernel_ops

    return kernel_ops


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare raw bits (NaN == NaN, -0.0 != 0.0)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(view).cpu()


def edge_tensor(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values spread over 2^-40..2^40 by row, plus zero rows, signed zeros, subnormals, ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.exp2(torch.randint(-40, 40, (rows, 1), generator=gen).float())
    x[0] = 0.0
    x[1, : min(cols, 8)] = torch.tensor([-0.0, 0.0, 1e-40, -1e-42, 448 * 2.0**-127, 6.0, 2.5, -5.0])[: min(cols, 8)]
    x[2] = torch.arange(cols) * 0.25 - cols / 8  # exact E2M1 / FP8 ties after scaling
    return x.to(dtype).cuda()


SHAPES = [(64, 256), (96, 100), (33, 17)]  # full blocks, a partial last block, tiny ragged


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_kernel_matches_reference(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x = edge_tensor(*shape, dtype)
    for fp8_dtype, fmt in ((torch.float8_e4m3fn, "fp8_e4m3"), (torch.float8_e5m2, "fp8_e5m2")):
        q, q_t, fake = ops().fp8(x, fp8_dtype, transposed=True, fake=True)
        ref = quantize_fp8(x, fp8_dtype)
        assert torch.equal(bits(q.data), bits(ref.data)), fmt
        assert torch.equal(q.scale.cpu(), ref.scale.cpu()), fmt
        assert torch.equal(bits(q_t), bits(ref.data.t())), fmt
        assert torch.equal(bits(fake), bits(fake_quantize_fp8(x, fmt))), fmt
        amax = torch.tensor(3.0, device="cuda")  # delayed scaling: the amax comes from history
        assert torch.equal(bits(ops().fake_fp8(x, fp8_dtype, amax)), bits(fake_quantize_fp8(x, fmt, amax))), fmt


@needs_cuda
def test_fp8_transpose_in_a_second_launch_gives_the_same_bits(monkeypatch) -> None:
    """The path taken where Triton's ptxas cannot fuse the transposed FP8 store (toolchain.py)."""
    from stages.precision.kernels import toolchain

    x = edge_tensor(96, 160, torch.bfloat16, seed=6)
    fused = ops().fp8(x, torch.float8_e5m2, transposed=True, fake=True)
    monkeypatch.setattr(toolchain, "fused_transpose_ok", lambda arch: False)
    q, q_t, fake = ops().fp8(x, torch.float8_e5m2, transposed=True, fake=True)
    ref = quantize_fp8(x, torch.float8_e5m2)
    assert torch.equal(bits(q_t), bits(ref.data.t())) and torch.equal(bits(q_t), bits(fused[1]))
    assert torch.equal(bits(q.data), bits(ref.data)) and torch.equal(q.scale.cpu(), ref.scale.cpu())
    assert torch.equal(bits(fake), bits(fused[2]))


def same_fp8_outputs(a, b) -> bool:
    """Two ops.fp8 results (data, scale, transposed data, dequantized) bit for bit."""
    (qa, ta, fa), (qb, tb, fb) = a, b
    return (torch.equal(bits(qa.data), bits(qb.data)) and torch.equal(bits(qa.scale), bits(qb.scale))
            and torch.equal(bits(ta), bits(tb)) and torch.equal(bits(fa), bits(fb)))


@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1), (33, 17), (96, 160), (4096, 4096), (8192, 1024), (4096, 12288)])
def test_fp8_in_one_launch_equals_the_amax_kernel_then_the_cast(shape: tuple[int, int]) -> None:
    """Current scaling in one launch (a grid-wide barrier between the maximum and the cast) gives
    the two launches' bits: call after call (its counters go back to 0), with a NaN, on another
    stream, and replayed from a CUDA graph."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for scale in (1.0, 1e-30, 3e4, float("nan")):
            x = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16) * (1.0 if scale != scale else scale)
            if scale != scale:
                x[-1, -1] = scale
            one = ops().fp8(x, dtype, transposed=True, fake=True)
            assert same_fp8_outputs(one, ops().fp8(x, dtype, transposed=True, fake=True, one_launch=False)), (dtype, scale)
    x = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = ops().fp8(x, torch.float8_e4m3fn, transposed=True, fake=True)
    torch.cuda.current_stream().wait_stream(side)
    assert same_fp8_outputs(on_side, ops().fp8(x, torch.float8_e4m3fn, transposed=True, fake=True, one_launch=False))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops().fp8(x, torch.float8_e5m2, transposed=True, fake=True)
    for scale in (3.0, 1e-20):
        x.copy_(torch.randn(shape, device="cuda", generator=gen) * scale)
        graph.replay()
        expected = ops().fp8(x, torch.float8_e5m2, transposed=True, fake=True, one_launch=False)
        assert same_fp8_outputs(captured, expected), scale


@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1), (33, 17), (4096, 4096)])
def test_fp8_cast_with_a_given_amax_records_the_amax_it_read(shape: tuple[int, int]) -> None:
    """Delayed scaling: the cast raises a recorded amax to max |x| in the same read of x (NaN
    included), never lowers it, and writes the bits of the cast alone."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    given = torch.tensor(2.5, device="cuda")
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for special in (None, float("nan")):
            x = torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16) * 3
            if special is not None:
                x[-1, -1] = special
            record = torch.zeros((), device="cuda")
            out = ops().fp8(x, dtype, given, transposed=True, fake=True, record_amax=record)
            assert same_fp8_outputs(out, ops().fp8(x, dtype, given, transposed=True, fake=True))
            if special is None:
                assert torch.equal(bits(record), bits(x.float().abs().max()))
            else:  # NaN's bits differ between the kernel and torch; both are NaN
                assert record.isnan()
    high = torch.tensor(1e4, device="cuda")
    ops().fp8(torch.ones(shape, device="cuda", dtype=torch.bfloat16), torch.float8_e4m3fn, given, record_amax=high)
    assert high.item() == 1e4
    with pytest.raises(ValueError, match="record_amax is for delayed scaling"):
        ops().fp8(torch.ones(shape, device="cuda"), torch.float8_e4m3fn, record_amax=high)


@needs_cuda
def test_a_one_launch_grid_that_cannot_be_resident_is_refused_not_left_waiting(monkeypatch) -> None:
    """The grid-wide barrier needs every program resident: the launch is cooperative, so CUDA
    refuses a grid past what the SMs hold instead of hanging on it."""
    x = torch.randn(4096, 4096, device="cuda").to(torch.bfloat16)
    ops().fp8(x, torch.float8_e4m3fn, transposed=True)  # compiled, its residency known
    for key in list(ops()._ONE_LAUNCH_PER_SM):
        monkeypatch.setitem(ops()._ONE_LAUNCH_PER_SM, key, 64)  # 64 programs per SM: more than fit
    with pytest.raises(RuntimeError):
        ops().fp8(x, torch.float8_e4m3fn, transposed=True)
        torch.cuda.synchronize()


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rounding", ["rceil", "floor"])
def test_mxfp8_kernel_matches_reference_row_and_column_wise(dtype, shape, rounding) -> None:
    x = edge_tensor(*shape, dtype, seed=1)
    for elem, fmt in ((torch.float8_e4m3fn, "mxfp8"), (torch.float8_e5m2, "mxfp8_e5m2")):
        for view in (x, x.t()):  # x.t(): blocks along the rows (dgrad's W^T, wgrad's x^T)
            q, ref = ops().mxfp8(view, elem, rounding), quantize_mxfp8(view, elem, rounding)
            assert q.data.stride() == view.stride()  # x's memory order: x.t() gives TE's column-wise layout
            assert torch.equal(q.scale_e8m0.cpu(), ref.scale_e8m0.cpu()), (fmt, rounding)
            assert torch.equal(bits(q.data), bits(ref.data)), (fmt, rounding)
            fake = ops().fake_mxfp8(view, elem, rounding)
            assert fake.stride() == view.stride()
            assert torch.equal(bits(fake), bits(fake_quantize_mxfp8(view, fmt, rounding))), (fmt, rounding)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_kernel_matches_reference(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x = edge_tensor(*shape, dtype, seed=2)
    for view in (x, x.t()):
        q, ref = ops().nvfp4(view), quantize_nvfp4(view)
        assert q.codes.stride() == view.stride()
        assert torch.equal(q.global_scale.cpu(), ref.global_scale.cpu())
        assert torch.equal(bits(q.block_scales), bits(ref.block_scales))
        assert torch.equal(q.codes.cpu(), ref.codes.cpu())
        assert torch.equal(bits(ops().fake_nvfp4(view)), bits(fake_quantize_nvfp4(view)))


def e2m1_probes() -> torch.Tensor:
    """fp32 rows of 16-blocks whose NVFP4 scales are exactly 1 (global amax 2688, each block's
    amax 6), so that the other 15 elements of a block are the quotients |x| / scale themselves:
    every E2M1 grid point and midpoint, 3 ulps either side, every bf16 value up to 6, both signs."""
    grid = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6])
    below, above, mags = grid, grid, [grid]
    for _ in range(3):
        below, above = torch.nextafter(below, torch.tensor(-1.0)), torch.nextafter(above, torch.tensor(7.0))
        mags += [below, above]
    mags.append(torch.arange(0, 0x40C1, dtype=torch.int16).view(torch.bfloat16).float())  # +0 .. 6.0 in bf16
    magnitudes = torch.cat(mags).clamp(0, 6)
    values = torch.cat([magnitudes, -magnitudes, torch.tensor([-0.0])])
    values = torch.cat([values, values.new_zeros(-len(values) % (15 * 16))]).reshape(-1, 15)
    blocks = torch.cat([torch.full((len(values), 1), 6.0), values], dim=1).reshape(-1, 256)
    blocks[0, :16] = 2688.0  # the global amax: g = 2688 / 2688 = 1
    return blocks.cuda()


@needs_cuda
def test_nvfp4_kernels_round_every_e2m1_threshold_as_the_reference() -> None:
    x = e2m1_probes()
    assert torch.equal(bits(ops().fake_nvfp4(x)), bits(fake_quantize_nvfp4(x)))
    q, ref = ops().nvfp4(x), quantize_nvfp4(x)
    assert torch.equal(bits(q.block_scales), bits(ref.block_scales)) and torch.equal(q.codes.cpu(), ref.codes.cpu())
    assert torch.equal(bits(ops().fake_rows_and_cols(x, "nvfp4")[0]), bits(fake_quantize_nvfp4(x)))
    assert set(q.codes.unique().tolist()) == set(range(16))  # every code, both signs
    try:
        from modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper import (
            fp4_fake_quant_block,
        )
    except ImportError:
        return
    if torch.cuda.get_device_capability() >= (8, 9):
        assert torch.equal(bits(ops().fake_nvfp4(x, "modelopt")), bits(fp4_fake_quant_block(x, x.abs().amax().float())))


MODELOPT_CASES = ["randn_bf16", "randn_fp32", "outliers", "row_scales", "ties", "signed_zeros", "all_zero", "edge_rows"]


def modelopt_case(case: str) -> torch.Tensor:
    return edge_tensor(96, 160, torch.float32, seed=8) if case == "edge_rows" else modelopt_inputs()[case].cuda()


@needs_fp8_gemm
@pytest.mark.parametrize("case", MODELOPT_CASES)
def test_nvfp4_modelopt_arithmetic_equals_modelopts_fake_quant_bit_for_bit(case: str) -> None:
    """ModelOpt's own NVFP4 QAT kernel (fp4_fake_quant_block, Hopper+) against our kernel with
    nvfp4_arithmetic modelopt, unfused and fused with wgrad's column-wise MXFP8."""
    hopper = pytest.importorskip("modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper")
    x = modelopt_case(case)
    theirs = hopper.fp4_fake_quant_block(x, x.abs().amax().float())
    assert torch.equal(bits(ops().fake_nvfp4(x, "modelopt")), bits(theirs))
    assert torch.equal(bits(ops().fake_rows_and_cols(x, "nvfp4", nvfp4_arithmetic="modelopt")[0]), bits(theirs))
    if case in ("row_scales", "ties", "signed_zeros"):  # where torchao's arithmetic gives other bits
        assert not torch.equal(bits(ops().fake_nvfp4(x)), bits(theirs))


@needs_cuda
@pytest.mark.parametrize("case", ["randn_bf16", "randn_fp32", "outliers", "row_scales"])
def test_nvfp4_modelopt_reference_differs_from_the_kernel_only_at_rounding_thresholds(case: str) -> None:
    """The PyTorch reference divides exactly, the kernel (as ModelOpt's) approximately: they
    part only where a quotient lies within 2 ulp of a rounding threshold (an element's E2M1
    code or a block's E4M3 scale): 1.1e-4 to 2.6e-4 of the elements here on an H200."""
    x = modelopt_case(case)
    kernel, reference = ops().fake_nvfp4(x, "modelopt"), fake_quantize_nvfp4(x, arithmetic="modelopt")
    differ = kernel != reference
    assert differ.float().mean().item() < 1e-3
    step = (kernel - reference).abs()[differ].float()
    assert torch.all(step <= x.abs().max().float() / 2688 * 448 * 2 * 1.01)  # at most one E2M1 step (<= 2 s)


@needs_cuda
def test_kernels_on_special_values_and_3d_input() -> None:
    x = edge_tensor(4, 64, torch.bfloat16, seed=3).reshape(2, 2, 64)
    nan_block = x.clone()
    nan_block[0, 1, 5] = float("nan")  # one NaN: its MX block is NaN, NVFP4 all NaN (global amax)
    inf_block = x.clone()
    inf_block[1, 0, 40] = float("inf")
    for t in (x, nan_block, inf_block):
        assert torch.equal(bits(ops().fake_mxfp8(t)), bits(fake_quantize_mxfp8(t)))
        assert torch.equal(bits(ops().mxfp8(t).scale_e8m0), bits(quantize_mxfp8(t).scale_e8m0))
        assert torch.equal(bits(ops().fake_nvfp4(t)), bits(fake_quantize_nvfp4(t)))
        assert torch.equal(bits(ops().fake_fp8(t, torch.float8_e4m3fn)), bits(fake_quantize_fp8(t, "fp8_e4m3")))
    assert ops().fake_mxfp8(nan_block)[0, 1, :32].isnan().all()
    assert not ops().fake_mxfp8(nan_block)[0, 1, 32:].isnan().any()
    assert ops().amax(nan_block).isnan() and ops().amax(inf_block).isinf()
    assert ops().amax(x).item() == x.abs().max().item()
    zeros = torch.zeros(32, 64, device="cuda")  # all-zero: finite scales, zeros out (epsilon 1e-12 in fp64)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q, ref = ops().fp8(zeros, dtype)[0], quantize_fp8(zeros, dtype)
        assert torch.equal(q.scale.cpu(), ref.scale.cpu()) and not q.data.float().any()
    assert torch.equal(bits(ops().fake_nvfp4(zeros)), bits(fake_quantize_nvfp4(zeros)))
    assert torch.equal(ops().nvfp4(zeros).global_scale.cpu(), torch.tensor(1.0))
    assert torch.equal(bits(ops().fake_nvfp4(zeros, "modelopt")), bits(zeros))


@needs_cuda
def test_division_by_a_correctly_rounded_reciprocal_equals_ieee_division() -> None:
    """The NVFP4 kernel's block scales divide by 6 and by g through _div_with_reciprocal: over every
    fp32 mantissa of a in two binades, for b = 6 and each E4M3 mantissa, and random pairs."""
    from division_check import division_mismatches as count

    mantissas = torch.arange(0, 1 << 23, device="cuda", dtype=torch.int32)
    one_to_two = (mantissas | (127 << 23)).view(torch.float32)
    for a in (one_to_two, one_to_two * 2.0**-100):
        for b in [6.0, *[(1 + m / 8) * 2.0**e for m in range(8) for e in (-6, 0, 8)]]:
            assert count(a, torch.tensor(b, device="cuda")) == 0, b
    gen = torch.Generator(device="cuda").manual_seed(7)
    for _ in range(4):
        a, b = (torch.randint(0, 1 << 23, (1 << 24,), device="cuda", generator=gen, dtype=torch.int32) | (127 << 23)
                for _ in range(2))
        assert count(a.view(torch.float32) * 2.0**40, b.view(torch.float32) * 2.0**-30) == 0


@needs_cuda
def test_amax_is_one_launch_that_can_be_repeated_and_replayed() -> None:
    """The amax kernel's last program reduces the others' maxima and resets their counter: call
    after call, size after size (1 to 512 programs), and replayed from a CUDA graph."""
    gen = torch.Generator(device="cuda").manual_seed(6)
    for rows, cols in [(1, 1), (3, 700), (64, 4096), (4096, 4096), (33, 17)] * 3:
        x = torch.randn(rows, cols, device="cuda", generator=gen) * torch.rand((), device="cuda", generator=gen) * 100
        assert ops().amax(x).item() == x.abs().max().item()
    x = torch.randn(2048, 2048, device="cuda", generator=gen)
    ops().amax(x)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops().amax(x)
    for scale in (3.0, 0.5, 1e-30):
        x.copy_(torch.randn(2048, 2048, device="cuda", generator=gen) * scale)
        graph.replay()
        assert captured.item() == x.abs().max().item()


@needs_cuda
@pytest.mark.parametrize("row_format", ["nvfp4", "nvfp4_modelopt", "mxfp8", "mxfp8_e5m2"])
def test_fused_rows_and_cols_equal_two_reference_quantizations(row_format: str) -> None:
    x = edge_tensor(96, 160, torch.bfloat16, seed=4)
    if row_format == "nvfp4_modelopt":  # its reference is ModelOpt's kernel: the unfused kernel equals it
        rows, cols = ops().fake_rows_and_cols(x, "nvfp4", nvfp4_arithmetic="modelopt")
        row_ref = ops().fake_nvfp4(x, "modelopt")
    elif row_format == "nvfp4":
        rows, cols = ops().fake_rows_and_cols(x, "nvfp4")
        row_ref = fake_quantize_nvfp4(x)
    else:
        rows, cols = ops().fake_rows_and_cols(x, row_format)
        row_ref = fake_quantize_mxfp8(x, row_format)
    assert torch.equal(bits(rows), bits(row_ref))
    assert torch.equal(bits(cols), bits(fake_quantize_mxfp8(x.t()).t()))


def tile_cases() -> list[tuple[str, object]]:
    """Per family the first, a middle and the last candidate: each compiles its own kernels."""
    from stages.precision.kernels.ops import TILE_CANDIDATES

    return [(family, tiles[i]) for family, tiles in TILE_CANDIDATES.items() for i in sorted({0, len(tiles) // 2, len(tiles) - 1})]


@needs_cuda
@pytest.mark.parametrize(("family", "tile"), tile_cases() if torch.cuda.is_available() else [])
def test_every_candidate_tile_gives_the_reference_bits(family: str, tile, monkeypatch) -> None:
    """The tile is a speed knob (bench.quantizers --sweep picks it), never a numerics one."""
    monkeypatch.setitem(ops().TILES, family, tile)
    x = edge_tensor(96, 160, torch.bfloat16, seed=5)  # partial tiles on both axes for every candidate
    assert ops().amax(x).item() == x.abs().max().item()
    if family == "fp8":
        q, q_t, _ = ops().fp8(x, torch.float8_e5m2, transposed=True)
        ref = quantize_fp8(x, torch.float8_e5m2)
        assert torch.equal(bits(q.data), bits(ref.data)) and torch.equal(bits(q_t), bits(ref.data.t()))
    if family == "nvfp4":
        q, ref = ops().nvfp4(x), quantize_nvfp4(x)
        assert torch.equal(q.codes.cpu(), ref.codes.cpu()) and torch.equal(bits(q.block_scales), bits(ref.block_scales))
        assert torch.equal(bits(ops().fake_nvfp4(x)), bits(fake_quantize_nvfp4(x)))
        modelopt = ops().fake_nvfp4(x, "modelopt")
        monkeypatch.setitem(ops().TILES, family, ops().TILE_CANDIDATES[family][0])
        assert torch.equal(bits(modelopt), bits(ops().fake_nvfp4(x, "modelopt")))
    if family == "block":
        assert torch.equal(bits(ops().mxfp8(x).data), bits(quantize_mxfp8(x).data))
        assert torch.equal(bits(ops().fake_mxfp8(x)), bits(fake_quantize_mxfp8(x)))
    if family == "rows_cols":
        rows, cols = ops().fake_rows_and_cols(x, "nvfp4")
        assert torch.equal(bits(rows), bits(fake_quantize_nvfp4(x)))
        assert torch.equal(bits(cols), bits(fake_quantize_mxfp8(x.t()).t()))
    if family == "block_t":  # the tile of transposed views
        assert torch.equal(bits(ops().mxfp8(x.t()).data), bits(quantize_mxfp8(x.t()).data))
        assert torch.equal(ops().nvfp4(x.t()).codes.cpu(), quantize_nvfp4(x.t()).codes.cpu())
        rows, cols = ops().fake_rows_and_cols(x.t(), "mxfp8")
        assert torch.equal(bits(rows), bits(fake_quantize_mxfp8(x.t())))
        assert torch.equal(bits(cols), bits(fake_quantize_mxfp8(x).t()))


@needs_cuda
def test_direct_launches_keep_one_kernel_per_specialization() -> None:
    """Launcher reuses Triton's compiled kernel only where Triton would: a misaligned view or a
    stride of 1 is a specialization of its own, and each gives the reference's bits."""
    x = edge_tensor(96, 160, torch.bfloat16, seed=6)
    storage = torch.empty(96 * 160 + 1, dtype=torch.bfloat16, device="cuda")
    misaligned = storage[1:].view(96, 160)  # 2 bytes past a 16-byte boundary
    misaligned.copy_(x)
    launcher = ops()._FP8
    for view in (x, x, misaligned, misaligned, x.t(), x.t()):  # each twice: the second launches directly
        before = launcher.cached()
        q, q_t, _ = ops().fp8(view, torch.float8_e4m3fn, transposed=True)
        ref = quantize_fp8(view, torch.float8_e4m3fn)
        assert torch.equal(bits(q.data), bits(ref.data)) and torch.equal(bits(q_t), bits(ref.data.t()))
        assert launcher.cached() - before <= 1
    keys = list(launcher._compiled)
    assert len(keys) == len(set(keys)) >= 3


def train_two_steps(recipe: Recipe, backend: str, use_kernels: bool, monkeypatch) -> tuple[list[float], list[torch.Tensor]]:
    """Two optimizer steps of 2 micro-batches on CUDA; kernels off = the reference quantizers."""
    import stages.precision.emulated as emulated

    if not use_kernels:
        monkeypatch.setattr(emulated, "fake_quantize_cuda", lambda x, spec, amax=None: None)
        monkeypatch.setattr(emulated, "fused_rows_and_cols", lambda x, a, b: None)
        monkeypatch.setattr(emulated, "fused_pair_supported", lambda a, b: False)
    model = tiny_qwen3().to("cuda", torch.bfloat16)
    prepared = prepare_model(model, recipe, backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for step in range(2):
        for _ in range(2):
            batch = torch.randint(0, 256, (2, 32), generator=gen).cuda()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        prepared.on_step(step + 1)
    monkeypatch.undo()
    return losses, [p.detach().float().cpu() for p in model.parameters()]


@needs_cuda
@pytest.mark.parametrize("name", ["fp8", "mxfp8", "nv4f_mx8b", "nvfp4_qat_torchao_arithmetic"])
def test_emulated_training_with_kernels_equals_reference_bit_for_bit(name: str, monkeypatch) -> None:
    """Kernels, fused row/column passes and the per-step weight cache change no bit."""
    if name == "nvfp4_qat_torchao_arithmetic":
        recipe = recipe_with("nvfp4_qat", fprop="nvfp4")
    else:
        recipe = load_recipe(name)
    losses_k, params_k = train_two_steps(recipe, "emulated", True, monkeypatch)
    losses_r, params_r = train_two_steps(recipe, "emulated", False, monkeypatch)
    assert losses_k == losses_r
    assert all(torch.equal(a, b) for a, b in zip(params_k, params_r, strict=True))


@needs_cuda
def test_nvfp4_qat_in_modelopts_arithmetic_trains_as_its_exact_reference(monkeypatch) -> None:
    """nvfp4_qat's kernel divides as ModelOpt does (approximately): the same run as the exactly
    dividing reference but for a rare rounding-threshold element."""
    losses_k, _ = train_two_steps(load_recipe("nvfp4_qat"), "emulated", True, monkeypatch)
    losses_r, _ = train_two_steps(load_recipe("nvfp4_qat"), "emulated", False, monkeypatch)
    assert losses_k == pytest.approx(losses_r, rel=1e-3)


@needs_cuda
def test_weight_cache_reuses_within_a_step_and_refreshes_after_the_update() -> None:
    model = tiny_qwen3().to("cuda", torch.bfloat16)
    prepared = prepare_model(model, load_recipe("mxfp8"), "emulated")
    layer = model.get_submodule(prepared.converted[0])
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    model(input_ids=batch, labels=batch).loss.backward()
    first = layer._weight_cache["fprop.weight"][1]
    model(input_ids=batch, labels=batch).loss.backward()
    assert layer._weight_cache["fprop.weight"][1] is first  # second micro-batch: not re-quantized
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer update bumps the version counter
    model(input_ids=batch, labels=batch).loss.backward()
    refreshed = layer._weight_cache["fprop.weight"][1]
    assert refreshed is not first
    assert torch.equal(bits(refreshed), bits(fake_quantize_mxfp8(layer.weight.detach())))


@needs_cuda
def test_shared_inputs_are_quantized_once_per_forward(monkeypatch) -> None:
    """q/k/v_proj and gate/up_proj read the same x: one activation quantization each group."""
    import stages.precision.emulated as emulated

    calls = []
    real = emulated.fake_quantize_cuda
    monkeypatch.setattr(emulated, "fake_quantize_cuda", lambda x, spec, amax=None: calls.append(x.shape) or real(x, spec, amax))
    model = tiny_qwen3().to("cuda", torch.bfloat16)
    prepare_model(model, load_recipe("nvfp4_qat"), "emulated")
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    model(input_ids=batch, labels=batch).loss.backward()
    # 2 layers x (7 weights + 4 distinct inputs: qkv, o, gate/up, down); 28 without sharing.
    assert len(calls) == 2 * (7 + 4)


@needs_fp8_gemm
@pytest.mark.parametrize("fast_fprop", [True, False], ids=["fprop_fast_accumulation", "fprop_fp32_accumulation"])
def test_scaled_mm_linear_matches_the_exact_product_of_the_emulated_operands(fast_fprop: bool) -> None:
    from stages.precision.fp8_native import ScaledMMLinear, reference_linear

    recipe = recipe_with("fp8", fprop={"format": "fp8_e4m3", "fast_accumulation": fast_fprop})
    gen = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(256, 128, bias=False).to("cuda", torch.bfloat16)
    layer = ScaledMMLinear(linear, recipe)
    x = torch.randn(4, 32, 256, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    y = layer(x)
    exact = reference_linear(x.detach(), linear.weight.detach(), recipe)
    # Same FP8 operands: differs from the exact product by the bf16 output rounding (and, with
    # fast accumulation, partial sums kept in the tensor cores' precision: small at K = 256).
    torch.testing.assert_close(y.float(), exact, rtol=2**-7, atol=1e-3 * exact.abs().max().item())
    emulated = torch.nn.functional.linear(fake_quantize_fp8(x.detach(), "fp8_e4m3"), fake_quantize_fp8(linear.weight.detach(), "fp8_e4m3"))
    rel = (y.float() - emulated.float()).norm() / emulated.float().norm()
    assert rel < 1e-2, rel.item()  # the emulation rounds dequantized operands to bf16

    grad = torch.randn(4, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    y.backward(grad)
    g_q = quantize_fp8(grad.reshape(-1, 128), torch.float8_e5m2)
    w_q = quantize_fp8(linear.weight.detach(), torch.float8_e4m3fn)
    x_q = quantize_fp8(x.detach().reshape(-1, 256), torch.float8_e4m3fn)
    g_deq, w_deq, x_deq = (q.data.float() * q.scale for q in (g_q, w_q, x_q))
    dx_exact, dw_exact = (g_deq @ w_deq).reshape(x.shape), g_deq.t() @ x_deq
    torch.testing.assert_close(x.grad.float(), dx_exact, rtol=2**-7, atol=1e-3 * dx_exact.abs().max().item())
    torch.testing.assert_close(linear.weight.grad.float(), dw_exact, rtol=2**-7, atol=1e-3 * dw_exact.abs().max().item())


@needs_fp8_gemm
def test_fast_accumulation_reaches_the_gemm() -> None:
    """Over a long K the tensor cores' own accumulation rounds differently from FP32 promotion."""
    from stages.precision.fp8_native import ScaledMMLinear

    gen = torch.Generator().manual_seed(7)
    linear = torch.nn.Linear(8192, 64, bias=False).to("cuda", torch.bfloat16)
    x = torch.randn(64, 8192, generator=gen).to("cuda", torch.bfloat16)
    outputs = {}
    for fast in (True, False):
        recipe = recipe_with("fp8", fprop={"format": "fp8_e4m3", "fast_accumulation": fast})
        with torch.no_grad():
            outputs[fast] = ScaledMMLinear(linear, recipe)(x).float()
    assert not torch.equal(outputs[True], outputs[False])
    torch.testing.assert_close(outputs[True], outputs[False], rtol=2**-5, atol=1e-2 * outputs[False].abs().max().item())


@needs_fp8_gemm
@pytest.mark.parametrize("name", ["fp8", "fp8_delayed"])
def test_scaled_mm_backend_trains_like_emulated(name: str, monkeypatch) -> None:
    losses_native, _ = train_two_steps(load_recipe(name), "scaled_mm", True, monkeypatch)
    losses_emulated, _ = train_two_steps(load_recipe(name), "emulated", True, monkeypatch)
    assert losses_native[0] == pytest.approx(losses_emulated[0], rel=2e-2)
    assert losses_native[-1] == pytest.approx(losses_emulated[-1], rel=5e-2)


@needs_fp8_gemm
def test_scaled_mm_delayed_scaling_keeps_the_emulated_backends_amax_histories() -> None:
    """fp8_delayed on FP8 GEMMs: x, W and dy scale from the same histories as the emulated
    backend's six operand roles (x in fprop and wgrad, W in fprop and dgrad, dy in dgrad and
    wgrad), step after step, and the outputs agree as the two GEMMs' arithmetic allows."""
    from stages.precision.emulated import QuantizedLinear, step_emulated
    from stages.precision.fp8_native import ScaledMMLinear, step_scaled_mm

    recipe = load_recipe("fp8_delayed")
    gen = torch.Generator().manual_seed(13)
    linear = torch.nn.Linear(256, 128, bias=False).to("cuda", torch.bfloat16)
    native, emulated = ScaledMMLinear(linear, recipe), QuantizedLinear(linear, recipe, "layer")
    roles = {"input": ("fprop.input", "wgrad.input"), "weight": ("fprop.weight", "dgrad.weight"),
             "grad_output": ("dgrad.grad_output", "wgrad.grad_output")}
    for step, scale in enumerate((1.0, 20.0, 0.05, 1.0)):
        x = (torch.randn(2, 32, 256, generator=gen) * scale).to("cuda", torch.bfloat16)
        grad = torch.randn(2, 32, 128, generator=gen).to("cuda", torch.bfloat16)
        outputs = []
        for layer in (native, emulated):
            x_in = x.clone().requires_grad_()
            y = layer(x_in)
            y.backward(grad)
            outputs.append((y.float(), x_in.grad.float()))
        (y_n, dx_n), (y_e, dx_e) = outputs
        for got, want in ((y_n, y_e), (dx_n, dx_e)):
            assert ((got - want).norm() / want.norm()) < 2e-2, step  # bf16-rounded emulated operands
        step_scaled_mm({"layer": native})
        step_emulated([emulated], recipe, step + 1)
        for tensor, (first, second) in roles.items():
            history = native.scaling[tensor].history.history
            assert torch.equal(history, emulated.quantizers[first].history), (step, tensor)
            assert torch.equal(history, emulated.quantizers[second].history), (step, tensor)
    assert native.scaling["input"].history.steps_recorded == 4


@needs_fp8_gemm
def test_scaled_mm_delayed_scaling_state_goes_into_a_checkpoint_and_back() -> None:
    model = tiny_qwen3().to("cuda", torch.bfloat16)
    prepared = prepare_model(model, load_recipe("fp8_delayed"), "scaled_mm")
    batch = torch.randint(0, 256, (2, 32)).cuda()
    model(input_ids=batch, labels=batch).loss.backward()
    prepared.on_step(1)
    state = prepared.state_dict()
    assert "model.layers.0.self_attn.q_proj/input" in state and len(state) == 3 * len(prepared.converted)
    attn = model.model.layers[0].self_attn  # q/k/v read one x: one history (surgery.input_owners)
    assert attn.q_proj.scaling["input"] is attn.v_proj.scaling["input"] is not attn.o_proj.scaling["input"]
    assert torch.equal(state["model.layers.0.self_attn.v_proj/input"]["history"], state["model.layers.0.self_attn.q_proj/input"]["history"])
    fresh = prepare_model(tiny_qwen3().to("cuda", torch.bfloat16), load_recipe("fp8_delayed"), "scaled_mm")
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[key]["history"], value["history"]) for key, value in state.items())
    with pytest.raises(PrecisionUnavailable, match="does not fit the recipe"):
        fresh.load_state_dict({"model.layers.0.mlp.up_proj/input": state["model.layers.0.mlp.up_proj/input"]})


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("mxfp8", {}, r"needs per-tensor FP8 \(current or delayed scaling\) on all six operands"),
        ("fp8_delayed", {"wgrad": {"grad_output": {"format": "fp8_e5m2", "scaling": "delayed"}, "input": "fp8_e4m3"}},
         "same format and scaling for x in fprop and wgrad"),
        ("fp8", {"backward_source": "forward_quantized"}, "runs backward_source original only"),
        ("fp8", {"dgrad": {"grad_output": "fp8_e5m2", "weight": "fp8_e5m2"}}, "same format and scaling for W"),
    ],
)
def test_scaled_mm_refuses_recipes_it_cannot_run(name: str, changes: dict, message: str) -> None:
    recipe = recipe_with(name, **changes) if changes else load_recipe(name)
    with pytest.raises(PrecisionUnavailable, match=message) as error:
        check_recipe(recipe)
    assert "choose backend emulated" in str(error.value)


@pytest.mark.parametrize("name", ["fp8", "fp8_delayed"])
def test_scaled_mm_accepts_the_fp8_recipes(name: str) -> None:
    assert check_recipe(load_recipe(name)) == (torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_scaled_mm_without_cuda_is_a_one_line_error() -> None:
    with pytest.raises(PrecisionUnavailable, match="needs a CUDA GPU with FP8 tensor cores.*choose backend emulated"):
        prepare_model(tiny_qwen3(), load_recipe("fp8"), "scaled_mm")
