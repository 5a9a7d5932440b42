"""Errors raised across layers."""
from __future__ import annotations


class NotPositiveDefiniteError(ValueError):
    """A matrix (or a damped curvature) that must be positive definite is not.

    The one such error of the library: raised by the packed Cholesky (``kernels.packed``), block
    CG's Gram solves (``kernels.cg``), TRAK's kernel factorisation and the influence methods; the
    message says which matrix and, where a method raises it, what damping would fix it.
    ``found``: the offending value (a pivot or a curvature along a direction) when one is known.
    Keyword ``details`` become attributes: ``curvature`` and ``largest`` (block CG: the smallest
    and largest Rayleigh quotients seen), ``pivot`` (packed Cholesky: 0-based index of the first
    leading minor that is not positive definite).
    """

    def __init__(self, message: str, found: float | None = None, **details):
        super().__init__(message)
        self.found = found
        for name, value in details.items():
            setattr(self, name, value)
