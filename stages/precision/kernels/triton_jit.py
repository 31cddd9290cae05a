"""Triton kernels for the quantizers of `fp8.py`, `mx.py` and `nvfp4.py`, bit for bit.

Each arithmetic step mirrors the PyTorch reference in the same order and rounding:
divisions are `div_rn` (IEEE; Triton's `/` on fp32 is an approximate division), the casts
to FP8 round to nearest even after an explicit NaN-propagating clamp, and block amaxes are
taken as integers on the fp32 bits of |x| so that a NaN wins, as `torch.amax` does.

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
# Most per-program maxima _amax_partials_kernel leaves for a quantizer to reduce (a power of 2).
MAX_PARTIALS = tl.constexpr(512)
# fp32(1/2688): ModelOpt divides its amax by 6 * 448 on CUDA, which multiplies by this reciprocal.
MODELOPT_INV_GLOBAL = tl.constexpr(1.0 / 2688.0)


@triton.jit
def _abs_max(xb, AXIS: tl.constexpr):
    """max |x| along AXIS (kept), NaN-propagating: non-negative floats order as their bits."""
    bits = tl.abs(xb).to(tl.int32, bitcast=True)
    return tl.max(bits, axis=AXIS, keep_dims=True).to(tl.float32, bitcast=True)


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
    clamped = tl.clamp(scaled, -fmax, fmax, propagate_nan=tl.PropagateNan.ALL)
    if E5M2:
        data = clamped.to(tl.float8e5, fp_downcast_rounding="rtne")
    else:
        data = clamped.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    decode = tl.where(biased == 255, float("nan"), _pow2(tl.minimum(biased, 254) - 127))
    return data, biased, data.to(tl.float32) * decode


@triton.jit
def _nvfp4(xb, g, AXIS: tl.constexpr):
    """NVFP4 of 16-blocks along AXIS with global decode scale g: (codes, e4m3 scales, dequantized)."""
    block_amax = _abs_max(xb, AXIS)
    six = tl.full(block_amax.shape, 6.0, tl.float32)
    block_scale = tl.math.div_rn(tl.math.div_rn(block_amax, six), g + tl.zeros_like(block_amax))
    block_scale = tl.clamp(block_scale, 2.0**-6, 448.0, propagate_nan=tl.PropagateNan.ALL)
    block_scale = block_scale.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    scale_f32 = block_scale.to(tl.float32)
    inv_g = tl.math.div_rn(tl.full((), 1.0, tl.float32), g)
    reciprocal = tl.math.div_rn(inv_g + tl.zeros_like(block_amax), scale_f32)
    v = tl.clamp(xb * reciprocal, -6.0, 6.0, propagate_nan=tl.PropagateNan.ALL)
    # E2M1 round to nearest even (the thresholds of nvfp4._MIDPOINTS).
    value = _e2m1_magnitude(tl.abs(v))
    # Codes 0..7 of 0, .5, 1, 1.5, 2, 3, 4, 6.
    code = tl.where(value <= 2.0, value * 2.0, tl.where(value < 6.0, value + 2.0, 7.0)).to(tl.int32)
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    # The sign as a bit (Triton's unary minus is 0 - x, which would turn -0.0 into +0.0).
    value = (value.to(tl.int32, bitcast=True) | (sign << 31)).to(tl.float32, bitcast=True)
    return code | (sign << 3), block_scale, value * (g * scale_f32)


@triton.jit
def _e2m1_magnitude(mag):
    """|x| / scale in [0, 6] (or NaN) -> the nearest E2M1 magnitude, ties to even, NaN -> 0."""
    # The grid step is 0.5 below 2, 1 below 4, then 2, and rounding mag / step to an even
    # integer lands on the even code. rint(y) for 0 <= y <= 4: adding 2^23 leaves no fraction
    # bits, so the fp32 add rounds y to an integer, ties to even. Powers of two: both products exact.
    below_2, below_4 = mag < 2.0, mag < 4.0
    steps_per_unit = tl.where(below_2, 2.0, tl.where(below_4, 1.0, 0.5))
    step = tl.where(below_2, 0.5, tl.where(below_4, 1.0, 2.0))
    value = ((mag * steps_per_unit + 8388608.0) - 8388608.0) * step
    return tl.where(mag == mag, value, 0.0)  # NaN compares below every midpoint: code 0


@triton.jit
def _nvfp4_modelopt(xb, g, AXIS: tl.constexpr):
    """ModelOpt's NVFP4 fake quant of 16-blocks along AXIS with global scale g: the dequantized
    values, bit for bit its fp4_fake_quant_block. Its two divisions are Triton's fp32 `/`
    (div.full.f32, within 2 ulp), kept as they are: nvfp4.py's reference divides exactly."""
    block_amax = _abs_max(xb, AXIS)
    scale = block_amax / (g * 6.0)
    scale = tl.minimum(scale, 448.0, propagate_nan=tl.PropagateNan.ALL)
    scale = scale.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32) * g
    scale = tl.where(scale >= 1e-5, scale, 1.0)
    x_abs = tl.abs(xb)
    magnitude = _e2m1_magnitude(tl.minimum(x_abs / scale, 6.0, propagate_nan=tl.PropagateNan.ALL)) * scale
    return tl.where(xb >= 0, magnitude, 0.0 - magnitude)


@triton.jit
def _modelopt_global_scale(amax_ptr, n_amax):
    """nvfp4.modelopt_global_scale: amax times fp32(1/2688), 1e-12 where not positive."""
    g = _load_amax(amax_ptr, n_amax) * MODELOPT_INV_GLOBAL
    return tl.where(g > 0.0, g, 1e-12)


@triton.jit
def _load_amax(amax_ptr, n_amax):
    """The tensor's amax from n_amax int32 partial maxima (fp32 bits; NaN's bits order highest)."""
    offsets = tl.arange(0, MAX_PARTIALS)
    bits = tl.load(amax_ptr + offsets, mask=offsets < n_amax, other=0)
    return tl.max(bits, axis=0).to(tl.float32, bitcast=True)


@triton.jit
def _global_decode(amax_ptr, n_amax):
    """nvfp4.global_scale_from_amax: amax / 2688, or 1 for an all-zero tensor."""
    amax = _load_amax(amax_ptr, n_amax)
    return tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, tl.full((), 2688.0, tl.float32)))


@triton.jit
def _amax_partials_kernel(x_ptr, out_ptr, R, K, sxr, sxk, n_tiles_k, n_tiles, BR: tl.constexpr, BK: tl.constexpr):
    """out[program] = max |x| (int32 bits) over the [BR, BK] tiles program, program + programs, ...

    Not one atomic maximum: that needs a zero-filled output launched first (a fill kernel and
    its launch per quantized tensor). Each quantizer program reduces the <= MAX_PARTIALS values
    itself (a few KB from L2); ops.amax reduces them with torch."""
    acc = tl.zeros((BR, BK), tl.int32)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = (tile // n_tiles_k) * BR + tl.arange(0, BR)[:, None]
        cols = (tile % n_tiles_k) * BK + tl.arange(0, BK)[None, :]
        mask = (rows < R) & (cols < K)
        x = tl.load(x_ptr + rows * sxr + cols * sxk, mask=mask, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x).to(tl.int32, bitcast=True))
    tl.store(out_ptr + tl.program_id(0), tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _fp8_kernel(
    x_ptr, amax_ptr, n_amax, data_ptr, data_t_ptr, fake_ptr, scale_ptr, R, K, sxr, sxk, sdr, sdk, sfr, sfk,
    E5M2: tl.constexpr, WRITE_DATA: tl.constexpr, WRITE_T: tl.constexpr, WRITE_FAKE: tl.constexpr,
    WRITE_SCALE: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    """Per-tensor FP8 cast with the multiplier fp8_max / max(amax, 1e-12) (float64, then fp32).

    Writes data (strided), its transpose (contiguous [K, R]: the other major order cuBLASLt
    needs for dgrad and wgrad), the dequantized tensor, and the dequantization scale 1/multiplier."""
    if E5M2:
        fmax: tl.constexpr = 57344.0
    else:
        fmax: tl.constexpr = 448.0
    amax64 = _load_amax(amax_ptr, n_amax).to(tl.float64)
    # The epsilon as an fp64 tensor: a Python float literal would be rounded to fp32 first.
    amax64 = tl.maximum(amax64, tl.full((), 1e-12, tl.float64), propagate_nan=tl.PropagateNan.ALL)
    # fp64 `/` is IEEE div.rn.f64 in Triton (only the fp32 `/` is approximate).
    multiplier = (fmax / amax64).to(tl.float32)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    cols = tl.program_id(1) * BK + tl.arange(0, BK)[None, :]
    mask = (rows < R) & (cols < K)
    x = tl.load(x_ptr + rows * sxr + cols * sxk, mask=mask, other=0.0).to(tl.float32)
    clamped = tl.clamp(x * multiplier, -fmax, fmax, propagate_nan=tl.PropagateNan.ALL)
    if E5M2:
        data = clamped.to(tl.float8e5, fp_downcast_rounding="rtne")
    else:
        data = clamped.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    if WRITE_DATA:
        tl.store(data_ptr + rows * sdr + cols * sdk, data, mask=mask)
    if WRITE_T:
        # The same tile at transposed addresses: Triton stages it through shared memory. With
        # another store beside it this needs ptxas >= 13 (toolchain.py).
        tl.store(data_t_ptr + cols * R + rows, data, mask=mask)
    if WRITE_SCALE and (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(scale_ptr, (1.0 / multiplier.to(tl.float64)).to(tl.float32))
    if WRITE_FAKE:
        fake = tl.math.div_rn(data.to(tl.float32), multiplier + tl.zeros_like(x))
        tl.store(fake_ptr + rows * sfr + cols * sfk, fake.to(fake_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_kernel(
    x_ptr, amax_ptr, n_amax, row_fake_ptr, col_fake_ptr, data_ptr, scale_ptr, g_ptr,
    R, K, sxr, sxk, sfr, sfk, scr, sck, n_scale_cols,
    ROW: tl.constexpr, COL: tl.constexpr, FLOOR: tl.constexpr,
    WRITE_ROW_FAKE: tl.constexpr, WRITE_ROW_Q: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    """One read of a [BR, BK] tile of x; up to two quantizations of it:
    ROW (MX_E4M3 / MX_E5M2 / NVFP4 / NVFP4_MODELOPT) in blocks along K, writing the dequantized
    tile and/or the quantized data (fp8 data or uint8 E2M1 codes, contiguous [R, K]) with its
    block scales (and NVFP4's global decode scale g);
    COL (MX_E4M3 / MX_E5M2) in 32-blocks along R (BR a multiple of 32), writing the dequantized tile."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    cols = tl.program_id(1) * BK + tl.arange(0, BK)[None, :]
    mask = (rows < R) & (cols < K)
    x = tl.load(x_ptr + rows * sxr + cols * sxk, mask=mask, other=0.0).to(tl.float32)
    if ROW != 0:
        if ROW == 4:  # fake quant only: no data, no scales
            xb = tl.reshape(x, (BR, BK // 16, 16))
            fake = _nvfp4_modelopt(xb, _modelopt_global_scale(amax_ptr, n_amax), 2)
            nblk: tl.constexpr = BK // 16
        elif ROW == 3:
            xb = tl.reshape(x, (BR, BK // 16, 16))
            data, scale, fake = _nvfp4(xb, _global_decode(amax_ptr, n_amax), 2)
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
            tl.store(data_ptr + rows * K + cols, data2.to(data_ptr.dtype.element_ty), mask=mask)
            srows = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
            scols = tl.program_id(1) * nblk + tl.arange(0, nblk)[None, :]
            smask = (srows < R) & (scols < n_scale_cols)
            scale2 = tl.reshape(scale, (BR, nblk))
            tl.store(scale_ptr + srows * n_scale_cols + scols, scale2.to(scale_ptr.dtype.element_ty), mask=smask)
            if ROW == 3 and (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                tl.store(g_ptr, _global_decode(amax_ptr, n_amax))
    if COL != 0:
        xc = tl.reshape(x, (BR // 32, 32, BK))
        _, _, cfake = _mx(xc, 1, COL == 2, FLOOR)
        cfake2 = tl.reshape(cfake, (BR, BK))
        tl.store(col_fake_ptr + rows * scr + cols * sck, cfake2.to(col_fake_ptr.dtype.element_ty), mask=mask)
