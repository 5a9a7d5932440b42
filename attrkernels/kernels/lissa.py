"""LiSSA: the stochastic Neumann-series solve of (H + damping I) X = B, batched over columns.

For a scale s above the largest eigenvalue of every H_t + damping I (H_t: the curvature of one
minibatch) the series (H + damping I)^{-1} = (1/s) sum_{j >= 0} (I - (H + damping I)/s)^j
is summed by the recursion (Agarwal, Bullins & Hazan, 2017)

    X_0 = B,    X_t = B + X_{t-1} - (H_t X_{t-1} + damping X_{t-1}) / s,     t = 1 .. depth

whose fixed point is s (H + damping I)^{-1} B; the estimate is X_depth / s, averaged over
``repeat`` independent recursions (each draws its own minibatches). All V columns share each
minibatch product: ``operator(X)`` returns H_t X for a block X [p, V] and draws the next
minibatch on every call, so one step is one (vmapped) minibatch pass for every column.

With the contraction ||I - (H_t + damping I)/s|| <= 1, ||X_t|| <= (t + 1) ||B|| column by column;
a column beyond twice that bound (or a non-finite value) means s is too small and raises
``LissaDivergenceError``. The error after t steps decays like (1 - lambda_min/s)^t, so depth must
be a few multiples of s / (lambda_min(H) + damping). ``LissaResult.change`` is the last step's
relative update per column, the usual check that the recursion has settled.

Memory: three blocks [p, V] (B, X, the running sum) in B's dtype; cost: repeat * depth operator calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..utils.checks import check_positive_int
from ..utils.checks import check_damping


class LissaDivergenceError(ValueError):
    """The recursion grew beyond its contraction bound: the scale is too small."""


@dataclass
class LissaResult:
    """Estimate X ~ (H + damping I)^{-1} B [p, V] and the last relative update per column."""

    x: torch.Tensor
    change: torch.Tensor  # [V] float64: ||X_depth - X_{depth-1}|| / ||X_depth||, worst over repeats
    steps: int  # operator calls
    scale: float  # the s used


def lissa(operator, B: torch.Tensor, *, scale: float, depth: int, damping: float = 0.0,
          repeat: int = 1) -> LissaResult:
    """Batched LiSSA estimate of (H + damping I)^{-1} B for B [p, V] (see the module docstring).

    Args:
        operator: ``operator(X) -> H_t X`` for X [p, V], drawing a new minibatch on each call.
        B: right-hand sides [p, V], float32 or float64.
        scale: s, larger than the largest eigenvalue of H_t + damping I.
        depth: recursion steps per repeat.
        damping: lambda >= 0.
        repeat: independent recursions averaged.
    """
    damping = check_damping(damping)
    if not torch.is_tensor(B) or B.ndim != 2 or B.dtype not in (torch.float32, torch.float64):
        raise ValueError("B must be a float32 or float64 tensor [p, V]")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if scale <= damping:
        raise ValueError(f"scale must exceed damping (scale={scale}, damping={damping})")
    check_positive_int("depth", depth)
    check_positive_int("repeat", repeat)
    b_norm = B.to(torch.float64).norm(dim=0)
    total = torch.zeros_like(B)
    change = torch.zeros(B.shape[1], dtype=torch.float64, device=B.device)
    steps = 0
    for _ in range(repeat):
        X = B.clone()
        for t in range(1, depth + 1):
            HX = operator(X)
            if not torch.is_tensor(HX) or HX.shape != X.shape:
                raise ValueError(f"operator must return a tensor of shape {tuple(X.shape)}")
            steps += 1
            X_new = B + X - (HX.to(B.dtype) + damping * X) / scale
            norms = X_new.to(torch.float64).norm(dim=0)
            if not bool(torch.isfinite(norms).all()) or bool((norms > 2 * (t + 1) * b_norm + 1e-30).any()):
                raise LissaDivergenceError(
                    f"LiSSA diverged at step {t} (||X_t|| beyond {2 * (t + 1)} ||B||): scale={scale:g} is "
                    "below the largest eigenvalue of a minibatch curvature; raise scale")
            if t == depth:
                delta = (X_new - X).to(torch.float64).norm(dim=0) / norms.clamp_min(1e-300)
                change = torch.maximum(change, delta)
            X = X_new
        total += X
    return LissaResult(total / (repeat * scale), change, steps, float(scale))


__all__ = ["lissa", "LissaResult", "LissaDivergenceError"]
