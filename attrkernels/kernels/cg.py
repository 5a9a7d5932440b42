"""Block conjugate gradient: solve A X = B for all V columns of B with one operator call per step.

A is a symmetric positive definite p x p operator given only through ``matvec(P) = A P`` on
blocks P [p, w] (for influence functions A = H + damping I and ``matvec`` is one pass of
``hvp`` over the data). The solver is block CG (O'Leary, 1980) in the breakdown-free form of
Ji & Li (2017): the search block P_k is kept orthonormal and directions that became linearly
dependent are dropped, so the block can shrink but never becomes singular.

    R_0 = B, X_0 = 0, P_0 = orth(R_0)
    for k = 0, 1, ...
        Q_k   = A P_k                                         (the one operator call, w columns)
        G_k   = P_k^T Q_k                                     [w, w], float64, must be PD
        alpha = G_k^{-1} P_k^T R_k                            [w, a]   (a = active columns)
        X    += P_k alpha,   R -= Q_k alpha                   (active columns only)
        beta  = -G_k^{-1} Q_k^T R_{k+1}
        P_k+1 = orth(R_{k+1} + P_k beta)                      (A-conjugate to P_k)

Each column's iterate minimises the A-norm of its error over the block Krylov space
span{R_0, A R_0, ..., A^k R_0} of *all* columns, so the block converges in far fewer steps than
separate CG runs (roughly as CG on A with its largest V eigenvalues removed); with V = 1 this is
plain CG. The answer does not depend on the grouping: every column converges to A^{-1} b.

Per-column convergence: column j is done when ||b_j - A x_j|| <= tol ||b_j|| (the recursively
updated residual); done columns are frozen and leave the search block, which is how the solver
exits early, column by column and as a whole. Loss of conjugacy (rounding, or dropped
residuals of converged columns): in exact arithmetic R_{k+1} is orthogonal to P_{k-1}; when
||P_{k-1}^T R_{k+1}|| exceeds ``restart_tol`` ||R_{k+1}|| the search block restarts from the
residuals (P = orth(R)), as Powell's restart test does for nonlinear CG. The test is made on
one seeded random combination of the normalised residual columns (a matrix-vector product).

If some G_k has an eigenvalue <= 10 eps ||G_k|| (eps of B's dtype), A is not positive definite
on that direction (or too ill-conditioned for the dtype): ``utils.errors.NotPositiveDefiniteError``
carries the smallest Rayleigh quotient found (``curvature``, also ``found``) and the largest
(``largest``). Columns not converged within ``max_iter`` steps raise a
``CGConvergenceWarning`` listing their residuals.

Across processes: ``matvec`` may sum its product over ranks (``methods.curvature.Curvature``
all-reduces each block); given the same B and the same products, every rank then takes the same
steps, restarts and exits (the arithmetic is deterministic, the restart test seeded), so no
other collective is needed.

Memory: X, R [p, V], their active columns and four blocks of at most [p, V] (P, Q, the
previous P, a temporary), in B's dtype; the w x w algebra is float64. Cost per step: one
``matvec`` on w <= V columns plus 8 products of a [p, w] and a [w, w] matrix (about 16 p w^2
FLOPs): next to Hessian-vector products on N examples (about 12 N p FLOPs per column) this
is a fraction 1.3 w / N.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..utils.checks import check_positive_int
from ..utils.errors import NotPositiveDefiniteError

RESTART_TOL = 0.2


class CGConvergenceWarning(RuntimeWarning):
    """Some columns did not reach the tolerance within max_iter steps."""


@dataclass
class CGResult:
    """Solution X [p, V] and per-column diagnostics."""

    x: torch.Tensor
    residual_norms: torch.Tensor  # [V] float64: ||b_j - A x_j|| / ||b_j|| (recursive residual)
    converged: torch.Tensor  # [V] bool
    iterations: torch.Tensor  # [V] int64: step at which column j converged (max_iter if it did not)
    steps: int  # operator calls (passes over the data)
    columns: int  # total columns multiplied by the operator (the work)
    restarts: int


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def orthonormalize(Z: torch.Tensor) -> torch.Tensor:
    """A basis [p, r] of span(Z), r <= columns of Z, orthonormal up to rounding, without dependent directions.

    Gram-eigen orthonormalisation: with Z^T Z = U diag(s) U^T (float64), Z U_r diag(s_r)^{-1/2}
    for the eigenvalues s_r > 100 eps s_max. Block CG computes P^T A P explicitly, so the
    rounding error of one pass (about eps s_max / s_min) costs nothing but a slightly
    non-orthonormal block.
    """
    gram = (Z.T @ Z).to(torch.float64)
    s, U = torch.linalg.eigh((gram + gram.T) / 2)
    keep = s > 100 * _eps(Z.dtype) * s.max().clamp_min(torch.finfo(torch.float64).tiny)
    if not bool(keep.any()):
        return Z[:, :0]
    return Z @ (U[:, keep] / s[keep].sqrt()).to(Z.dtype)


def _pd_inverse(G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """G^{-1} of the symmetric float64 [w, w] block G = P^T A P, or NotPositiveDefiniteError."""
    G = (G + G.T) / 2
    s, U = torch.linalg.eigh(G)
    largest = float(s.abs().max())
    smallest = float(s.min())
    if smallest <= 10 * _eps(dtype) * largest:
        raise NotPositiveDefiniteError(
            f"the operator is not positive definite: a direction has curvature "
            f"v^T A v / v^T v = {smallest:.3e} while the largest seen is {largest:.3e}",
            found=smallest, curvature=smallest, largest=largest)
    return (U / s) @ U.T


def _leak(P_prev: torch.Tensor, R: torch.Tensor, norms: torch.Tensor) -> float:
    """||P_prev^T z|| / ||z|| for z = sum_j s_j r_j / ||r_j||, seeded signs s_j (a matrix-vector
    product instead of the matrix product P_prev^T R: every column counts alike)."""
    signs = (torch.randint(0, 2, (R.shape[1],), generator=torch.Generator().manual_seed(R.shape[1])) * 2 - 1
             ).to(norms.device)
    z = R @ (signs / norms.clamp_min(torch.finfo(torch.float64).tiny)).to(R.dtype)
    return float((P_prev.T @ z).to(torch.float64).norm() / z.to(torch.float64).norm().clamp_min(1e-300))


def block_cg(matvec, B: torch.Tensor, *, tol: float = 1e-5, max_iter: int = 100,
             restart_tol: float = RESTART_TOL, warn: bool = True) -> CGResult:
    """Solve A X = B for all columns of B [p, V] at once (see the module docstring).

    Args:
        matvec: ``matvec(P) -> A P`` for blocks P [p, w] (same dtype and device as B).
        B: right-hand sides [p, V], float32 or float64 (the dtype of every block).
        tol: per-column relative residual ||b_j - A x_j|| / ||b_j|| to reach.
        max_iter: at most this many operator calls.
        restart_tol: restart the search block when the previous block's residual leak exceeds
            this fraction of the residual.
        warn: warn (CGConvergenceWarning) about columns not converged within max_iter.
    """
    if not torch.is_tensor(B) or B.ndim != 2:
        raise ValueError(f"B must be a 2-D tensor [p, V], got "
                         f"{tuple(B.shape) if torch.is_tensor(B) else type(B).__name__}")
    if B.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"B must be float32 or float64, got {B.dtype}")
    if not bool(torch.isfinite(B).all()):
        raise ValueError("B contains NaN or Inf")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    check_positive_int("max_iter", max_iter)
    if not 0 < restart_tol:
        raise ValueError(f"restart_tol must be > 0, got {restart_tol}")
    p, V = B.shape
    X = torch.zeros_like(B)
    b_norm = B.to(torch.float64).norm(dim=0)
    scale = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    residual = b_norm / scale  # of X = 0
    active = residual > tol
    iterations = torch.full((V,), max_iter, dtype=torch.int64, device=B.device)
    iterations[~active] = 0
    steps = columns = restarts = 0
    idx = torch.nonzero(active).flatten()  # the active columns, compacted below
    R_act, X_act = B[:, idx].clone(), X[:, idx]
    P = orthonormalize(R_act) if idx.numel() else None
    P_prev = None
    while P is not None and P.shape[1] and steps < max_iter:
        Q = matvec(P)
        if not torch.is_tensor(Q) or Q.shape != P.shape:
            raise ValueError(f"matvec must return a tensor of the shape of its input {tuple(P.shape)}, "
                             f"got {tuple(Q.shape) if torch.is_tensor(Q) else type(Q).__name__}")
        if not bool(torch.isfinite(Q).all()):
            raise ValueError("matvec returned NaN or Inf")
        Q = Q.to(B.dtype)
        steps += 1
        columns += P.shape[1]
        G_inv = _pd_inverse((P.T @ Q).to(torch.float64), B.dtype)
        alpha = (G_inv @ (P.T @ R_act).to(torch.float64)).to(B.dtype)
        X_act.addmm_(P, alpha)
        R_act.addmm_(Q, alpha, alpha=-1)
        residual[idx] = R_act.to(torch.float64).norm(dim=0) / scale[idx]
        done = residual[idx] <= tol
        if bool(done.any()):
            X[:, idx[done]] = X_act[:, done]
            iterations[idx[done]] = steps
            active[idx[done]] = False
            idx, R_act, X_act = idx[~done], R_act[:, ~done], X_act[:, ~done]
            if not idx.numel():
                break
        if steps == max_iter:
            break
        if P_prev is not None and _leak(P_prev, R_act, residual[idx] * scale[idx]) > restart_tol:
            P, P_prev = orthonormalize(R_act), None
            restarts += 1
            continue
        beta = (G_inv @ (Q.T @ R_act).to(torch.float64)).to(B.dtype)
        P_prev, P = P, orthonormalize(torch.addmm(R_act, P, beta, alpha=-1))
    if idx.numel():
        X[:, idx] = X_act
    converged = ~active
    if warn and not bool(converged.all()):
        bad = torch.nonzero(~converged).flatten()
        worst = int(bad[residual[bad].argmax()])
        warnings.warn(
            f"block_cg: {bad.numel()} of {V} columns did not reach tol={tol:g} within "
            f"max_iter={max_iter} steps; relative residuals median {float(residual[bad].median()):.2e}, "
            f"max {float(residual[worst]):.2e} (column {worst}). Raise max_iter or damping.",
            CGConvergenceWarning, stacklevel=2)
    return CGResult(X, residual, converged, iterations, steps, columns, restarts)


__all__ = ["block_cg", "orthonormalize", "CGResult", "CGConvergenceWarning"]
