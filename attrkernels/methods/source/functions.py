"""SOURCE's matrix functions, its segments, and the dense reference of its formula.

A segment of s = (sum of its learning rates) / (1 - momentum) with curvature H = Q diag(sigma) Q^T
contributes through two functions of H, applied in its eigenbasis (sigma >= 0):

    F_seg(sigma)  = (1 - exp(-s sigma)) / sigma = -expm1(-s sigma) / sigma    (limit s at sigma = 0)
    F_back(sigma) = exp(-s sigma)

F_seg(H) = int_0^s exp(-t H) dt is the total effect of a constant gradient applied for "time" s
by gradient flow on the quadratic with Hessian H; F_back(H) propagates a perturbation through
the segment. ``unrolled_scores`` evaluates the whole SOURCE formula with explicit dense
matrices (float64): the reference the EK-FAC-based ``SOURCE`` is tested against.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...utils.checks import check_number, check_positive_int
from ..checkpoints import Checkpoint


def segment_fn(sigma: torch.Tensor, s: float) -> torch.Tensor:
    """F_seg(sigma) = (1 - exp(-s sigma)) / sigma elementwise, s at sigma = 0, in sigma's dtype.

    Stable everywhere on sigma >= 0: ``expm1`` keeps full relative precision for s sigma << 1
    (where 1 - exp would cancel) and tends to -1 for s sigma >> 1 (giving 1 / sigma)."""
    x = sigma * s
    zero = sigma == 0
    safe = torch.where(zero, torch.ones_like(sigma), sigma)
    return torch.where(zero, torch.full_like(sigma, s), -torch.expm1(-x) / safe)


def backward_fn(sigma: torch.Tensor, s: float) -> torch.Tensor:
    """F_back(sigma) = exp(-s sigma) elementwise (underflows to 0 for large s sigma)."""
    return torch.exp(-s * sigma)


def check_momentum(momentum) -> float:
    value = check_number("momentum", momentum)
    if value >= 1:
        raise ValueError(f"momentum must be in [0, 1) (heavy-ball coefficient beta), got {momentum!r}")
    return value


def lr_sums_of(checkpoints: Sequence, lr_sums) -> list[float]:
    """One positive finite learning-rate sum per checkpoint: ``lr_sums``, else the checkpoints'
    ``Checkpoint.lr_sum``; errors name ``lr_sums``."""
    count = len(checkpoints)
    if lr_sums is None:
        missing = [i for i, c in enumerate(checkpoints) if not isinstance(c, Checkpoint) or c.lr_sum is None]
        if missing:
            raise ValueError(
                "lr_sums is missing: SOURCE needs, for every checkpoint c, the sum of the learning rates of the "
                "optimiser steps between checkpoint c - 1 and c (since initialisation for c = 0); pass "
                f"lr_sums=[...] ({count} numbers) or ak.tasks.Checkpoint objects with lr_sum (e.g. from "
                f"task.train(..., checkpoints=n)); checkpoints {missing[:10]} carry none")
        lr_sums = [c.lr_sum for c in checkpoints]
    if isinstance(lr_sums, (int, float)) or torch.is_tensor(lr_sums) and lr_sums.ndim == 0:
        raise ValueError(f"lr_sums must hold one number per checkpoint ({count}), got the single number {lr_sums!r}")
    lr_sums = [float(v) if torch.is_tensor(v) else v for v in lr_sums]
    if len(lr_sums) != count:
        raise ValueError(f"lr_sums must hold one number per checkpoint: got {len(lr_sums)} for {count} checkpoints")
    return [check_number(f"lr_sums[{i}]", v, positive=True) for i, v in enumerate(lr_sums)]


def segment_groups(count: int, segments: int) -> list[range]:
    """The checkpoint indices of each segment: ``count`` checkpoints in ``segments`` consecutive
    groups of equal size."""
    check_positive_int("segments", segments)
    if count < segments:
        raise ValueError(f"checkpoints holds {count} checkpoint(s), fewer than segments={segments}; every "
                         "segment needs at least one checkpoint: pass more checkpoints or fewer segments")
    if count % segments:
        raise ValueError(f"checkpoints holds {count} checkpoints, not divisible by segments={segments}: the "
                         "segments are consecutive groups of equal size; pass a multiple of segments "
                         f"(e.g. {count - count % segments}) or segments dividing {count}")
    size = count // segments
    return [range(i * size, (i + 1) * size) for i in range(segments)]


def segment_times(lr_sums: Sequence[float], groups: list, momentum: float) -> list[float]:
    """s_l = sum of the group's learning-rate sums / (1 - momentum) (heavy-ball: a constant
    gradient moves the weights 1 / (1 - beta) times farther per step at equilibrium)."""
    return [math.fsum(lr_sums[c] for c in g) / (1.0 - momentum) for g in groups]


def unrolled_scores(curvatures: Sequence, times: Sequence[float], train_grads: Sequence,
                    query_grads: torch.Tensor) -> torch.Tensor:
    """The SOURCE formula with dense matrices, float64: [n_train, n_test]

        scores = - sum_l  gbar_l  F_seg,l(H_l)  F_back,l+1(H_l+1) ... F_back,L(H_L)  v^T

    curvatures: L symmetric PSD [p, p] (H_l, e.g. the Hessian + weight decay); times: the L
    segment times s_l; train_grads: L arrays [n_train, p] (each example's training-loss gradient
    averaged over the segment's checkpoints); query_grads v [n_test, p] (gradients of the
    measurement at the final weights). Eigenvalues below 0 (rounding) are clipped to 0.
    """
    if not (len(curvatures) == len(times) == len(train_grads)):
        raise ValueError("curvatures, times and train_grads need one entry per segment")
    v = query_grads.to(torch.float64).T  # [p, n_test]
    total = 0
    for H, s, g in reversed(list(zip(curvatures, times, train_grads))):
        sigma, Q = torch.linalg.eigh(H.to(torch.float64))
        sigma = sigma.clamp_min(0)
        rotated = Q.T @ v
        total = total - g.to(torch.float64) @ (Q @ (segment_fn(sigma, s)[:, None] * rotated))
        v = Q @ (backward_fn(sigma, s)[:, None] * rotated)
    return total
