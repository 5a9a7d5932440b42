"""Extreme eigenvalues of a symmetric operator by the Lanczos process (Ritz values).

Starting from a seeded random unit vector q_1, ``steps`` operator calls build an orthonormal
basis Q_m of the Krylov space span{q_1, A q_1, ..., A^{m-1} q_1} and the tridiagonal
T_m = Q_m^T A Q_m (alpha_j = q_j^T A q_j on the diagonal, beta_j = ||r_j|| beside it), with full
reorthogonalisation (float64) against Q_m. The eigenvalues of T_m (Ritz values) lie inside
[lambda_min(A), lambda_max(A)] and their extremes converge first, so

    theta_max <= lambda_max(A)  and  theta_min >= lambda_min(A)

are estimates from inside the spectrum. Used to size a damping that makes a curvature positive
definite (theta_min) and the LiSSA scale (theta_max). Cost: ``steps`` calls of ``matvec`` on one
column; memory: p x steps float64.
"""
from __future__ import annotations

import torch

from ..utils.checks import check_positive_int


def lanczos_extremes(matvec, p: int, *, steps: int = 30, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device="cpu") -> tuple[float, float]:
    """(theta_min, theta_max): extreme Ritz values of the p x p operator ``matvec([p, 1]) -> [p, 1]``."""
    check_positive_int("p", p)
    check_positive_int("steps", steps)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(p, dtype=torch.float64, generator=generator)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for _ in range(min(steps, p)):
        q = basis[-1]
        r = matvec(q.to(dtype=dtype, device=device)[:, None])[:, 0].detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(r).all()):
            raise ValueError("matvec returned NaN or Inf")
        alphas.append(float(q @ r))
        Q = torch.stack(basis, 1)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            r = r - Q @ (Q.T @ r)
        beta = float(r.norm())
        if beta <= 1e-12 * max(abs(a) for a in alphas) or len(basis) == p:
            break
        betas.append(beta)
        basis.append(r / beta)
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(T)
    return float(ritz[0]), float(ritz[-1])


__all__ = ["lanczos_extremes"]
