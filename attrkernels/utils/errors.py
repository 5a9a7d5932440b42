"""Errors raised across layers."""
from __future__ import annotations


class NotPositiveDefiniteError(ValueError):
    """A matrix (or a damped curvature) that must be positive definite is not.

    Raised by the packed Cholesky, block CG's Gram solves, TRAK's kernel factorisation and the
    influence methods; the message says which matrix and what damping would fix it. ``found``:
    the offending value (a pivot or a curvature along a direction) when one is known.
    """

    def __init__(self, message: str, found: float | None = None):
        super().__init__(message)
        self.found = found
