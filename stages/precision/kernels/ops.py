"""Python entry points of the Triton quantizers (CUDA tensors; TRITON_INTERPRET=1 runs the FP8 and
MX ones on CPU, not NVFP4's, whose E2M1 rounding has one line of PTX the interpreter lacks).

Same results, bit for bit, as the PyTorch reference in fp8.py / mx.py / nvfp4.py, which stays
the CPU path and the oracle of the tests. Every function takes x of any leading shape with
blocks along the last dim; a 2-D x may be a transposed view (column-wise quantization).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from triton.runtime.driver import driver

from stages.precision.fp8 import Fp8Quantized
from stages.precision.kernels import toolchain
from stages.precision.kernels import triton_jit as jit
from stages.precision.kernels.launch import Launcher
from stages.precision.mx import MxQuantized
from stages.precision.nvfp4 import Nvfp4Quantized

toolchain.use_fixed_ptxas()

_MX_CODE = {torch.float8_e4m3fn: jit.MX_E4M3, torch.float8_e5m2: jit.MX_E5M2}
_AMAX, _FP8, _BLOCK = Launcher(jit._amax_kernel), Launcher(jit._fp8_kernel), Launcher(jit._block_kernel)
_FP8_ONE_LAUNCH = Launcher(jit._fp8_one_launch_kernel)
# Programs of _fp8_one_launch_kernel per SM: all must be resident at once (its grid-wide barrier),
# and enough of them keep the loads in flight that a grid of one tile per program has.
ONE_LAUNCH_PROGRAMS_PER_SM = 8


@dataclass(frozen=True)
class Tile:
    """What one Triton program covers: rows x cols of the 2-D view, and its warps."""

    rows: int
    cols: int
    warps: int


# Chosen on an H200 with `python -m bench.quantizers --sweep`: each family's fastest candidate over
# the bench's three sizes, each size's time counted in copies of that size (bench/results/
# quantizers.json, "tiles" and "sweep"). On the H100 a sweep of earlier versions of these kernels
# chose tiles within a few percent of these.
# Block tiles hold whole blocks: cols a multiple of 32 (MX) / 16 (NVFP4), rows a multiple of 32
# (a column-wise MX block runs along the rows).
TILES: dict[str, Tile] = {
    "amax": Tile(16, 512, 4),  # 8K elements per loop step of a partial maximum
    "fp8": Tile(32, 128, 4),  # the transposed store writes 32-byte runs
    "block": Tile(32, 128, 4),  # MX rows
    "nvfp4": Tile(8, 512, 8),  # NVFP4 rows alone (its fake quant, its codes): a block a thread, 32 scale bytes a row
    "rows_cols": Tile(32, 128, 2),  # blocks along K and along the rows from one read
    "block_t": Tile(64, 32, 1),  # a transposed view (column-wise quantization): reads along the rows
}
# What `bench.quantizers --sweep` tries (and the GPU tests check bit for bit) per family.
_BLOCK_SHAPES = [(32, 64), (32, 128), (32, 256), (64, 64), (64, 128), (128, 64)]
TILE_CANDIDATES: dict[str, list[Tile]] = {
    "amax": [Tile(r, c, w) for r, c in [(16, 512), (32, 512), (32, 1024), (64, 1024), (128, 512)] for w in (4, 8, 16)],
    "fp8": [Tile(r, c, w) for r, c in [(32, 128), (64, 64), (64, 128), (64, 256), (128, 64), (128, 128)] for w in (4, 8)],
    "block": [Tile(r, c, w) for r, c in _BLOCK_SHAPES for w in (2, 4, 8)],
    # 512 and 1024 wide: 32 and 64 scale bytes per row, whole 32-byte sectors of the scales.
    "nvfp4": [Tile(r, c, w) for r, c in [(16, 128), (16, 256), (8, 512), (4, 1024), *_BLOCK_SHAPES] for w in (2, 4, 8)],
    "rows_cols": [Tile(r, c, w) for r, c in [(32, 32), (32, 64), (32, 128), (32, 256), (64, 32), (64, 64), (64, 128)]
                  for w in (1, 2, 4, 8)],
    "block_t": [Tile(r, c, w) for r, c in [(32, 32), (32, 64), (32, 128), (64, 32), (64, 64), (64, 128), (128, 32),
                                           (128, 64), (256, 32)] for w in (1, 2, 4)],
}


_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x.reshape(1, -1)


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: a @jit function, whose call from Python costs microseconds per launch.
    return -(-a // b)


def _grid(r: int, k: int, tile: Tile) -> tuple[int, int]:
    return _cdiv(r, tile.rows), _cdiv(k, tile.cols)


def _is_transposed(x2: torch.Tensor) -> bool:
    return x2.stride(0) == 1 and x2.stride(1) != 1


def _empty_in_order_of(x2: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] output in x's memory order (column-major, a transposed view, for a transposed x)."""
    if _is_transposed(x2):
        return torch.empty(cols, rows, dtype=dtype, device=x2.device).t()
    return torch.empty(rows, cols, dtype=dtype, device=x2.device)


def amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as an fp32 0-dim tensor (NaN if any element is NaN), in one launch."""
    return _amax_bits_of(_as_2d(x)).view(torch.float32)


def _amax_bits_of(x2: torch.Tensor) -> torch.Tensor:
    """max |x| as the int32 bits the quantizers load (0-dim, in a buffer with _amax_kernel's partials)."""
    tile = TILES["amax"]
    tiles_r, tiles_k = _grid(*x2.shape, tile)
    programs = max(1, min(tiles_r * tiles_k, jit.MAX_PARTIALS.value))
    out = torch.empty(1 + programs, dtype=torch.int32, device=x2.device)
    _AMAX(
        (programs,), x2, out, _per_stream_zeros(x2.device, driver.active.get_current_stream(x2.device.index), ()),
        *x2.shape, *x2.stride(), tiles_k, tiles_r * tiles_k, BR=tile.rows, BK=tile.cols, num_warps=tile.warps,
    )
    return out[0]


@functools.cache
def _per_stream_zeros(device: torch.device, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A kernel's counters, which it sets back to 0 before it ends (_amax_kernel: its finished
    programs; _fp8_one_launch_kernel: [arrived, departed, amax bits]), one buffer per stream:
    launches queued on one stream run one after another, on two they could interleave."""
    return torch.zeros(shape, dtype=torch.int32, device=device)


def _amax_bits(amax_value: torch.Tensor) -> torch.Tensor:
    """A given amax as the kernels read it: its fp32 bits as one int32."""
    if amax_value.dtype == torch.float32 and amax_value.dim() == 0:  # delayed scaling's history rows: one view
        return amax_value.view(torch.int32)
    return amax_value.to(torch.float32).reshape(()).contiguous().view(torch.int32)


def fp8(
    x: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    amax_value: torch.Tensor | None = None,
    *,
    data: bool = True,
    transposed: bool = False,
    fake: bool = False,
    one_launch: bool = True,
    record_amax: torch.Tensor | None = None,
) -> tuple[Fp8Quantized | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-tensor FP8 (fp8.quantize_fp8 / fake_quantize_fp8). amax None = current scaling.

    Returns (Fp8Quantized, data^T contiguous [K, R] of a 2-D x, dequantized in x's dtype);
    each part only if asked for, all from one read of x after the amax pass (two where the
    ptxas in use cannot fuse the transposed store: toolchain.py). Current scaling takes one
    launch (_fp8_one_launch_kernel) where it can: the host's cost of a launch, a buffer and the
    Python around them is paid once per quantized tensor, not twice (a fp8 step is host-bound).
    `one_launch=False`: the amax kernel, then the cast (the same bits).
    `record_amax` (delayed scaling, with `amax_value`): a 0-dim fp32 tensor >= 0 that the cast
    raises to max |x| in place, in the same read of x."""
    if record_amax is not None and amax_value is None:
        raise ValueError("record_amax is for delayed scaling: give amax_value too")
    x2 = _as_2d(x)
    r, k = x2.shape
    device = x2.device
    d = torch.empty((r, k), dtype=dtype, device=device) if data else None
    d_t = torch.empty((k, r), dtype=dtype, device=device) if transposed else None
    f = _empty_in_order_of(x2, r, k, x.dtype) if fake else None
    scale = torch.empty((), dtype=torch.float32, device=device)
    # This ptxas miscompiles a transposed FP8 store beside another store (toolchain.py).
    split_transpose = d_t is not None and (d is not None or f is not None) and not toolchain.fused_transpose_ok(_arch(x))
    if amax_value is None and one_launch and not split_transpose and _compiled_kernels():
        _fp8_one_launch(x2, d, d_t, f, scale, dtype)
    else:
        bits = _amax_bits_of(x2) if amax_value is None else _amax_bits(amax_value)
        record = None if record_amax is None else record_amax.view(torch.int32)
        if split_transpose:
            _fp8_launch(x2, bits, None, d_t, None, None, dtype, record)
            _fp8_launch(x2, bits, d, None, f, scale, dtype, None)
        else:
            _fp8_launch(x2, bits, d, d_t, f, scale, dtype, record)
    q = Fp8Quantized(d.reshape(x.shape), scale) if data else None
    return q, d_t, None if f is None else f.reshape(x.shape)


def _compiled_kernels() -> bool:
    """False under Triton's interpreter, which runs programs one after another (a grid-wide
    barrier would wait forever)."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _fp8_one_launch(x2, d, d_t, f, scale, dtype) -> None:
    r, k = x2.shape
    tile = TILES["fp8"]
    tiles_k = _cdiv(k, tile.cols)
    n_tiles = _cdiv(r, tile.rows) * tiles_k
    index = x2.device.index
    config = (index, x2.dtype, dtype, d is None, d_t is None, None if f is None else f.dtype, tile)
    # Until the compiled kernel's resources are known, one program per SM: always resident.
    per_sm = _ONE_LAUNCH_PER_SM.get(config, 1)
    seen = _FP8_ONE_LAUNCH.last_compiled
    _FP8_ONE_LAUNCH(
        (max(1, min(n_tiles, _sm_count(index) * per_sm)),), x2,
        _per_stream_zeros(x2.device, torch._C._cuda_getCurrentRawStream(index), (3,)),
        scale if d is None else d, scale if d_t is None else d_t, scale if f is None else f, scale,
        r, k, *x2.stride(), *(d.stride() if d is not None else (0, 0)), *(f.stride() if f is not None else (0, 0)),
        tiles_k, n_tiles,
        E5M2=dtype == torch.float8_e5m2, WRITE_DATA=d is not None, WRITE_T=d_t is not None, WRITE_FAKE=f is not None,
        WRITE_SCALE=True, BR=tile.rows, BK=tile.cols, num_warps=tile.warps,
        # A cooperative launch: CUDA refuses a grid whose programs cannot all be resident (a GPU
        # shared through MPS, say) rather than leave the barrier waiting forever.
        launch_cooperative_grid=True,
    )
    compiled = _FP8_ONE_LAUNCH.last_compiled
    if compiled is not seen and compiled is not None:  # a new specialization: it may hold more resources
        resident = _resident_per_sm(compiled, index, tile.warps)
        _ONE_LAUNCH_PER_SM[config] = min(ONE_LAUNCH_PROGRAMS_PER_SM, resident, _ONE_LAUNCH_PER_SM.get(config, resident))


_ONE_LAUNCH_PER_SM: dict[tuple, int] = {}


def _resident_per_sm(compiled, device_index: int, warps: int) -> int:
    """How many programs of a compiled kernel one SM holds at once (CUDA's occupancy rules:
    registers allocated per warp in units of 256, shared memory plus 1 KiB reserved per block)."""
    props = torch.cuda.get_device_properties(device_index)
    regs_per_warp = -(-int(compiled.n_regs) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // max(regs_per_warp, 1) // warps
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (warps * 32)
    shared = int(getattr(compiled.metadata, "shared", 0))
    by_shared = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // (shared + 1024)
    return max(1, min(32, by_regs, by_threads, by_shared))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fp8_launch(x2, amax_bits, d, d_t, f, scale, dtype, record=None) -> None:
    """One _fp8_kernel pass writing the parts given (not None); `record`: the int32 bits of an
    amax to raise to max |x|."""
    r, k = x2.shape
    dummy = amax_bits
    tile = TILES["fp8"]
    _FP8(
        _grid(r, k, tile), x2, amax_bits,
        dummy if d is None else d, dummy if d_t is None else d_t, dummy if f is None else f,
        dummy if scale is None else scale, dummy if record is None else record,
        r, k, *x2.stride(), *(d.stride() if d is not None else (0, 0)), *(f.stride() if f is not None else (0, 0)),
        E5M2=dtype == torch.float8_e5m2, WRITE_DATA=d is not None, WRITE_T=d_t is not None, WRITE_FAKE=f is not None,
        WRITE_SCALE=scale is not None, RECORD_AMAX=record is not None, BR=tile.rows, BK=tile.cols,
        num_warps=tile.warps,
    )


def _arch(x: torch.Tensor) -> int:
    return _arch_of(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.cache
def _arch_of(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


def fake_fp8(x: torch.Tensor, dtype: torch.dtype, amax_value: torch.Tensor | None = None) -> torch.Tensor:
    return fp8(x, dtype, amax_value, data=False, fake=True)[2]


class _BlockOut(NamedTuple):
    row_fake: torch.Tensor | None  # dequantized, blocks along K, x's shape and memory order
    col_fake: torch.Tensor | None  # dequantized, MX blocks along the rows of a 2-D x
    data: torch.Tensor | None  # fp8 data or uint8 E2M1 codes, x's shape and memory order
    scales: torch.Tensor | None  # per block along K
    global_decode: torch.Tensor | None  # NVFP4's fp32 g, when data was asked for


def _block(
    x: torch.Tensor,
    row: int,
    col: int = jit.NONE,
    floor: bool = False,
    row_fake: bool = True,
    row_q: bool = False,
    global_amax: torch.Tensor | None = None,
) -> _BlockOut:
    x2 = _as_2d(x)
    r, k = x2.shape
    if col != jit.NONE and x.dim() != 2:
        raise ValueError(f"column-wise quantization needs a 2-D tensor, got shape {tuple(x.shape)}")
    nvfp4 = row in (jit.NVFP4, jit.NVFP4_MODELOPT)
    block = 16 if nvfp4 else 32
    n_scale_cols = _cdiv(k, block)
    dummy = torch.empty((), dtype=torch.int32, device=x.device)  # never read: a pointer for unused outputs
    bits = dummy
    if nvfp4:
        bits = _amax_bits_of(x2) if global_amax is None else _amax_bits(global_amax)
    row_out = _empty_in_order_of(x2, r, k, x.dtype) if row_fake and row != jit.NONE else None
    col_out = _empty_in_order_of(x2, r, k, x.dtype) if col != jit.NONE else None
    data = scales = g = None
    if row_q:
        data_dtype = torch.uint8 if row == jit.NVFP4 else (torch.float8_e5m2 if row == jit.MX_E5M2 else torch.float8_e4m3fn)
        scale_dtype = torch.float8_e4m3fn if row == jit.NVFP4 else torch.uint8
        # Data and scales in x's memory order: a transposed view's column-major data is TE's layout
        # of column-wise data (x's shape, blocks down the columns), and the kernel then writes what
        # it read without a transposition through shared memory; its programs each hold a run of
        # rows and one or a few blocks per row, so row-major scales would take a one-byte store per row.
        data = _empty_in_order_of(x2, r, k, data_dtype)
        scales = _empty_in_order_of(x2, r, n_scale_cols, scale_dtype)
        if row == jit.NVFP4:
            g = torch.empty((), dtype=torch.float32, device=x.device)
    tile = TILES[_block_family(x2, row, col)]
    grid = _grid(r, k, tile)
    # Row-major data with block scales: consecutive programs along K (the kernel's K_FASTEST), where
    # the grid's second dimension (at most 65535) holds the row tiles.
    k_fastest = row_q and not _is_transposed(x2) and grid[0] <= _MAX_GRID_Y
    _BLOCK(
        grid[::-1] if k_fastest else grid, x2, bits,
        dummy if row_out is None else row_out, dummy if col_out is None else col_out,
        dummy if data is None else data, dummy if scales is None else scales, dummy if g is None else g,
        r, k, *x2.stride(), *(row_out.stride() if row_out is not None else (0, 0)),
        *(col_out.stride() if col_out is not None else (0, 0)), *(data.stride() if data is not None else (0, 0)),
        *(scales.stride() if scales is not None else (0, 0)),
        n_scale_cols,
        ROW=row, COL=col, FLOOR=floor, WRITE_ROW_FAKE=row_out is not None, WRITE_ROW_Q=row_q,
        COLUMN_MAJOR=_is_transposed(x2), K_FASTEST=k_fastest, BR=tile.rows, BK=tile.cols, num_warps=tile.warps,
    )
    lead = x.shape[:-1]
    return _BlockOut(
        None if row_out is None else row_out.reshape(x.shape),
        col_out,
        None if data is None else data.reshape(x.shape),
        None if scales is None else scales.reshape(*lead, n_scale_cols),
        g,
    )


def _block_family(x2: torch.Tensor, row: int, col: int) -> str:
    if _is_transposed(x2):
        return "block_t"  # a transposed view reads along its rows: tiles long that way
    if col != jit.NONE:
        return "rows_cols"
    return "nvfp4" if row in (jit.NVFP4, jit.NVFP4_MODELOPT) else "block"


def mxfp8(x: torch.Tensor, elem_dtype: torch.dtype = torch.float8_e4m3fn, scale_rounding: str = "rceil") -> MxQuantized:
    """mx.quantize_mxfp8: fp8 data and biased E8M0 scales, blocks of 32 along the last dim, both
    in x's memory order (column-major for a transposed view: column-wise data as TE lays it out)."""
    out = _block(x, _MX_CODE[elem_dtype], floor=_floor(scale_rounding), row_fake=False, row_q=True)
    return MxQuantized(out.data, out.scales)


def fake_mxfp8(x: torch.Tensor, elem_dtype: torch.dtype = torch.float8_e4m3fn, scale_rounding: str = "rceil") -> torch.Tensor:
    return _block(x, _MX_CODE[elem_dtype], floor=_floor(scale_rounding)).row_fake


def nvfp4(x: torch.Tensor, global_amax: torch.Tensor | None = None) -> Nvfp4Quantized:
    """nvfp4.quantize_nvfp4 (1-D blocks, round to nearest even): codes, e4m3 block scales, g;
    codes and scales in x's memory order, as mxfp8's."""
    out = _block(x, jit.NVFP4, row_fake=False, row_q=True, global_amax=global_amax)
    return Nvfp4Quantized(out.data, out.scales, out.global_decode)


def fake_nvfp4(x: torch.Tensor, arithmetic: str = "torchao", global_amax: torch.Tensor | None = None) -> torch.Tensor:
    """nvfp4.fake_quantize_nvfp4 in one amax pass plus one fused quantize-dequantize pass; given
    `global_amax` (a calibrated amax, as ModelOpt's static quantizers hold), the one pass alone."""
    return _block(x, _nvfp4_code(arithmetic), global_amax=global_amax).row_fake


def _nvfp4_code(arithmetic: str) -> int:
    codes = {"torchao": jit.NVFP4, "modelopt": jit.NVFP4_MODELOPT}
    if arithmetic not in codes:
        raise ValueError(f"NVFP4 arithmetic '{arithmetic}' is not one of {', '.join(codes)}")
    return codes[arithmetic]


def fake_rows_and_cols(
    x: torch.Tensor, row_format: str, col_dtype: torch.dtype = torch.float8_e4m3fn, scale_rounding: str = "rceil",
    nvfp4_arithmetic: str = "torchao",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One read of a 2-D x: (row-wise fake quant along K in `row_format` (nvfp4 in
    `nvfp4_arithmetic`, mxfp8, mxfp8_e5m2), column-wise MXFP8 fake quant along the rows), both in x's layout.

    The column-wise result equals fake_quantize_mxfp8(x.t()).t(): what wgrad needs of x
    (blocks along the tokens) while fprop needs x along K."""
    row = {"nvfp4": _nvfp4_code(nvfp4_arithmetic), "mxfp8": jit.MX_E4M3, "mxfp8_e5m2": jit.MX_E5M2}[row_format]
    out = _block(x, row, _MX_CODE[col_dtype], floor=_floor(scale_rounding))
    return out.row_fake, out.col_fake


def _floor(scale_rounding: str) -> bool:
    if scale_rounding not in ("rceil", "floor"):
        raise ValueError(f"scale_rounding: '{scale_rounding}' is not one of rceil, floor")
    return scale_rounding == "floor"
