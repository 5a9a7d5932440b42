"""Dense symmetric positive definite solves in half the memory: LAPACK's rectangular full packed format.

A symmetric n x n matrix is stored by its lower triangle in the rectangular full packed (RFP)
format of LAPACK (Gustavson et al., 2010; ``dtrttf``): n (n + 1) / 2 float64 numbers instead of
n^2, and the Cholesky factorisation (``dpftrf``) and solves (``dpftrs``) still run on level-3 BLAS.
For a model of p parameters the exact damped Hessian then takes 4 p^2 bytes (2.7 GB for the
26,122 parameters of the digits MLP, where a dense float64 Hessian takes 5.5 GB).

Layout (n even, k = n / 2, TRANSR = 'N', UPLO = 'L'): the column-major (n + 1) x k array AR holds
    AR[i + 1, j] = A[i, j]           for j < k, i >= j      (the first k columns of the lower triangle)
    AR[r, c]     = A[k + c, k + r]   for c < k, r <= c      (the trailing k x k triangle, transposed)
so here, as a C-ordered [k, n + 1] array F (F[j, r] = AR[r, j]), row j < k of A contributes its
entries j.. n - 1 to F[j, j + 1:], and row k + c its entries k .. k + c to F[c, :c + 1]. Odd n is
padded to n + 1 with an identity row and column (the padded unknown is 0 and is dropped).

``PackedSPD`` is filled row block by row block (rows of a symmetric matrix = its columns, e.g.
Hessian-vector products with unit vectors), gets a diagonal shift, is factorised in place and
solves for many right-hand sides at once.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import lapack

from ..utils.errors import NotPositiveDefiniteError


class PackedSPD:
    """A symmetric n x n float64 matrix in RFP storage; ``set_rows``, ``shift``, ``factor``, ``solve``."""

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.n = int(n)
        self.m = self.n + (self.n % 2)  # padded, even order
        self.k = self.m // 2
        self.data = np.zeros((self.k, self.m + 1), dtype=np.float64)
        self.factored = False
        if self.m != self.n:
            self._write_row(self.n, np.eye(1, self.m, self.n)[0])

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def _write_row(self, j: int, row: np.ndarray) -> None:
        k = self.k
        if j < k:
            self.data[j, j + 1:] = row[j:]
        else:
            c = j - k
            self.data[c, :c + 1] = row[k:j + 1]

    def set_rows(self, start: int, rows) -> None:
        """Rows start .. start + len(rows) - 1 of the matrix (only their lower-triangle part is read)."""
        if self.factored:
            raise RuntimeError("the matrix is already factored")
        rows = rows.detach().cpu().to(torch.float64).numpy() if torch.is_tensor(rows) else np.asarray(rows, np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.n or not 0 <= start <= self.n - rows.shape[0]:
            raise ValueError(f"rows must be [r, {self.n}] with start + r <= {self.n}, got {rows.shape} at {start}")
        if self.m != self.n:
            rows = np.concatenate([rows, np.zeros((rows.shape[0], 1))], axis=1)
        for i, row in enumerate(rows):
            self._write_row(start + i, row)

    def diagonal(self) -> np.ndarray:
        k = self.k
        first = self.data[np.arange(k), np.arange(k) + 1]
        last = self.data[np.arange(k), np.arange(k)]
        return np.concatenate([first, last])[: self.n]

    def shift(self, value: float) -> None:
        """A += value * I."""
        if self.factored:
            raise RuntimeError("the matrix is already factored")
        k = self.k  # (the padded unknown, if any, is decoupled: shifting it too is harmless)
        self.data[np.arange(k), np.arange(k) + 1] += value
        self.data[np.arange(k), np.arange(k)] += value

    def factor(self) -> None:
        """In-place Cholesky A = L L^T; ``NotPositiveDefiniteError`` (its
        ``pivot``: the 0-based order of the first leading minor that fails) if A is not PD."""
        flat = self.data.reshape(-1)
        out, info = lapack.dpftrf(self.m, flat, transr="N", uplo="L", overwrite_a=1)
        if info > 0:
            raise NotPositiveDefiniteError(
                f"the matrix is not positive definite (leading minor of order {info} fails)", pivot=info - 1)
        if info < 0:
            raise RuntimeError(f"dpftrf: illegal argument {-info}")
        if out.ctypes.data != flat.ctypes.data:  # the wrapper copied: keep its result
            self.data = out.reshape(self.data.shape)
        self.factored = True

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """A^{-1} B for B [n, V] (float64 result)."""
        if not self.factored:
            raise RuntimeError("call factor() before solve()")
        b = B.detach().cpu().to(torch.float64).numpy()
        if b.ndim != 2 or b.shape[0] != self.n:
            raise ValueError(f"B must be [{self.n}, V], got {tuple(B.shape)}")
        if self.m != self.n:
            b = np.concatenate([b, np.zeros((1, b.shape[1]))], axis=0)
        x, info = lapack.dpftrs(self.m, self.data.reshape(-1), np.asfortranarray(b), transr="N", uplo="L")
        if info != 0:
            raise RuntimeError(f"dpftrs failed with info = {info}")
        return torch.from_numpy(np.ascontiguousarray(x[: self.n]))


__all__ = ["PackedSPD"]
