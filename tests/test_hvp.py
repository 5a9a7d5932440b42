"""hvp: block products with the damped Hessian / Gauss-Newton matrix against explicit matrices."""
import pytest
import torch
import torch.nn.functional as F

from attrkernels.kernels.hvp import hvp


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mlp_problem(seed=0, n=24, d=3, h=4, c=3, dtype=torch.float64):
    """A tanh MLP (non-zero second derivatives everywhere) with data in 3 batches."""
    g = torch.Generator().manual_seed(seed)
    params = {"w1": torch.randn(h, d, generator=g, dtype=dtype), "b1": torch.randn(h, generator=g, dtype=dtype),
              "w2": torch.randn(c, h, generator=g, dtype=dtype), "b2": torch.randn(c, generator=g, dtype=dtype)}
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    batches = [(x[:10], y[:10]), (x[10:17], y[10:17]), (x[17:], y[17:])]
    return params, x, y, batches


def outputs(params, batch):
    return torch.tanh(batch[0] @ params["w1"].T + params["b1"]) @ params["w2"].T + params["b2"]


def loss_on_outputs(z, batch):
    return F.cross_entropy(z, batch[1], reduction="none")


def loss(params, batch):
    return loss_on_outputs(outputs(params, batch), batch)


def flat(params):
    return torch.cat([v.reshape(-1) for v in params.values()])


def unflat(theta, like):
    out, start = {}, 0
    for k, v in like.items():
        out[k] = theta[start:start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out


def rows_to_dict(V, like):
    """{name: [V, *shape]} from the rows of V [V, p] (parameters flattened in the order of like)."""
    out, start = {}, 0
    for k, v in like.items():
        out[k] = V[:, start:start + v.numel()].reshape(V.shape[0], *v.shape)
        start += v.numel()
    return out


def explicit_hessian(params, x, y):
    like = params
    return torch.autograd.functional.hessian(lambda t: loss(unflat(t, like), (x, y)).mean(), flat(params))


def explicit_gauss_newton(params, x, y):
    """(1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i, the formula for cross-entropy."""
    theta = flat(params)
    n = x.shape[0]
    J = torch.autograd.functional.jacobian(lambda t: outputs(unflat(t, params), (x, y)), theta)  # [n, c, p]
    prob = torch.softmax(outputs(params, (x, y)), 1)
    lam = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, lam, J) / n


@pytest.mark.parametrize("form", ["dict", "flat"])
def test_hessian_products_equal_the_explicit_hessian(form):
    params, x, y, batches = mlp_problem()
    H = explicit_hessian(params, x, y)
    p = H.shape[0]
    V = torch.randn(5, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if form == "dict":
        out = hvp(loss, params, rows_to_dict(V, params), batches, damping=0.3)
        got = torch.cat([out[k].reshape(5, -1) for k in params], 1)
    else:
        got = hvp(lambda t, b: loss(unflat(t, params), b), flat(params), V, batches, damping=0.3)
    want = V @ (H + 0.3 * torch.eye(p, dtype=H.dtype))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_float32_products_match_to_float32_tolerance():
    params, x, y, batches = mlp_problem()
    H = explicit_hessian(params, x, y).float()
    p32 = {k: v.float() for k, v in params.items()}
    b32 = [(bx.float(), by) for bx, by in batches]
    V = torch.randn(7, H.shape[0], generator=torch.Generator().manual_seed(2))
    got = hvp(lambda t, b: loss(unflat(t, p32), b), flat(p32), V, b32, chunk=3)
    torch.testing.assert_close(got, V @ H, rtol=1e-4, atol=1e-5)


def test_gauss_newton_products_equal_the_explicit_formula():
    params, x, y, batches = mlp_problem(seed=3)
    G = explicit_gauss_newton(params, x, y)
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # positive semi-definite
    V = torch.randn(4, G.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = hvp(loss_on_outputs, flat(params), V, batches, damping=0.1,
              outputs=lambda t, b: outputs(unflat(t, params), b))
    torch.testing.assert_close(got, V @ (G + 0.1 * torch.eye(G.shape[0], dtype=G.dtype)), rtol=1e-10, atol=1e-10)


def test_chunking_does_not_change_the_result():
    params, x, y, batches = mlp_problem()
    theta = flat(params)
    V = torch.randn(9, theta.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fn = lambda t, b: loss(unflat(t, params), b)  # noqa: E731
    torch.testing.assert_close(hvp(fn, theta, V, batches, chunk=2), hvp(fn, theta, V, batches), rtol=1e-12, atol=1e-12)


def test_bad_input():
    params, x, y, batches = mlp_problem()
    theta = flat(params)
    fn = lambda t, b: loss(unflat(t, params), b)  # noqa: E731
    V = torch.zeros(2, theta.numel(), dtype=torch.float64)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        hvp(fn, theta, V, batches, damping=-1e-3)
    with pytest.raises(ValueError, match="damping"):
        hvp(fn, theta, V, batches, damping=float("nan"))
    with pytest.raises(ValueError, match=r"vectors must be a tensor \[V, p="):
        hvp(fn, theta, V[:, :-1], batches)
    with pytest.raises(ValueError, match="at least one vector"):
        hvp(fn, theta, V[:0], batches)
    with pytest.raises(ValueError, match="one value per example"):
        hvp(lambda t, b: fn(t, b).sum(), theta, V, batches)
    with pytest.raises(ValueError, match="no examples"):
        hvp(fn, theta, V, [])
    with pytest.raises(ValueError, match="chunk"):
        hvp(fn, theta, V, batches, chunk=0)
    with pytest.raises(ValueError, match=r"vectors\['w1'\]"):
        hvp(loss, params, {k: torch.zeros(2, 1) for k in params}, batches)
    with pytest.raises(ValueError, match="NaN or Inf"):
        hvp(fn, theta, V + float("nan"), batches)
