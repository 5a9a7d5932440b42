"""Triton sketch kernel: out[B, k] (+)= x[B, p] @ P[row_offset:row_offset + p, :k].

One program owns a tile of BLOCK_B rows of x, one 128-column block of P (four 32-column
sub-blocks j, matching the spec's column c = 128 blk + 32 j + l) and a slice of the p axis.
Per step of BLOCK_P rows it loads the x tile, generates the [BLOCK_P, 32] tiles of P for the four
sub-blocks with Philox (tl.philox, checked against our NumPy oracle in the tests) and
accumulates four tl.dot products in float32. P tiles are generated unscaled (+-1 or N(0, 1)) and
the accumulators are multiplied by 1/sqrt(k) at the end.

Precision: float32 x uses IEEE float32 dot products (no TF32). float16 / bfloat16 x use tensor
cores: Rademacher tiles are exact in either format; Gaussian tiles are split into 2 (float16) or
3 (bfloat16) terms whose sum carries float32 precision.

The p axis is split into slices (``sketch.run_in_p_slices``) whose partial sums are added in a
fixed order, so results never depend on the GPU.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from .philox import STREAM_GAUSSIAN, STREAM_RADEMACHER

@triton.jit
def _box_muller(wu, wa):
    """Float32 Box-Muller of Philox words: (sqrt(-2 ln u) cos t, sqrt(-2 ln u) sin t)."""
    u = (wu >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08
    ubits = u.to(tl.int32, bitcast=True)
    e = (ubits >> 23) - 127
    m = ((ubits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.3333333333333333
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    f = m - 1.0
    r = 0.13724440336227417
    r = r * f - 0.15393517911434174
    r = r * f + 0.14060916006565094
    r = r * f - 0.16414666175842285
    r = r * f + 0.20006904006004333
    r = r * f - 0.2500792443752289
    r = r * f + 0.33333277702331543
    r = r * f - 0.49999934434890747
    ef = e.to(tl.float32)
    lnu = ef * 0.693359375 + (ef * -2.12194440e-4 + (f + f * f * r))
    radius = tl.sqrt_rn(lnu * -2.0)
    q = wa >> 30
    fa = ((wa >> 7) & 0x7FFFFF).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08
    upper = fa > 0.5
    h = tl.where(upper, 1.0 - fa, fa)
    h2 = h * h
    s = -0.004603915847837925
    s = s * h2 + 0.07968097180128098
    s = s * h2 - 0.6459635496139526
    s = s * h2 + 1.5707963705062866
    s = s * h
    c = -0.020411554723978043
    c = c * h2 + 0.25360044836997986
    c = c * h2 - 1.2336972951889038
    c = c * h2 + 1.0
    swap = upper ^ ((q & 1) == 1)
    cs = tl.where(swap, s, c)
    sn = tl.where(swap, c, s)
    cs = tl.where(((q ^ (q >> 1)) & 1) == 1, -cs, cs)
    sn = tl.where((q >> 1) == 1, -sn, sn)
    return radius * cs, radius * sn


@triton.jit
def _dot_acc(acc, xt, z, X_DTYPE: tl.constexpr, EXACT_Z: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + xt @ z with float32 accumulation; z (float32 values) kept to float32 precision.

    The Triton interpreter multiplies bfloat16 operands wrongly, so there bfloat16 tiles are
    widened to float32 (exact); on a GPU they take the tensor-core path (checked on first use).
    """
    if X_DTYPE == 0 or (X_DTYPE == 1 and INTERPRET):
        return acc + tl.dot(xt.to(tl.float32), z, input_precision="ieee")
    if X_DTYPE == 1:
        zh = z.to(tl.bfloat16)
        acc = acc + tl.dot(xt, zh)
        if not EXACT_Z:
            r1 = z - zh.to(tl.float32)
            zm = r1.to(tl.bfloat16)
            acc = acc + tl.dot(xt, zm)
            acc = acc + tl.dot(xt, (r1 - zm.to(tl.float32)).to(tl.bfloat16))
        return acc
    zh = z.to(tl.float16)
    acc = acc + tl.dot(xt, zh)
    if not EXACT_Z:
        acc = acc + tl.dot(xt, (z - zh.to(tl.float32)).to(tl.float16))
    return acc


@triton.jit
def _sketch_kernel(x_ptr, out_ptr, B, p, k, stride_xb, stride_os, stride_ob, row_offset,
                   slice_rows, seed, scale, X_DTYPE: tl.constexpr, GAUSSIAN: tl.constexpr,
                   ACCUMULATE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
                   INTERPRET: tl.constexpr):
    pid_b = tl.program_id(0)
    blk = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    lanes = tl.arange(0, 32)
    acc0 = tl.zeros((BLOCK_B, 32), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_B, 32), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, 32), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_B, 32), dtype=tl.float32)
    p_start = pid_s.to(tl.int64) * slice_rows
    p_end = tl.minimum(p_start + slice_rows, p)
    for p0 in range(p_start, p_end, BLOCK_P):
        r = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        xt = tl.load(x_ptr + b[:, None].to(tl.int64) * stride_xb + r[None, :],
                     mask=(b[:, None] < B) & (r[None, :] < p_end), other=0.0)
        grow = row_offset + r
        r_lo = (grow & 0xFFFFFFFF).to(tl.uint32)
        r_hi = (grow >> 32).to(tl.uint32)
        if GAUSSIAN:
            zero = tl.zeros((BLOCK_P, 32), dtype=tl.uint32)
            ctr = (blk * 32 + lanes).to(tl.uint32)
            w0, w1, w2, w3 = tl.philox(seed, r_lo[:, None] + zero, r_hi[:, None] + zero,
                                       ctr[None, :] + zero, zero + STREAM_GAUSSIAN)
            z0, z1 = _box_muller(w0, w1)
            z2, z3 = _box_muller(w2, w3)
            acc0 = _dot_acc(acc0, xt, z0, X_DTYPE, False, INTERPRET)
            acc1 = _dot_acc(acc1, xt, z1, X_DTYPE, False, INTERPRET)
            acc2 = _dot_acc(acc2, xt, z2, X_DTYPE, False, INTERPRET)
            acc3 = _dot_acc(acc3, xt, z3, X_DTYPE, False, INTERPRET)
        else:
            zero = tl.zeros((BLOCK_P,), dtype=tl.uint32)
            w0, w1, w2, w3 = tl.philox(seed, r_lo, r_hi, zero + blk.to(tl.uint32),
                                       zero + STREAM_RADEMACHER)
            sh = lanes[None, :].to(tl.uint32)
            acc0 = _dot_acc(acc0, xt, tl.where(((w0[:, None] >> sh) & 1) == 1, -1.0, 1.0), X_DTYPE, True, INTERPRET)
            acc1 = _dot_acc(acc1, xt, tl.where(((w1[:, None] >> sh) & 1) == 1, -1.0, 1.0), X_DTYPE, True, INTERPRET)
            acc2 = _dot_acc(acc2, xt, tl.where(((w2[:, None] >> sh) & 1) == 1, -1.0, 1.0), X_DTYPE, True, INTERPRET)
            acc3 = _dot_acc(acc3, xt, tl.where(((w3[:, None] >> sh) & 1) == 1, -1.0, 1.0), X_DTYPE, True, INTERPRET)
    base = out_ptr + pid_s.to(tl.int64) * stride_os + b[:, None].to(tl.int64) * stride_ob
    for j in tl.static_range(4):
        acc = acc0 if j == 0 else (acc1 if j == 1 else (acc2 if j == 2 else acc3))
        col = blk * 128 + j * 32 + lanes
        ptrs = base + col[None, :]
        mask = (b[:, None] < B) & (col[None, :] < k)
        val = acc * scale
        if ACCUMULATE:
            val += tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, val, mask=mask)


def sketch_triton(x, out, k, seed, kind, row_offset, accumulate, nonfinite=None):
    """Triton backend of ``attrkernels.sketch`` (see kernels/sketch.py for the contract)."""
    from .sketch import DTYPE_CODES, run_in_p_slices

    if x.stride(1) != 1:
        x = x.contiguous()
    B, p = x.shape
    block_b = 16 if B <= 16 else (32 if B <= 32 else 64)
    block_p = 32 if x.device.type == "cpu" else 64
    common = dict(X_DTYPE=DTYPE_CODES[x.dtype], GAUSSIAN=kind == "gaussian",
                  BLOCK_B=block_b, BLOCK_P=block_p, INTERPRET=x.device.type == "cpu")

    def launch(target, ld_slice, ld_row, slices, slice_rows, acc):
        grid = (triton.cdiv(B, block_b), triton.cdiv(k, 128), slices)
        _sketch_kernel[grid](x, target, B, p, k, x.stride(0), ld_slice, ld_row, row_offset,
                             slice_rows, seed, 1.0 / math.sqrt(k), ACCUMULATE=acc, **common)

    return run_in_p_slices(x, out, k, accumulate, launch)
