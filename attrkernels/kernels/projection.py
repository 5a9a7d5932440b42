"""The random projection P (p x k) shared by every backend: its definition and a plain generator.

P is a pure function of (seed, row, column). Columns come in blocks of 128; for row r and
column c let blk = c // 128, j = (c % 128) // 32 and l = c % 32. With Philox4x32-10 keyed by the
64-bit seed (see ``philox.py``):

* Rademacher: (w0, w1, w2, w3) = Philox(r_lo, r_hi, blk, "RADE");
  P[r, c] = (1 - 2 * bit l of w_j) / sqrt(k). One Philox call gives the 128 signs of a block.
* Gaussian: (w0, w1, w2, w3) = Philox(r_lo, r_hi, 32 * blk + l, "GAUS"). Word pairs
  (w0, w1) and (w2, w3) go through Box-Muller:
      u = ((w_even >> 9) + 1/2) / 2**23                  in (0, 1), exact in float32
      q = w_odd >> 30,  f = (((w_odd >> 7) & (2**23 - 1)) + 1/2) / 2**23
      theta = (pi / 2) * (q + f)
      z_even = sqrt(-2 ln u) cos(theta),  z_odd = sqrt(-2 ln u) sin(theta)
  P[r, c] = z_j / sqrt(k). The value here is computed in float64 and rounded once to float32;
  compiled backends compute it in float32 and agree to a few units in the last place.

Rows are 64-bit (the row of a parameter in the flattened gradient), so p may exceed 2**32.
E[P P^T] = I_p, hence E||x P||^2 = ||x||^2. Nothing depends on tiles, threads or devices.

``projection_rows`` materialises whole rows with NumPy or torch. It is the oracle of the tests
(NumPy) and the generator of the "torch" reference backend (any torch device).
"""
from __future__ import annotations

import math

import numpy as np

from .philox import MASK32, STREAM_GAUSSIAN, STREAM_RADEMACHER, philox4x32, split_seed

KINDS = ("rademacher", "gaussian")
BLOCK_COLS = 128
LANES = 32


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k >= 2**31:
        raise ValueError(f"k must be below 2**31, got {k}")
    return int(k)


class _Numpy:
    """The few array operations the generator needs, on NumPy (uint64 words, CPU)."""

    def __init__(self):
        self.float64 = np.float64

    def arange(self, start, stop):
        return np.arange(start, stop, dtype=np.uint64)

    def full(self, value):
        return np.uint64(value)

    def to_float64(self, a):
        return a.astype(np.float64)

    def to_float32(self, a):
        return a.astype(np.float32)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def stack(self, arrays, axis):
        return np.stack(arrays, axis=axis)

    def reshape(self, a, shape):
        return a.reshape(shape)

    log, sqrt, cos, sin = np.log, np.sqrt, np.cos, np.sin


class _Torch:
    """The same operations on torch (int64 words holding uint32 values) on a given device."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.float64 = torch.float64

    def arange(self, start, stop):
        return self.torch.arange(start, stop, dtype=self.torch.int64, device=self.device)

    def full(self, value):
        return self.torch.tensor(value, dtype=self.torch.int64, device=self.device)

    def to_float64(self, a):
        return a.to(self.torch.float64)

    def to_float32(self, a):
        return a.to(self.torch.float32)

    def where(self, cond, a, b):
        return self.torch.where(cond, a, b)

    def stack(self, arrays, axis):
        return self.torch.stack(arrays, dim=axis)

    def reshape(self, a, shape):
        return a.reshape(shape)

    def log(self, a):
        return self.torch.log(a)

    def sqrt(self, a):
        return self.torch.sqrt(a)

    def cos(self, a):
        return self.torch.cos(a)

    def sin(self, a):
        return self.torch.sin(a)


def _namespace(device):
    return _Numpy() if device is None else _Torch(device)


def _rademacher_rows(xp, rows, nblk, seed, scale):
    """[n, nblk * 128] signs of the given rows (uint words -> +-scale)."""
    blk = xp.arange(0, nblk)
    r = rows[:, None]
    words = philox4x32(r & MASK32, r >> 32, blk[None, :], xp.full(STREAM_RADEMACHER), seed)
    lane = xp.arange(0, LANES)
    bits = [(w[:, :, None] >> lane) & 1 for w in words]  # 4 x [n, nblk, 32]
    bits = xp.stack(bits, axis=2)  # [n, nblk, 4, 32]: column 128 blk + 32 j + l
    signs = 1.0 - 2.0 * xp.to_float64(bits)
    return xp.reshape(signs * scale, (rows.shape[0], nblk * BLOCK_COLS))


def _gaussian_rows(xp, rows, nblk, seed, scale):
    """[n, nblk * 128] Box-Muller normals of the given rows, times ``scale``."""
    ctr = xp.arange(0, nblk * LANES)  # 32 blk + l
    r = rows[:, None]
    w0, w1, w2, w3 = philox4x32(r & MASK32, r >> 32, ctr[None, :], xp.full(STREAM_GAUSSIAN), seed)
    out = []
    for wu, wa in ((w0, w1), (w2, w3)):
        u = (xp.to_float64(wu >> 9) + 0.5) * 2.0**-23
        q = xp.to_float64(wa >> 30)
        f = (xp.to_float64((wa >> 7) & (2**23 - 1)) + 0.5) * 2.0**-23
        theta = (math.pi / 2) * (q + f)
        radius = xp.sqrt(-2.0 * xp.log(u)) * scale
        out += [radius * xp.cos(theta), radius * xp.sin(theta)]
    z = xp.stack(out, axis=1)  # [n, 4, nblk * 32] -> column 128 blk + 32 j + l
    z = xp.reshape(z, (rows.shape[0], 4, nblk, LANES))
    z = xp.stack([z[:, j] for j in range(4)], axis=2)  # [n, nblk, 4, 32]
    return xp.reshape(z, (rows.shape[0], nblk * BLOCK_COLS))


def projection_rows(row_start: int, nrows: int, k: int, *, seed: int, kind: str, device=None):
    """Rows ``row_start .. row_start + nrows`` of P (all k columns), float32.

    ``device=None`` computes with NumPy and returns an ndarray; a torch device computes with
    torch there and returns a tensor. Values are computed in float64 and rounded once.
    """
    k = check_k(k)
    check_kind(kind)
    split_seed(seed)
    if row_start < 0 or nrows < 0 or row_start + nrows > 2**63:
        raise ValueError(f"rows [{row_start}, {row_start + nrows}) outside [0, 2**63)")
    xp = _namespace(device)
    rows = xp.arange(row_start, row_start + nrows)
    nblk = -(-k // BLOCK_COLS)
    scale = 1.0 / math.sqrt(k)
    gen = _rademacher_rows if kind == "rademacher" else _gaussian_rows
    return xp.to_float32(gen(xp, rows, nblk, seed, scale)[:, :k])


def sketch_matrix(p: int, k: int, *, seed: int = 0, kind: str = "rademacher", rows=None,
                  device=None):
    """Materialise rows of P (p x k) as a float32 torch tensor, for tests and small problems.

    ``rows`` is a slice of range(p) with step 1 (default: all p rows). ``device`` is where it
    is generated (default CPU, through NumPy).
    """
    import torch

    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1:
        raise ValueError(f"p must be a positive int, got {p!r}")
    rows = slice(None) if rows is None else rows
    if not isinstance(rows, slice):
        raise TypeError(f"rows must be a slice, got {type(rows).__name__}")
    start, stop, step = rows.indices(int(p))
    if step != 1:
        raise ValueError(f"rows must have step 1, got {step}")
    n = max(stop - start, 0)
    if device is None or torch.device(device).type == "cpu":
        return torch.from_numpy(projection_rows(start, n, k, seed=seed, kind=kind))
    return projection_rows(start, n, k, seed=seed, kind=kind, device=torch.device(device))
