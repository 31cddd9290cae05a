"""Triton kernels for the quantizers of `fp8.py`, `mx.py` and `nvfp4.py`, bit for bit.

Each arithmetic step mirrors the PyTorch reference in the same order and rounding:
divisions are `div_rn` (IEEE; Triton's `/` on fp32 is an approximate division) or, for NVFP4's
block scales, a multiplication by the correctly rounded reciprocal with one FMA correction,
which gives the same bits where it is used (`_div_with_reciprocal`), the casts
to FP8 round to nearest even and saturate, as the reference's clamp then cast, and block amaxes
propagate a NaN, as `torch.amax` does.

Tensors are seen as 2-D [R, K] with arbitrary strides: blocks run along K. A column-wise
quantization (blocks along the rows, as dgrad's W^T and wgrad's x^T need) is the same kernel
on the transposed strides; `_block_kernel` also does both at once from one read of x.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Format codes shared with ops.py (constexpr in the kernels). NVFP4_MODELOPT: NVFP4 in
# ModelOpt's arithmetic (nvfp4.py), fake quant only.
NONE, MX_E4M3, MX_E5M2, NVFP4, NVFP4_MODELOPT = 0, 1, 2, 3, 4
# Most programs of _amax_kernel (a power of 2: its last program reduces their maxima in one load).
MAX_PARTIALS = tl.constexpr(512)
# fp32(1/2688): ModelOpt divides its amax by 6 * 448 on CUDA, which multiplies by this reciprocal.
MODELOPT_INV_GLOBAL = tl.constexpr(1.0 / 2688.0)


@triton.jit
def _abs_max(xb, AXIS: tl.constexpr):
    """max |x| along AXIS (kept), NaN-propagating: one FMNMX.NAN per element, |x| an operand modifier."""
    return tl.reduce(tl.abs(xb), AXIS, _max_keeping_nan, keep_dims=True)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pow2(e):
    """Exact 2^e as fp32 for an int32 e in [-149, 127] (subnormals built from their bits)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    shift = tl.maximum(e + 149, 0)
    subnormal = (tl.full(e.shape, 1, tl.int32) << shift).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, subnormal)


@triton.jit
def _mx(xb, AXIS: tl.constexpr, E5M2: tl.constexpr, FLOOR: tl.constexpr):
    """MXFP8 of 32-blocks along AXIS of fp32 xb: (fp8 data, biased E8M0 scale, dequantized)."""
    if E5M2:
        fmax: tl.constexpr = 57344.0
        emax: tl.constexpr = 15
    else:
        fmax: tl.constexpr = 448.0
        emax: tl.constexpr = 8
    amax = _abs_max(xb, AXIS)
    if FLOOR:
        unbiased = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - emax
        biased = tl.minimum(tl.maximum(unbiased, -127), 128) + 127
        biased = tl.where(amax != amax, 255, biased)
        scale = tl.maximum((biased << 23).to(tl.float32, bitcast=True), 2.0**-126)
        xb_b, scale_b = tl.broadcast(xb, scale)  # div_rn does not broadcast; a pure broadcast keeps -0.0
        scaled = tl.math.div_rn(xb_b, scale_b)
    else:
        descale = tl.math.div_rn(amax, tl.full(amax.shape, fmax, tl.float32))
        bits = descale.to(tl.int32, bitcast=True)
        exponent = (bits >> 23) & 0xFF
        mantissa = bits & 0x7FFFFF
        biased = tl.where(exponent == 0, (mantissa > 0x400000).to(tl.int32), exponent + (mantissa != 0).to(tl.int32))
        biased = tl.minimum(biased, 254)
        biased = tl.where(descale != descale, 255, biased)
        reciprocal = tl.where(biased == 0, 1.0, _pow2(127 - tl.minimum(biased, 254)))
        reciprocal = tl.where(biased == 255, float("nan"), reciprocal)
        scaled = xb * reciprocal
    # The reference clamps to +-fmax, then casts: the cast's saturation does both (_to_fp8).
    data = _to_fp8(scaled, E5M2)
    decode = tl.where(biased == 255, float("nan"), _pow2(tl.minimum(biased, 254) - 127))
    return data, biased, data.to(tl.float32) * decode


@triton.jit
def _to_fp8(x, E5M2: tl.constexpr):
    """clamp(x, -max, max) cast to E4M3 / E5M2, round to nearest even, NaN kept: Triton casts with
    cvt.rn.satfinite, whose saturation is that clamp (an infinity, or anything that would round
    past the largest finite value, becomes it), so no min/max instructions are spent on it."""
    if E5M2:
        data = x.to(tl.float8e5, fp_downcast_rounding="rtne")
    else:
        data = x.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return data


@triton.jit
def _nvfp4(xb, g, AXIS: tl.constexpr):
    """NVFP4 of 16-blocks along AXIS with global decode scale g: (codes, e4m3 scales, dequantized)."""
    block_amax = _abs_max(xb, AXIS)
    six = tl.full(block_amax.shape, 6.0, tl.float32)
    inv_g = tl.math.div_rn(tl.full((), 1.0, tl.float32), g)
    if (g >= 2.0**-112) & (g < float("inf")):
        # RN(RN(amax / 6) / g) without two IEEE divisions per block. A quotient under 2^-126,
        # where the FMA correction may miss, lies under the 2^-6 clamp below (a6 <= 2^-126, g >= 2^-112).
        a6 = _div_with_reciprocal(block_amax, six, tl.math.div_rn(tl.full((), 1.0, tl.float32), tl.full((), 6.0, tl.float32)))
        block_scale = _div_with_reciprocal(a6, g + tl.zeros_like(block_amax), inv_g)
    else:  # a NaN, an infinity or a tiny tensor amax: the divisions themselves
        block_scale = tl.math.div_rn(tl.math.div_rn(block_amax, six), g + tl.zeros_like(block_amax))
    block_scale = _to_fp8(tl.maximum(block_scale, 2.0**-6, propagate_nan=tl.PropagateNan.ALL), False)
    scale_f32 = block_scale.to(tl.float32)
    reciprocal = tl.math.div_rn(inv_g + tl.zeros_like(block_amax), scale_f32)
    v = xb * reciprocal
    code, magnitude = _e2m1(v)
    sign = v.to(tl.int32, bitcast=True) & -0x80000000  # as a bit: Triton's unary minus is 0 - x, +0.0 for 0.0
    value = (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return code, block_scale, value * (g * scale_f32)


@triton.jit
def _div_with_reciprocal(a, b, y):
    """div_rn(a, b) from y = div_rn(1, b): RN(a y) corrected by one FMA (Markstein), where the
    quotient is a normal number: the GPU test checks it against div_rn for every fp32 mantissa
    of a over 6 and over each E4M3 mantissa, and for random pairs."""
    q = a * y
    return tl.fma(tl.fma(0.0 - q, b, a), y + tl.zeros_like(a), q)


@triton.jit
def _e2m1(v):
    """fp32 v -> (E2M1 code 0..15 of clamp(v, -6, 6), bit 3 the sign of v; its magnitude 0, .5, 1,
    1.5, 2, 3, 4 or 6), rounded to nearest even; NaN -> code 0 (with NaN's sign bit), magnitude 0.

    Work on the FMA pipe rather than the ALU pipe (half its rate on Hopper), which the codes
    kernel's earlier compare/shift/select arithmetic kept busy: clamping and rounding in fp32,
    shifts as the high words of products (IMAD.HI)."""
    # An eighth of |v| saturated to [0, 1] (NaN -> 0), then at most 6/8. Exact: a product by 2^-3
    # rounds only far below E2M1's first midpoint. ptxas does not fold min/max into the product.
    saturated = tl.inline_asm_elementwise(
        "{ .reg .f32 a; abs.f32 a, $1; mul.sat.f32 $0, a, 0f3E000000; }", "=f,f", [v],
        dtype=tl.float32, is_pure=True, pack=1,
    )
    m = tl.minimum(saturated, 0.75)
    # Round m at E2M1's step, half its binade's lowest power of two (1/16 below 1/8): in m + c with
    # c = 2^22 times that power (at least 2^19), one fp32 ulp is that step, so the sum rounds
    # m to nearest even and subtracting c back is exact. A carry moves up a binade (E2M1's 1.75 -> 2).
    binade = m.to(tl.int32, bitcast=True) & 0x7F800000
    c = tl.maximum(binade.to(tl.float32, bitcast=True) * 4194304.0, 524288.0)  # 2^22 times, at least 2^19
    eighth = (m + c) - c
    # Times 2^-123, an E2M1 value / 8 lands where fp32's exponent field counts E2M1's exponent
    # (1.0 -> 2^-126, the smallest normal; 0.5 -> the subnormal 2^-127): its bits are the code << 22.
    code = tl.umulhi((eighth * 2.0**-123).to(tl.int32, bitcast=True), 1 << 10)
    sign = tl.umulhi(v.to(tl.int32, bitcast=True), 2)
    return sign * 8 + code, eighth * 8.0


@triton.jit
def _nvfp4_modelopt(xb, g, AXIS: tl.constexpr):
    """ModelOpt's NVFP4 fake quant of 16-blocks along AXIS with global scale g: the dequantized
    values, bit for bit its fp4_fake_quant_block. Its two divisions are Triton's fp32 `/`
    (div.full.f32, within 2 ulp), kept as they are: nvfp4.py's reference divides exactly."""
    block_amax = _abs_max(xb, AXIS)
    scale = block_amax / (g * 6.0)
    scale = _to_fp8(scale, False).to(tl.float32) * g  # its min(scale, 448), then the cast
    scale = tl.where(scale >= 1e-5, scale, 1.0)
    magnitude = _e2m1(tl.abs(xb) / scale)[1] * scale
    return tl.where(xb >= 0, magnitude, 0.0 - magnitude)


@triton.jit
def _modelopt_global_scale(amax_ptr):
    """nvfp4.modelopt_global_scale: amax times fp32(1/2688), 1e-12 where not positive."""
    g = _load_amax(amax_ptr) * MODELOPT_INV_GLOBAL
    return tl.where(g > 0.0, g, 1e-12)


@triton.jit
def _load_amax(amax_ptr):
    """The tensor's amax: fp32 bits as one int32 (what _amax_kernel writes, or a given amax)."""
    return tl.load(amax_ptr).to(tl.float32, bitcast=True)


@triton.jit
def _global_decode(amax_ptr):
    """nvfp4.global_scale_from_amax: amax / 2688, or 1 for an all-zero tensor."""
    amax = _load_amax(amax_ptr)
    return tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, tl.full((), 2688.0, tl.float32)))


@triton.jit
def _tile_rows_cols(tile, n_tiles_k, BR: tl.constexpr, BK: tl.constexpr):
    """Row and column indices of tile number `tile` ([BR, BK] tiles, n_tiles_k of them per row)."""
    rows = (tile // n_tiles_k) * BR + tl.arange(0, BR)[:, None]
    cols = (tile % n_tiles_k) * BK + tl.arange(0, BK)[None, :]
    return rows, cols


@triton.jit
def _program_abs_max_bits(x_ptr, R, K, sxr, sxk, n_tiles_k, n_tiles, BR: tl.constexpr, BK: tl.constexpr):
    """max |x| over this program's tiles (program, program + programs, ...) as int32 bits: |x|'s
    bits order as its values, and a NaN's bits above every number's."""
    acc = tl.zeros((BR, BK), tl.int32)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows, cols = _tile_rows_cols(tile, n_tiles_k, BR, BK)
        mask = (rows < R) & (cols < K)
        x = tl.load(x_ptr + rows * sxr + cols * sxk, mask=mask, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x).to(tl.int32, bitcast=True))
    return tl.max(tl.max(acc, axis=1), axis=0)


@triton.jit
def _amax_kernel(x_ptr, out_ptr, counter_ptr, R, K, sxr, sxk, n_tiles_k, n_tiles, BR: tl.constexpr, BK: tl.constexpr):
    """out[0] = max |x| as int32 bits (NaN's bits order highest), for the quantizers to load as one value.

    Each program takes the max over its [BR, BK] tiles program, program + programs, ... into
    out[1 + program]; the last program to finish (counted on counter_ptr, which it sets back to 0
    for the next launch) reduces those. One launch: not atomic maxima into a zero-filled out
    (a fill launch per quantized tensor), nor the partials left for every quantizer program to
    reduce (2 KB from L2, a reduction and a barrier ahead of each program's work)."""
    tl.store(out_ptr + 1 + tl.program_id(0), _program_abs_max_bits(x_ptr, R, K, sxr, sxk, n_tiles_k, n_tiles, BR, BK))
    # The store above happens before the count (the barrier, then a release); the last program's
    # acquire makes every program's store visible to its loads, which skip L1 (.cg).
    tl.debug_barrier()
    finished = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if finished == tl.num_programs(0) - 1:
        offsets = tl.arange(0, MAX_PARTIALS)
        partials = tl.load(out_ptr + 1 + offsets, mask=offsets < tl.num_programs(0), other=0, cache_modifier=".cg")
        tl.store(out_ptr, tl.max(partials, axis=0))
        tl.store(counter_ptr, 0)


@triton.jit
def _fp8_multiplier(amax_bits, E5M2: tl.constexpr):
    """fp8_max / max(amax, 1e-12), in float64 then rounded to fp32 (amax given as its fp32 bits)."""
    if E5M2:
        fmax: tl.constexpr = 57344.0
    else:
        fmax: tl.constexpr = 448.0
    amax64 = amax_bits.to(tl.float32, bitcast=True).to(tl.float64)
    # The epsilon as an fp64 tensor: a Python float literal would be rounded to fp32 first.
    amax64 = tl.maximum(amax64, tl.full((), 1e-12, tl.float64), propagate_nan=tl.PropagateNan.ALL)
    # fp64 `/` is IEEE div.rn.f64 in Triton (only the fp32 `/` is approximate).
    return (fmax / amax64).to(tl.float32)


@triton.jit
def _fp8_tile(
    x_ptr, data_ptr, data_t_ptr, fake_ptr, multiplier, rows, cols, R, K, sxr, sxk, sdr, sdk, sfr, sfk,
    E5M2: tl.constexpr, WRITE_DATA: tl.constexpr, WRITE_T: tl.constexpr, WRITE_FAKE: tl.constexpr,
):
    """One tile of the per-tensor FP8 cast: data (strided), its transpose (contiguous [K, R]: the
    other major order cuBLASLt needs for dgrad and wgrad), the dequantized tensor. Returns the
    tile as read, in fp32 (0 outside x)."""
    mask = (rows < R) & (cols < K)
    x = tl.load(x_ptr + rows * sxr + cols * sxk, mask=mask, other=0.0).to(tl.float32)
    data = _to_fp8(x * multiplier, E5M2)
    if WRITE_DATA:
        tl.store(data_ptr + rows * sdr + cols * sdk, data, mask=mask)
    if WRITE_T:
        # The same tile at transposed addresses: Triton stages it through shared memory. With
        # another store beside it this needs ptxas >= 13 (toolchain.py).
        tl.store(data_t_ptr + cols * R + rows, data, mask=mask)
    if WRITE_FAKE:
        fake = tl.math.div_rn(data.to(tl.float32), multiplier + tl.zeros_like(x))
        tl.store(fake_ptr + rows * sfr + cols * sfk, fake.to(fake_ptr.dtype.element_ty), mask=mask)
    return x


@triton.jit
def _fp8_kernel(
    x_ptr, amax_ptr, data_ptr, data_t_ptr, fake_ptr, scale_ptr, record_ptr, R, K, sxr, sxk, sdr, sdk, sfr, sfk,
    E5M2: tl.constexpr, WRITE_DATA: tl.constexpr, WRITE_T: tl.constexpr, WRITE_FAKE: tl.constexpr,
    WRITE_SCALE: tl.constexpr, RECORD_AMAX: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    """Per-tensor FP8 cast of one tile per program with the multiplier of a given amax (from
    _amax_kernel, or a delayed-scaling history); also the dequantization scale 1/multiplier.
    RECORD_AMAX: raises the fp32 whose int32 bits record_ptr points at to max |x| (delayed scaling's amax of this
    tensor, for later steps) in the same read of x."""
    multiplier = _fp8_multiplier(tl.load(amax_ptr), E5M2)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    cols = tl.program_id(1) * BK + tl.arange(0, BK)[None, :]
    x = _fp8_tile(x_ptr, data_ptr, data_t_ptr, fake_ptr, multiplier, rows, cols, R, K, sxr, sxk, sdr, sdk, sfr, sfk,
                  E5M2, WRITE_DATA, WRITE_T, WRITE_FAKE)
    if RECORD_AMAX:
        # |x|'s bits are non-negative int32s ordered as the values (a NaN's above every number's).
        bits = tl.max(tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis=1), axis=0)
        tl.atomic_max(record_ptr, bits, sem="relaxed", scope="gpu")
    if WRITE_SCALE and (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(scale_ptr, (1.0 / multiplier.to(tl.float64)).to(tl.float32))


@triton.jit
def _fp8_one_launch_kernel(
    x_ptr, scratch_ptr, data_ptr, data_t_ptr, fake_ptr, scale_ptr, R, K, sxr, sxk, sdr, sdk, sfr, sfk,
    n_tiles_k, n_tiles,
    E5M2: tl.constexpr, WRITE_DATA: tl.constexpr, WRITE_T: tl.constexpr, WRITE_FAKE: tl.constexpr,
    WRITE_SCALE: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    """Current scaling in one launch: _amax_kernel's maximum, then _fp8_kernel's cast, each
    program over the tiles program, program + programs, ... with a grid-wide barrier between.

    Every program must be resident at once (ops.py launches a few per SM, far under what one SM
    holds). scratch: [arrived, departed, amax bits], all 0 between launches: the last program to
    leave sets them back, so a CUDA graph can replay the launch."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    # |x|'s bits are non-negative int32s, ordered as the values: an integer atomic max reduces them.
    tl.atomic_max(scratch_ptr + 2, _program_abs_max_bits(x_ptr, R, K, sxr, sxk, n_tiles_k, n_tiles, BR, BK),
                  sem="relaxed", scope="gpu")
    # The release orders the max before the count; the acquire below makes every program's max
    # visible to the load that follows it.
    arrived = tl.atomic_add(scratch_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < programs:
        arrived = tl.atomic_add(scratch_ptr, 0, sem="acquire", scope="gpu")
    amax_bits = tl.load(scratch_ptr + 2, cache_modifier=".cg")
    multiplier = _fp8_multiplier(amax_bits, E5M2)
    for tile in range(program, n_tiles, programs):
        rows, cols = _tile_rows_cols(tile, n_tiles_k, BR, BK)
        _fp8_tile(x_ptr, data_ptr, data_t_ptr, fake_ptr, multiplier, rows, cols, R, K, sxr, sxk, sdr, sdk, sfr,
                  sfk, E5M2, WRITE_DATA, WRITE_T, WRITE_FAKE)
    if WRITE_SCALE and program == 0:
        tl.store(scale_ptr, (1.0 / multiplier.to(tl.float64)).to(tl.float32))
    departed = tl.atomic_add(scratch_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if departed == programs - 1:  # every program has read the amax: all goes back to 0
        tl.store(scratch_ptr, 0)
        tl.store(scratch_ptr + 1, 0)
        tl.store(scratch_ptr + 2, 0)


@triton.jit
def _block_kernel(
    x_ptr, amax_ptr, row_fake_ptr, col_fake_ptr, data_ptr, scale_ptr, g_ptr,
    R, K, sxr, sxk, sfr, sfk, scr, sck, sdr, sdk, ssr, ssk, n_scale_cols,
    ROW: tl.constexpr, COL: tl.constexpr, FLOOR: tl.constexpr,
    WRITE_ROW_FAKE: tl.constexpr, WRITE_ROW_Q: tl.constexpr, COLUMN_MAJOR: tl.constexpr, K_FASTEST: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr,
):
    """One read of a [BR, BK] tile of x; up to two quantizations of it:
    ROW (MX_E4M3 / MX_E5M2 / NVFP4 / NVFP4_MODELOPT) in blocks along K, writing the dequantized
    tile and/or the quantized data (fp8 data or uint8 E2M1 codes, strided [R, K]) with its
    block scales (strided; and NVFP4's global decode scale g);
    COL (MX_E4M3 / MX_E5M2) in 32-blocks along R (BR a multiple of 32), writing the dequantized tile.

    K_FASTEST: the grid is (K tiles, R tiles), so programs launched one after another cover one
    band of rows along K rather than one column of tiles down R: each row's block scales (a few
    bytes per program) are then written whole while they sit in L2, not in partial 32-byte sectors
    that reach DRAM apart (row-major MXFP8 data and scales of a 151936x4096 tensor on an H200:
    0.661 ms with R fastest, 0.444 ms with K fastest, the column-wise kernel's 0.431 ms)."""
    if K_FASTEST:
        pid_r, pid_k = tl.program_id(1), tl.program_id(0)
    else:
        pid_r, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)[:, None]
    cols = pid_k * BK + tl.arange(0, BK)[None, :]
    mask = (rows < R) & (cols < K)
    x_ptrs = x_ptr + rows * sxr + cols * sxk
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ROW != 0:
        if ROW == 4:  # fake quant only: no data, no scales
            xb = tl.reshape(x, (BR, BK // 16, 16))
            fake = _nvfp4_modelopt(xb, _modelopt_global_scale(amax_ptr), 2)
            nblk: tl.constexpr = BK // 16
        elif ROW == 3:
            xb = tl.reshape(x, (BR, BK // 16, 16))
            data, scale, fake = _nvfp4(xb, _global_decode(amax_ptr), 2)
            nblk: tl.constexpr = BK // 16
        else:
            xb = tl.reshape(x, (BR, BK // 32, 32))
            data, scale, fake = _mx(xb, 2, ROW == 2, FLOOR)
            nblk: tl.constexpr = BK // 32
        if WRITE_ROW_FAKE:
            fake2 = tl.reshape(fake, (BR, BK))
            tl.store(row_fake_ptr + rows * sfr + cols * sfk, fake2.to(row_fake_ptr.dtype.element_ty), mask=mask)
        if WRITE_ROW_Q:
            data2 = tl.reshape(data, (BR, BK))
            data_offsets = rows * sdr + cols * sdk
            scols = pid_k * nblk + tl.arange(0, nblk)[None, :]
            smask = (rows < R) & (scols < n_scale_cols)
            scale_offsets = rows * ssr + scols * ssk
            if COLUMN_MAJOR:
                # Runs of 8 rows per thread, as x's loads: the compiler would vectorize the one-byte
                # data stores 16 rows at a time and give the whole kernel that layout, with twice
                # the block scales per thread.
                data_offsets = tl.max_contiguous(data_offsets, [8, 1])
            tl.store(data_ptr + data_offsets, data2.to(data_ptr.dtype.element_ty), mask=mask)
            scale2 = tl.reshape(scale, (BR, nblk))
            tl.store(scale_ptr + scale_offsets, scale2.to(scale_ptr.dtype.element_ty), mask=smask)
            if ROW == 3 and (pid_r == 0) & (pid_k == 0):
                tl.store(g_ptr, _global_decode(amax_ptr))
    if COL != 0:
        if ROW != 0:
            # The tile again (from L2) rather than x kept live through the row pass: fewer
            # registers per thread, more programs per SM.
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        xc = tl.reshape(x, (BR // 32, 32, BK))
        _, _, cfake = _mx(xc, 1, COL == 2, FLOOR)
        cfake2 = tl.reshape(cfake, (BR, BK))
        tl.store(col_fake_ptr + rows * scr + cols * sck, cfake2.to(col_fake_ptr.dtype.element_ty), mask=mask)
