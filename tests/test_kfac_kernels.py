"""K-FAC / EK-FAC kernels against their definitions computed naively in float64.

Tolerances: float32 kernels within 1e-5 (relative to the largest entry) of the float64
reference; float64 eigendecompositions reconstruct their factor within 1e-10.
"""
import sys

import pytest
import torch
import torch.nn as nn

from attrkernels.capture import Capture, make_plan
from attrkernels.kernels.conv_covariance import conv_covariance
from attrkernels.kernels.conv_covariance import supported as conv_supported
from attrkernels.kernels.conv_grad import conv_example_gradients, conv_rotated_gradients
from attrkernels.kernels.conv_grad import supported as conv_grad_supported
from attrkernels.kernels.kfac import (Basis, _eigh, block_sizes, covariance, ekfac_correction, gram_block, homogeneous,
                                      kron_eigh, mirror_upper, rotated_gradients, rotation_plan, token_counts)
from attrkernels.kernels.kron_score import (kron_inner, kron_self_inner, sparse_rows_inner,
                                            sparse_rows_self_inner)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def spd(d, gen, rank=None):
    x = torch.randn(d, rank or 2 * d, generator=gen, dtype=torch.float64)
    return x @ x.T / x.shape[1]


def random_basis(d, gen, block_width=None):
    _, basis = kron_eigh([spd(d, gen)], block_width)[0]
    return basis


def naive_rotated(A, D, Qa, Qs):
    """Q_S^T (sum_t D_bt A_bt^T) Q_A per example, float64, with dense Q."""
    G = torch.einsum("bto,bti->boi", D.double(), A.double())
    return Qs.T @ G @ Qa


# ---------------------------------------------------------------------------------------------
# Factor accumulation


def test_covariance_is_the_sum_of_outer_products_over_all_positions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, generator=gen)
    ref = torch.zeros(7, 7, dtype=torch.float64)
    for b in range(6):
        for t in range(5):
            ref += torch.outer(x[b, t].double(), x[b, t].double())
    assert rel(covariance(x), ref) < 1e-6
    out = covariance(x[:3])
    covariance(x[3:], out=out)  # accumulates across batches
    assert rel(out, ref) < 1e-6


def test_homogeneous_coordinate_gives_the_bias_blocks():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=gen)
    A = covariance(homogeneous(x))
    assert A.shape == (6, 6)
    assert rel(A[:5, 5], x.reshape(-1, 5).sum(0)) < 1e-6
    assert A[5, 5].item() == 12


def test_covariance_rejects_a_wrong_out():
    with pytest.raises(ValueError, match="out must have shape"):
        covariance(torch.ones(2, 3), out=torch.zeros(2, 2))


def test_token_counts_are_the_diagonal_activation_factor():
    idx = torch.tensor([[1, 3, 3, 0], [3, 2, 0, 0]])
    onehot = torch.nn.functional.one_hot(idx, 5).double().reshape(-1, 5)
    counts = token_counts(idx, 5)
    assert torch.equal(torch.diag(counts), onehot.T @ onehot)
    assert token_counts(idx, 5, padding_idx=0)[0] == 0
    with pytest.raises(ValueError, match="indices must lie"):
        token_counts(idx, 3)


# ---------------------------------------------------------------------------------------------
# Eigendecomposition


def test_kron_eigh_reconstructs_each_factor_batched_across_equal_sizes():
    gen = torch.Generator().manual_seed(2)
    factors = [spd(5, gen), spd(7, gen), spd(5, gen).float(), spd(3, gen, rank=1)]
    factors[0] = factors[0] + 1e-3 * torch.triu(torch.ones(5, 5, dtype=torch.float64), 1)  # asymmetric
    for f, (e, basis) in zip(factors, kron_eigh(factors)):
        Q = basis.dense()
        sym = (f.double() + f.double().T) / 2
        assert e.dtype == torch.float64 and Q.dtype == torch.float64
        assert rel(Q @ torch.diag(e) @ Q.T, sym) < 1e-10
        assert rel(Q.T @ Q, torch.eye(f.shape[0], dtype=torch.float64)) < 1e-12
        assert rel(e, torch.linalg.eigvalsh(sym)) < 1e-10


def test_kron_eigh_blocks_wide_factors_and_decomposes_the_block_diagonal():
    gen = torch.Generator().manual_seed(3)
    f = spd(11, gen)
    assert block_sizes(11, 4) == [4, 4, 3] and block_sizes(11, None) == [11] and block_sizes(11, 11) == [11]
    e, basis = kron_eigh([f], block_width=4)[0]
    assert [q.shape[0] for q in basis.blocks] == [4, 4, 3]
    Q = basis.dense()
    mask = torch.block_diag(*[torch.ones(w, w, dtype=torch.float64) for w in (4, 4, 3)])
    assert rel(Q @ torch.diag(e) @ Q.T, f * mask) < 1e-10
    assert rel(Q.T @ Q, torch.eye(11, dtype=torch.float64)) < 1e-12
    x = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    assert rel(basis.rotate(x), x @ Q) < 1e-12
    assert rel(basis.rotate(x, transpose=True), x @ Q.T) < 1e-12


def test_kron_eigh_diagonal_factor_has_the_identity_basis():
    counts = torch.tensor([3.0, 0.0, 1.0])
    e, basis = kron_eigh([counts])[0]
    assert torch.equal(e, counts.double()) and basis.blocks == ()
    x = torch.randn(2, 3)
    assert basis.rotate(x) is x


def test_kron_eigh_rejects_non_square_factors():
    with pytest.raises(ValueError, match="factor 0 must be square"):
        kron_eigh([torch.zeros(2, 3)])


# ---------------------------------------------------------------------------------------------
# Rotated per-example gradients and the EK-FAC correction


@pytest.mark.parametrize("T,d_in,d_out,block_width", [(1, 6, 4, None), (5, 6, 4, None), (40, 6, 4, None),
                                                      (5, 9, 7, 4)])
def test_rotated_gradients_match_naive_in_every_association_order(T, d_in, d_out, block_width):
    gen = torch.Generator().manual_seed(T)
    A, D = torch.randn(5, T, d_in, generator=gen), torch.randn(5, T, d_out, generator=gen)
    ba, bs = random_basis(d_in, gen, block_width), random_basis(d_out, gen, block_width)
    ref = naive_rotated(A, D, ba.dense(), bs.dense())
    assert rel(rotated_gradients(A, D, ba.astype(torch.float32), bs.astype(torch.float32)), ref) < 1e-5
    assert rel(rotated_gradients(A, D), torch.einsum("bto,bti->boi", D.double(), A.double())) < 1e-5
    assert rotation_plan(T, ba, bs) == (T <= d_out, T <= d_in)


def naive_lambda(A, D, Qa, Qs):
    return naive_rotated(A, D, Qa, Qs).square().sum(0)


@pytest.mark.parametrize("T", [1, 4, 30])
def test_ekfac_correction_matches_naive_linear_with_sequence_dims(T):
    gen = torch.Generator().manual_seed(10 + T)
    lin = nn.Linear(6, 5)
    x = torch.randn(7, T, 6, generator=gen)
    plan = make_plan(lin)
    with Capture(plan) as cap:
        y = lin(x)
    torch.autograd.grad((y.tanh() * torch.randn(y.shape, generator=gen)).sum(), list(lin.parameters()))
    A, D = cap.handlers[""].kron()
    A = homogeneous(A)
    ba, bs = random_basis(7, gen), random_basis(5, gen)
    ref = naive_lambda(A, D, ba.dense(), bs.dense())
    out = ekfac_correction(A, D, ba.astype(torch.float32), bs.astype(torch.float32), memory_budget=4096)
    assert rel(out, ref) < 1e-5
    # the transposed rotation (Q_S G Q_A^T, a bug found in a peer library) is caught by this reference
    wrong = (bs.dense() @ torch.einsum("bto,bti->boi", D.double(), A.double()) @ ba.dense().T).square().sum(0)
    assert rel(wrong, ref) > 1e-2


def test_ekfac_correction_matches_naive_conv2d_with_blocked_bases():
    gen = torch.Generator().manual_seed(20)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    x = torch.randn(5, 3, 9, 9, generator=gen)
    with Capture(make_plan(conv)) as cap:
        y = conv(x)
    torch.autograd.grad((y.sin()).sum(), [conv.weight])
    A, D = cap.handlers[""].kron()
    assert A.shape == (5, 25, 27) and D.shape == (5, 25, 4)
    ba, bs = random_basis(27, gen, block_width=10), random_basis(4, gen)
    ref = naive_lambda(A, D, ba.dense(), bs.dense())
    assert rel(ekfac_correction(A, D, ba.astype(torch.float32), bs.astype(torch.float32)), ref) < 1e-5
    # per-example gradients from the capture are the conv's weight gradients
    G = rotated_gradients(A, D)
    gw = torch.autograd.grad(conv(x[:1]).sin().sum(), conv.weight)[0]
    assert rel(G[0], gw.reshape(4, -1)) < 1e-5


def test_ekfac_correction_rejects_mismatched_shapes():
    b = Basis(3)
    with pytest.raises(ValueError, match="A must be"):
        ekfac_correction(torch.zeros(2, 1, 3), torch.zeros(3, 1, 2), b, Basis(2))
    with pytest.raises(ValueError, match="do not match"):
        ekfac_correction(torch.zeros(2, 1, 3), torch.zeros(2, 1, 2), b, Basis(5))


# ---------------------------------------------------------------------------------------------
# Score kernels


@pytest.mark.parametrize("T", [1, 4, 6])  # 4: d_out < T <= d_in, the A side rotated after the product
def test_kron_inner_and_self_inner_match_naive(T):
    gen = torch.Generator().manual_seed(30 + T)
    A, D = torch.randn(9, T, 5, generator=gen), torch.randn(9, T, 3, generator=gen)
    W = torch.randn(4, 3, 5, generator=gen)
    M = torch.rand(3, 5, generator=gen)
    ba, bs = random_basis(5, gen), random_basis(3, gen)
    R = naive_rotated(A, D, ba.dense(), bs.dense())
    b32 = (ba.astype(torch.float32), bs.astype(torch.float32))
    ref = torch.einsum("boi,joi->bj", R, W.double())
    assert rel(kron_inner(A, D, W, *b32, memory_budget=4096), ref) < 1e-5
    assert rel(kron_inner(A, D, W, *b32, memory_budget=4 * 9 * 5), ref) < 1e-5  # one output row per block
    G = torch.einsum("bto,bti->boi", D.double(), A.double())
    assert rel(kron_inner(A, D, W), torch.einsum("boi,joi->bj", G, W.double())) < 1e-5
    assert rel(kron_self_inner(A, D, M, *b32, memory_budget=4096), (R.square() * M.double()).sum((1, 2))) < 1e-5


def test_sparse_rows_kernels_match_dense_embedding_gradients():
    gen = torch.Generator().manual_seed(40)
    V, d, B = 7, 3, 4
    rows = torch.tensor([0, 2, 5])
    R = torch.randn(B, 3, d, generator=gen)
    qrows = torch.tensor([1, 2, 5, 6])
    Wq = torch.randn(2, 4, d, generator=gen)
    bs = random_basis(d, gen)
    Q = bs.dense()
    dense = torch.zeros(B, V, d, dtype=torch.float64)
    dense[:, rows] = R.double() @ Q
    Wd = torch.zeros(2, V, d, dtype=torch.float64)
    Wd[:, qrows] = Wq.double()
    got = sparse_rows_inner(rows, R, qrows, Wq, bs.astype(torch.float32))
    assert rel(got, torch.einsum("bvd,jvd->bj", dense, Wd)) < 1e-5
    M = torch.rand(d, V, generator=gen)
    assert rel(sparse_rows_self_inner(rows, R, M, bs.astype(torch.float32)),
               (dense.square() * M.T.double()).sum((1, 2))) < 1e-5
    none = sparse_rows_inner(torch.tensor([3]), R[:, :1], qrows, Wq)
    assert torch.equal(none, torch.zeros(B, 2))


def test_positions_major_layout_gives_the_same_results_without_gathering():
    gen = torch.Generator().manual_seed(50)
    x = torch.randn(3, 5, 7, generator=gen)  # [B, d, T] storage
    view = x.transpose(1, 2)  # [B, T, d] positions-major, as the conv capture returns
    dense = view.contiguous()
    assert rel(covariance(view), covariance(dense)) < 1e-6
    hv = homogeneous(view)
    assert hv.stride(1) == 1 and torch.equal(hv, homogeneous(dense))
    basis = random_basis(5, gen, block_width=3).astype(torch.float32)
    assert rel(basis.rotate(view), basis.rotate(dense)) < 1e-6
    assert rel(basis.rotate(view, transpose=True), basis.rotate(dense, transpose=True)) < 1e-6


# ---------------------------------------------------------------------------------------------
# Convolution activation factor without unfolding


def unfolded_covariance(conv, x, bias):
    with Capture(make_plan(conv)) as cap:
        conv(x)
    A = cap.handlers[""]._unfold(x)
    return covariance(homogeneous(A) if bias else A)


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 7)),  # "same"
    (nn.Conv2d(2, 3, 5), (2, 2, 7, 6)),  # "valid": kernel rows reach different input rows
    (nn.Conv2d(2, 3, 3, padding=2), (2, 2, 4, 5)),  # output larger than input
    (nn.Conv2d(2, 3, (3, 2), padding=(1, 0)), (3, 2, 5, 4)),  # rectangular kernel
    (nn.Conv2d(2, 2, 3, padding=1), (2, 2, 1, 1)),  # image smaller than the kernel
    (nn.Conv2d(2, 2, 3, padding="valid"), (2, 2, 3, 3)),
    (nn.Conv1d(3, 2, 5, padding=2), (2, 3, 9)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_covariance_equals_the_unfolded_covariance(conv, shape, bias):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(60))
    assert conv_supported(conv)
    assert rel(conv_covariance(x, conv, bias), unfolded_covariance(conv, x, bias)) < 1e-5


def test_conv_covariance_applies_only_to_stride_one_convolutions():
    assert not conv_supported(nn.Conv2d(2, 2, 3, stride=2))
    assert not conv_supported(nn.Conv2d(2, 2, 3, dilation=2))
    assert not conv_supported(nn.Conv2d(2, 2, 3, groups=2))
    assert not conv_supported(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert not conv_supported(nn.Conv2d(2, 2, 1))
    assert not conv_supported(nn.Conv2d(2, 2, 2, padding="same"))
    with pytest.raises(ValueError, match="stride-1"):
        conv_covariance(torch.zeros(1, 2, 4, 4), nn.Conv2d(2, 2, 3, stride=2))


@pytest.mark.parametrize("d", [200, 700])  # blocks of NARROW_GRAM_BLOCK, of GRAM_BLOCK
def test_covariance_of_wide_factors_is_the_mirrored_block_triangle(d):
    assert gram_block(d) is not None and gram_block(128) is None
    gen = torch.Generator().manual_seed(70)
    x = torch.randn(40, 3, d, generator=gen)
    ref = x.reshape(-1, d).double().T @ x.reshape(-1, d).double()
    got = covariance(x)
    assert rel(got, ref) < 1e-5 and torch.equal(got, got.T)
    assert rel(covariance(x, out=torch.eye(d)), ref + torch.eye(d, dtype=torch.float64)) < 1e-5  # accumulates
    assert rel(covariance(x.transpose(1, 2).contiguous().transpose(1, 2)), ref) < 1e-5  # positions-major
    # unmirrored calls add up in the block upper triangle, and mirror_upper completes the sum
    out = covariance(x[:20], mirror=False)
    assert torch.equal(out.tril(-gram_block(d)), torch.zeros(d, d))
    covariance(x[20:], out=out, mirror=False)
    assert rel(mirror_upper(out), ref) < 1e-5 and torch.equal(out, out.T)
    assert torch.equal(mirror_upper(got.clone()), got)  # a mirrored sum is left as it is


# ---------------------------------------------------------------------------------------------
# Per-example convolution gradients without unfolding


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv2d(3, 4, 3, stride=2, padding=1), (5, 3, 9, 8)),
    (nn.Conv2d(2, 3, (3, 2), dilation=(2, 1), padding=(2, 0)), (4, 2, 8, 6)),
    (nn.Conv1d(3, 2, 5, stride=3, padding=2), (4, 3, 17)),
    (nn.Conv2d(1, 2, 2), (3, 1, 10, 10)),  # T = 81 > d_in: the output side is rotated after the product
])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_gradients_equal_unfolded_products_and_rotate_like_the_naive_reference(conv, shape, bias):
    gen = torch.Generator().manual_seed(80)
    x = torch.randn(*shape, generator=gen)
    with Capture(make_plan(conv)) as cap:
        y = conv(x)
    torch.autograd.grad((y.sin()).sum(), [conv.weight])
    r = cap.handlers[""].records[0]
    A, D = cap.handlers[""].kron()
    A = homogeneous(A) if bias else A
    G = torch.einsum("bto,bti->boi", D.double(), A.double())
    assert rel(conv_example_gradients(r.inputs, r.grad_out, conv, bias), G) < 1e-5
    d_in, d_out = A.shape[2], D.shape[2]
    for width in (None, 3):
        ba, bs = random_basis(d_in, gen, width), random_basis(d_out, gen, width)
        got = conv_rotated_gradients([r.inputs, r.inputs], [r.grad_out, r.grad_out], conv, bias,
                                     ba.astype(torch.float32), bs.astype(torch.float32))
        assert rel(got, 2 * bs.dense().T @ G @ ba.dense()) < 1e-5  # two calls add up
    assert not conv_grad_supported(nn.Conv2d(2, 2, 3, groups=2))
    assert not conv_grad_supported(nn.Conv2d(2, 2, 3, padding="same"))


def test_eigh_backends_agree(monkeypatch):
    gen = torch.Generator().manual_seed(90)
    stack = [spd(9, gen), spd(9, gen)]
    first = _eigh([m.clone() for m in stack])  # SciPy's dsyevd when threadpoolctl is there
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails: torch.linalg.eigh
    second = _eigh([m.clone() for m in stack])
    for m, (e1, q1), (e2, q2) in zip(stack, first, second):
        assert rel(e1, e2) < 1e-12 and q1.is_contiguous() and q2.is_contiguous()
        assert rel(q1 @ torch.diag(e1) @ q1.T, m) < 1e-12
        assert rel(q2 @ torch.diag(e2) @ q2.T, m) < 1e-12


def test_kron_eigh_in_float32_is_backward_stable_and_returns_float64():
    gen = torch.Generator().manual_seed(4)
    factors = [spd(40, gen), spd(40, gen), spd(9, gen, rank=3)]
    for f, (e, basis), (e64, _) in zip(factors, kron_eigh(factors, dtype=torch.float32), kron_eigh(factors)):
        Q = basis.dense()
        assert e.dtype == torch.float64 and Q.dtype == torch.float64
        top = float(e64.abs().max())
        # a float32 decomposition of f: residual and orthogonality at float32 rounding
        assert float((Q @ torch.diag(e) @ Q.T - f).abs().max()) < 1e-5 * top
        assert float((Q.T @ Q - torch.eye(f.shape[0], dtype=torch.float64)).abs().max()) < 1e-5
        assert float((e - e64).abs().max()) < 1e-5 * top
    with pytest.raises(ValueError, match="dtype must be one of"):
        kron_eigh(factors, dtype=torch.float16)
