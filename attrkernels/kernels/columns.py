"""Rows gathered into columns: parts [c_i, ...] (n rows in all) -> out [P, n] contiguous, P the
size of one row, out[p, j] = row j of the stacked parts at flat position p.

The EK-FAC scores multiply each training gradient's blocks with the queries' rows as contiguous
columns ([d_out d_in, n]: GPT-2-small's c_fc against 24 queries, 0.08 s a batch of 8 against
0.13 s on the transposed [n, d_out d_in] view), and the queries arrive as chunks of a few
examples. Copying each chunk into its few columns of out rewrote every cache line of out once
per chunk; the C++ kernel (``attrkernels._C.gather_columns``) fills out a [256, n] tile at a
time from all the parts, writing each line once: GPT-2-small's 24 queries (8.2 GB) took 15.0 -
15.8 s to stack that way on one core and take 7.4 - 8.4 s (same process, taking turns). Without
the extension, or for parts that are not float32 contiguous CPU tensors, the column-by-column
copy runs instead (same result).
"""
from __future__ import annotations

import torch


def gather_columns(parts: list, n: int) -> torch.Tensor:
    """[P, n] contiguous, in the parts' dtype, column j = row j of ``torch.cat(parts)`` flattened;
    ``parts``: tensors [c_i, ...] of one dtype, device and trailing shape, sum c_i = n."""
    if not parts:
        raise ValueError("parts must hold at least one tensor")
    shape, dtype, device = parts[0].shape[1:], parts[0].dtype, parts[0].device
    for t in parts:
        if t.shape[1:] != shape or t.dtype != dtype or t.device != device:
            raise ValueError(f"parts must share trailing shape, dtype and device; got {tuple(t.shape)} {t.dtype} "
                             f"on {t.device} after {tuple(shape)} {dtype} on {device}")
    if sum(t.shape[0] for t in parts) != n:
        raise ValueError(f"parts hold {sum(t.shape[0] for t in parts)} rows, n is {n}")
    P = shape.numel()
    out = torch.empty(P, n, dtype=dtype, device=device)
    if _native(parts, dtype, device):
        from .. import _C

        kept = [t.contiguous() for t in parts]  # already contiguous (checked): no copy
        _C.gather_columns(out.data_ptr(), P, n, [t.data_ptr() for t in kept], [t.shape[0] for t in kept],
                          torch.get_num_threads())
        return out
    j = 0
    for t in parts:
        out[:, j:j + t.shape[0]] = t.reshape(t.shape[0], -1).T
        j += t.shape[0]
    return out


def _native(parts: list, dtype: torch.dtype, device: torch.device) -> bool:
    if dtype != torch.float32 or device.type != "cpu" or not all(t.is_contiguous() for t in parts):
        return False
    try:
        from .. import _C
    except ImportError:
        return False
    return hasattr(_C, "gather_columns")
