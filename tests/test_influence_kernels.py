"""Kernels behind the influence methods: LiSSA, Lanczos extremes, packed SPD storage."""
import numpy as np
import pytest
import torch
from scipy.linalg import lapack

from attrkernels.kernels.lanczos import lanczos_extremes
from attrkernels.kernels.lissa import LissaDivergenceError, lissa
from attrkernels.kernels.packed import PackedSPD
from attrkernels.utils.errors import NotPositiveDefiniteError as NotPositiveDefiniteMatrix  # the one such error


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spd(p, low, high, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    return (Q * torch.linspace(low, high, p, dtype=torch.float64)) @ Q.T


def test_lissa_converges_to_the_damped_solve():
    H = spd(30, 0.0, 2.0)
    B = torch.randn(30, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = lissa(lambda X: H @ X, B, scale=3.0, depth=400, damping=0.2)
    want = torch.linalg.solve(H + 0.2 * torch.eye(30, dtype=H.dtype), B)
    torch.testing.assert_close(result.x, want, rtol=1e-6, atol=1e-6)
    assert float(result.change.max()) < 1e-6 and result.steps == 400 and result.scale == 3.0


def test_lissa_averages_minibatch_curvatures():
    parts = [spd(20, 0.0, 1.0, seed=s) for s in range(4)]  # H = mean of four "minibatch" curvatures
    H = sum(parts) / 4
    calls = iter(range(10 ** 6))
    B = torch.randn(20, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = lissa(lambda X: parts[next(calls) % 4] @ X, B, scale=8.0, depth=2000, damping=0.5, repeat=2)
    want = torch.linalg.solve(H + 0.5 * torch.eye(20, dtype=H.dtype), B)
    assert float(((result.x - want).norm(dim=0) / want.norm(dim=0)).max()) < 0.05


def test_lissa_bad_input_and_divergence():
    H = spd(10, 0.0, 4.0)
    B = torch.ones(10, 1, dtype=torch.float64)
    with pytest.raises(LissaDivergenceError, match="raise scale"):
        lissa(lambda X: H @ X, B, scale=1.0, depth=200, damping=0.1)
    with pytest.raises(ValueError, match="scale must exceed damping"):
        lissa(lambda X: H @ X, B, scale=0.1, depth=10, damping=0.2)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        lissa(lambda X: H @ X, B, scale=5.0, depth=10, damping=-1.0)
    with pytest.raises(ValueError, match="depth"):
        lissa(lambda X: H @ X, B, scale=5.0, depth=0)


def test_lanczos_finds_the_extreme_eigenvalues():
    H = spd(50, -0.7, 3.0, seed=3)
    low, high = lanczos_extremes(lambda v: (H @ v.double()).float(), 50, steps=50)
    assert low == pytest.approx(-0.7, abs=1e-4) and high == pytest.approx(3.0, abs=1e-4)


@pytest.mark.parametrize("n", [1, 6, 7, 20])
def test_packed_matrix_matches_lapack_and_solves(n):
    rng = np.random.default_rng(n)
    M = rng.normal(size=(n, n))
    A = M @ M.T + 0.1 * np.eye(n)
    packed = PackedSPD(n)
    half = n // 2 + 1
    packed.set_rows(0, torch.tensor(A[:half]))
    packed.set_rows(half, torch.tensor(A[half:]))
    np.testing.assert_allclose(packed.diagonal(), np.diag(A))
    if n % 2 == 0:
        reference, info = lapack.dtrttf(np.asfortranarray(A), transr="N", uplo="L")
        np.testing.assert_array_equal(packed.data.reshape(-1), reference)
        assert packed.nbytes == 8 * n * (n + 1) // 2
    packed.shift(0.4)
    packed.factor()
    B = rng.normal(size=(n, 3))
    X = packed.solve(torch.tensor(B)).numpy()
    np.testing.assert_allclose((A + 0.4 * np.eye(n)) @ X, B, atol=1e-9)


def test_packed_refuses_an_indefinite_matrix():
    packed = PackedSPD(3)
    packed.set_rows(0, torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(NotPositiveDefiniteMatrix, match="not positive definite") as err:
        packed.factor()
    assert err.value.pivot == 1
    with pytest.raises(ValueError, match="rows must be"):
        PackedSPD(3).set_rows(2, torch.zeros(2, 3))
