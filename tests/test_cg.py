"""block_cg: solutions, block = separate solves, per-column convergence, restarts, bad input."""
import warnings

import pytest
import torch

from attrkernels.kernels.cg import CGConvergenceWarning, block_cg, orthonormalize
from attrkernels.utils.errors import NotPositiveDefiniteError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spd(p=60, low=1e-2, high=10.0, seed=0, dtype=torch.float64):
    """A p x p SPD matrix with log-spaced eigenvalues in [low, high]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=dtype))
    return (Q * torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), p,
                               dtype=dtype)) @ Q.T


def rhs(p, V, seed=1, dtype=torch.float64):
    return torch.randn(p, V, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_solves_all_columns_to_the_tolerance():
    A, B = spd(), rhs(60, 8)
    result = block_cg(lambda P: A @ P, B, tol=1e-8, max_iter=200)
    assert bool(result.converged.all())
    true_residual = (B - A @ result.x).norm(dim=0) / B.norm(dim=0)
    assert float(true_residual.max()) < 1e-7
    torch.testing.assert_close(result.x, torch.linalg.solve(A, B), rtol=1e-6, atol=1e-6)
    assert result.columns <= 8 * result.steps


def test_block_equals_separate_solves():
    A, B = spd(p=80, seed=2), rhs(80, 12, seed=3)
    block = block_cg(lambda P: A @ P, B, tol=1e-10, max_iter=300)
    separate = torch.cat([block_cg(lambda P: A @ P, B[:, j:j + 1], tol=1e-10, max_iter=300).x
                          for j in range(12)], 1)
    relative = (block.x - separate).norm(dim=0) / separate.norm(dim=0)
    assert float(relative.max()) < 1e-5
    # the block Krylov space serves every column: fewer passes than one column alone needs
    single = block_cg(lambda P: A @ P, B[:, :1], tol=1e-10, max_iter=300)
    assert block.steps < single.steps


def test_single_column_is_textbook_cg():
    A, b = spd(p=30, seed=4), rhs(30, 1, seed=5)
    x, r = torch.zeros_like(b), b.clone()
    d = r.clone()
    for _ in range(5):
        Ad = A @ d
        alpha = (r.T @ r) / (d.T @ Ad)
        x, r_new = x + alpha * d, r - alpha * Ad
        d, r = r_new + (r_new.T @ r_new) / (r.T @ r) * d, r_new
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CGConvergenceWarning)
        result = block_cg(lambda P: A @ P, b, tol=1e-14, max_iter=5)
    torch.testing.assert_close(result.x, x, rtol=1e-9, atol=1e-12)


def test_per_column_convergence_and_early_exit():
    A = spd(p=50, seed=6)
    B = rhs(50, 4, seed=7)
    B[:, 1] = 0.0  # solved at the start
    B[:, 2] = A[:, 0]  # A x = A e_0: the solution is e_0, one direction of work
    calls = []

    def matvec(P):
        calls.append(P.shape[1])
        return A @ P

    result = block_cg(matvec, B, tol=1e-9, max_iter=200)
    assert bool(result.converged.all())
    assert int(result.iterations[1]) == 0 and bool((result.x[:, 1] == 0).all())
    assert int(result.iterations[2]) < int(result.iterations[0])
    assert calls[0] == 3  # the zero column never enters the search block
    assert calls[-1] < 3  # converged columns leave it
    assert sum(calls) == result.columns and len(calls) == result.steps


def test_warns_with_residuals_when_not_converged():
    A, B = spd(low=1e-4), rhs(60, 3)
    with pytest.warns(CGConvergenceWarning, match=r"3 of 3 columns did not reach tol=1e-10 within max_iter=4 .*median"):
        result = block_cg(lambda P: A @ P, B, tol=1e-10, max_iter=4)
    assert not bool(result.converged.any()) and result.steps == 4
    assert bool((result.residual_norms > 1e-10).all())


def test_restarts_on_loss_of_conjugacy_and_still_converges():
    # float32 rounding leaks residual into the previous search block; a strict restart_tol
    # turns that into restarts, after which the solve still reaches the tolerance
    A, B = spd(p=70, low=1e-1, seed=8, dtype=torch.float32), rhs(70, 5, seed=9, dtype=torch.float32)
    plain = block_cg(lambda P: A @ P, B, tol=1e-4, max_iter=500)
    result = block_cg(lambda P: A @ P, B, tol=1e-4, max_iter=500, restart_tol=1e-6)
    assert plain.restarts == 0 and result.restarts > 0 and bool(result.converged.all())
    want = torch.linalg.solve(A.double(), B.double())
    assert float(((result.x.double() - want).norm(dim=0) / want.norm(dim=0)).max()) < 1e-3


def test_not_positive_definite_raises_with_the_curvature():
    A = spd(p=20, seed=10)
    A = A - 0.5 * torch.eye(20, dtype=A.dtype)  # eigenvalues down to about -0.49
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite") as err:
        block_cg(lambda P: A @ P, rhs(20, 3), tol=1e-10, max_iter=100)
    assert err.value.curvature < 0


def test_orthonormalize_drops_dependent_directions():
    Z = rhs(40, 3)
    Z = torch.cat([Z, Z[:, :1] + Z[:, 1:2]], 1)
    P = orthonormalize(Z)
    assert P.shape == (40, 3)
    torch.testing.assert_close(P.T @ P, torch.eye(3, dtype=P.dtype), rtol=0, atol=1e-12)


def test_bad_input():
    A = spd(p=5)
    with pytest.raises(ValueError, match=r"B must be a 2-D tensor \[p, V\]"):
        block_cg(lambda P: A @ P, torch.ones(5))
    with pytest.raises(TypeError, match="float32 or float64"):
        block_cg(lambda P: A @ P, torch.ones(5, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        block_cg(lambda P: A @ P, torch.full((5, 1), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="max_iter"):
        block_cg(lambda P: A @ P, rhs(5, 1), max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        block_cg(lambda P: A @ P, rhs(5, 1), tol=0)
    with pytest.raises(ValueError, match="matvec must return"):
        block_cg(lambda P: P[:-1], rhs(5, 1))
    with pytest.raises(ValueError, match="matvec returned NaN"):
        block_cg(lambda P: P * float("inf"), rhs(5, 1))
