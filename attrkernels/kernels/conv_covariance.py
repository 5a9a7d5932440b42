"""Activation factor of a stride-1 convolution without unfolding its input.

For a Conv2d with kernel (kh, kw), zero padding (ph, pw), stride 1, dilation 1 and groups 1, the
unfolded input of example n at output position (i, j) is the patch
a_nij[(c, u, v)] = x_n[c, i + u - ph, j + v - pw] (zero outside the image), and the K-FAC
activation factor sums its outer products, A = sum_{n,i,j} a_nij a_nij^T ([C K, C K], K = kh kw,
in the order of ``weight.flatten(1)``). Through unfolding that is one GEMM of 2 N (C K)^2 FLOPs
(N = examples x output positions) on a K times larger copy of the input.

Block ((u, v), (u', v')) of A only depends on the shift D = (u' - u, v' - v) and on which rows
and columns of the input the kernel offset (u, v) reaches:

    A_(u,v),(u',v') = sum_n sum_{p in P(u), q in Q(v)} x_n[:, p, q] x_n[:, p + D_r, q + D_c]^T

with P(u) = [u - ph, u - ph + H_out) intersected with [0, H) (likewise Q(v)) and x zero outside.
So for each of the (2 kh - 1)(2 kw - 1) shifts, half of them by the symmetry
A_(k',k) = A_(k,k')^T, one GEMM of x with its shifted copy over all rows and columns (2 N C^2
FLOPs) gives the sum over the whole image, and inclusion-exclusion removes the few border rows
and columns outside P(u) x Q(v) (at most kh - 1 rows and kw - 1 columns on each side): exact,
and for a 3x3 kernel 13 GEMMs of C^2 instead of one of (9 C)^2, 6.2x fewer FLOPs, without
the 9x unfolded copy; for small C, several shifts are stacked into one GEMM of about 256
columns, which keeps it efficient. A bias adds the homogeneous coordinate (patch sums and the
count).
Conv1d is the case H = 1, kh = 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .kfac import DEFAULT_MEMORY

GEMM_COLUMNS = 256  # shifts are stacked until a GEMM has about this many columns


def supported(module: nn.Module) -> bool:
    """Whether ``conv_covariance`` applies: Conv1d/2d, stride 1, dilation 1, groups 1, zero padding
    given as integers (or "valid"), kernel larger than 1x1 (a 1x1 kernel gains nothing)."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.groups != 1 or module.padding_mode != "zeros":
        return False
    if any(s != 1 for s in module.stride) or any(d != 1 for d in module.dilation):
        return False
    if isinstance(module.padding, str) and module.padding != "valid":
        return False
    return max(module.kernel_size) > 1


def preferred(module: nn.Module, shape) -> bool:
    """Whether ``conv_covariance`` is the faster way for an input of ``shape`` [B, C, (H,) W]:
    ``supported`` and at least 64 positions: on smaller images the border corrections cover a
    large part of the image (half of it at 4x4) and cost more than the FLOPs the shifts save
    (``benchmarks/ekfac.py`` times both ways per size)."""
    return supported(module) and math.prod(shape[2:]) >= 64


def _padding(module) -> tuple:
    return (0,) * len(module.kernel_size) if module.padding == "valid" else tuple(module.padding)


def _excluded(pad: int, size: int, out_size: int, offset: int) -> list:
    """Input rows (or columns) in [0, size) that kernel offset ``offset`` does not reach."""
    start, stop = offset - pad, offset - pad + out_size
    return list(range(0, min(size, max(0, start)))) + list(range(max(0, min(size, stop)), size))


def conv_covariance(x: torch.Tensor, module: nn.Module, bias: bool = False, out: torch.Tensor | None = None,
                    memory_budget: int = DEFAULT_MEMORY) -> torch.Tensor:
    """out += sum over examples and output positions of a a^T, a the (homogeneous if ``bias``)
    unfolded patch of ``module`` (see ``supported``) on input x [B, C, (H,) W]; float32 [d, d].

    Examples are processed in chunks whose shifted copies fit in ``memory_budget`` bytes; in a
    chunk, groups of shifts are stacked so that their whole-image sums are one GEMM
    [C, n] x [n, group C] and their border sums three batched GEMMs.
    """
    if not supported(module):
        raise ValueError(f"conv_covariance needs a stride-1, dilation-1, groups-1 zero-padded "
                         f"convolution with a kernel larger than 1, got {module}")
    if x.ndim == 3:
        x = x.unsqueeze(2)
        (kw,), (pw,) = module.kernel_size, _padding(module)
        kh, ph = 1, 0
    else:
        (kh, kw), (ph, pw) = module.kernel_size, _padding(module)
    x = x.to(torch.float32)
    B, C, H, W = x.shape
    Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"input of spatial size {(H, W)} is smaller than the kernel {(kh, kw)} "
                         f"with padding {(ph, pw)}")
    K = kh * kw
    d = C * K + bias
    if out is None:
        out = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    elif out.shape != (d, d):
        raise ValueError(f"out must have shape {(d, d)}, got {tuple(out.shape)}")
    rows_out = [_excluded(ph, H, Ho, u) for u in range(kh)]
    cols_out = [_excluded(pw, W, Wo, v) for v in range(kw)]
    border_rows = sorted({p for r in rows_out for p in r})
    border_cols = sorted({q for c in cols_out for q in c})
    R, Q = len(border_rows), len(border_cols)
    # which border rows (columns) kernel row u (column v) does not reach: [kh, R], [kw, Q]
    miss_rows = x.new_tensor([[float(p in rows_out[u]) for p in border_rows] for u in range(kh)]).reshape(kh, R)
    miss_cols = x.new_tensor([[float(q in cols_out[v]) for q in border_cols] for v in range(kw)]).reshape(kw, Q)
    # shifts (dr, dc) with dr > 0, or dr = 0 and dc >= 0; the others are their transposes
    shifts = [(dr, dc) for dr in range(kh) for dc in range(-(kw - 1), kw) if dr > 0 or dc >= 0]
    S = len(shifts)

    def borders(t):
        """t [m, H, W, n] -> its border rows [R, m, W n], columns [Q, m, H n] and crossings [R Q, m, n]."""
        m, n = t.shape[0], t.shape[-1]
        return (t[:, border_rows].permute(1, 0, 2, 3).reshape(R, m, W * n),
                t[:, :, border_cols].permute(2, 0, 1, 3).reshape(Q, m, H * n),
                t[:, border_rows][:, :, border_cols].permute(1, 2, 0, 3).reshape(R * Q, m, n))

    def restricted(x0, x0_borders, other):
        """[kh, kw, C, m]: for every kernel offset (u, v), the sum over P(u) x Q(v) of x0 other^T
        (x0 [C, H, W, n], other [m, H, W, n]): the whole-image GEMM minus the unreached border rows
        and columns plus their crossings (inclusion-exclusion), the borders as batched GEMMs."""
        m = other.shape[0]
        full = x0.reshape(C, -1) @ other.reshape(m, -1).T
        rows, cols, cells = (torch.bmm(a, b.transpose(1, 2)) for a, b in zip(x0_borders, borders(other)))
        row_miss = (miss_rows @ rows.reshape(R, C * m)).reshape(kh, 1, C, m)
        col_miss = (miss_cols @ cols.reshape(Q, C * m)).reshape(1, kw, C, m)
        both = torch.einsum("ur,vq,rqx->uvx", miss_rows, miss_cols, cells.reshape(R, Q, C * m)).reshape(kh, kw, C, m)
        return full - row_miss - col_miss + both

    sums = torch.zeros(kh, kw, C, S * C, dtype=torch.float32, device=x.device)
    patch_sums = torch.zeros(kh, kw, C, dtype=torch.float32, device=x.device)
    group = max(1, min(S, GEMM_COLUMNS // C))  # shifts per GEMM
    step = max(1, min(B, memory_budget // (4 * C * (H + 2 * kh) * (W + 2 * kw) * (group + 2))))
    for b0 in range(0, B, step):
        x0 = x[b0:b0 + step].permute(1, 2, 3, 0).contiguous()  # [C, H, W, n]: a row p is a [C, W n] matrix
        padded = torch.nn.functional.pad(x0, (0, 0, kw - 1, kw - 1, kh - 1, kh - 1))
        x0_borders = borders(x0)
        for g0 in range(0, S, group):
            stacked = torch.cat([padded[:, kh - 1 + dr:kh - 1 + dr + H, kw - 1 + dc:kw - 1 + dc + W]
                                 for dr, dc in shifts[g0:g0 + group]])  # [group C, H, W, n]
            sums[..., g0 * C:g0 * C + stacked.shape[0]] += restricted(x0, x0_borders, stacked)
        if bias:
            patch_sums += restricted(x0, x0_borders, x0.new_ones(1, H, W, x0.shape[-1]))[..., 0]
    sums = sums.reshape(kh, kw, C, S, C)
    blocks = torch.zeros(K, K, C, C, dtype=torch.float32, device=x.device)  # [k, k', c, c']
    for i, (dr, dc) in enumerate(shifts):
        us = [u for u in range(kh - dr) for v in range(max(0, -dc), min(kw, kw - dc))]
        vs = [v for u in range(kh - dr) for v in range(max(0, -dc), min(kw, kw - dc))]
        k = torch.tensor([u * kw + v for u, v in zip(us, vs)], device=x.device)
        k2 = k + dr * kw + dc
        values = sums[us, vs, :, i]  # [pairs, C, C]
        blocks.index_put_((k, k2), values, accumulate=True)
        if dr or dc:
            blocks.index_put_((k2, k), values.transpose(1, 2), accumulate=True)
    out[:C * K, :C * K] += blocks.permute(2, 0, 3, 1).reshape(C * K, C * K)
    if bias:
        s = patch_sums.reshape(K, C).T.reshape(-1)  # in the (c, u, v) order of the unfolded input
        out[:C * K, -1] += s
        out[-1, :C * K] += s
        out[-1, -1] += B * Ho * Wo
    return out
