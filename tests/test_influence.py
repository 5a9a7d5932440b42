"""Influence methods on a convex task: leave-one-out retraining, agreement, sign, bad input."""
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attrkernels as ak
from attrkernels.kernels.cg import CGConvergenceWarning
from attrkernels.kernels.lissa import LissaDivergenceError
from attrkernels.tasks import Checkpoint, Classification, margin


pytestmark = pytest.mark.usefixtures("one_torch_thread")


DECAY = 0.05  # L2 coefficient of the training objective, passed as the damping


def logistic_data(n=80, n_test=12, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n + n_test,), generator=g)
    x = centers[y] + torch.randn(n + n_test, d, generator=g, dtype=torch.float64)
    return (x[:n], y[:n]), (x[n:], y[n:])


def fit_logistic(x, y, weights=None, start=None):
    """argmin (1/n) sum_i w_i CE_i + DECAY/2 ||theta||^2 by L-BFGS in float64."""
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], int(y.max()) + 1).double()
    if start is not None:
        model.load_state_dict(start)
    w = torch.ones(x.shape[0], dtype=torch.float64) if weights is None else weights
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        objective = (w * F.cross_entropy(model(x), y, reduction="none")).mean() + DECAY / 2 * sum(
            (p ** 2).sum() for p in model.parameters())
        objective.backward()
        return objective

    opt.step(closure)
    return model


def batches(x, y, size=40):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


@pytest.fixture(scope="module")
def problem():
    (x, y), (xt, yt) = logistic_data()
    model = fit_logistic(x, y)
    explicit = ak.InfluenceExplicit(model, Classification(), damping=DECAY, verbose=False)
    scores = explicit.fit(batches(x, y)).score(batches(xt, yt))
    return x, y, xt, yt, model, scores


def test_explicit_predicts_leave_one_out_retraining(problem):
    x, y, xt, yt, model, scores = problem
    n = x.shape[0]
    with torch.no_grad():
        full = margin(model(xt), yt)
    removed = list(range(0, n, 2))[:30]
    actual, predicted = [], []
    for i in removed:
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0
        retrained = fit_logistic(x, y, w, start=model.state_dict())
        with torch.no_grad():
            actual.append((full - margin(retrained(xt), yt)).numpy())  # effect of including i
        predicted.append(scores[i].double().numpy() / n)
    r = np.corrcoef(np.concatenate(actual), np.concatenate(predicted))[0, 1]
    assert r >= 0.95, r


def test_cg_and_lissa_agree_with_explicit(problem):
    x, y, xt, yt, model, scores = problem
    task = Classification()
    cg = ak.InfluenceCG(model, task, damping=DECAY, tol=1e-7, verbose=False).fit(batches(x, y))
    cg_scores = cg.score(batches(xt, yt))
    assert bool(cg.info[0].converged.all())
    lissa = ak.InfluenceLiSSA(model, task, damping=DECAY, depth=300, verbose=False).fit(batches(x, y))
    lissa_scores = lissa.score(batches(xt, yt))
    for other in (cg_scores, lissa_scores):
        assert np.corrcoef(scores.flatten().numpy(), other.flatten().numpy())[0, 1] >= 0.99
    torch.testing.assert_close(cg_scores, scores, rtol=1e-3, atol=1e-4)
    blocks = ak.InfluenceCG(model, task, damping=DECAY, tol=1e-7, query_batch=5, hvp_chunk=3, verbose=False)
    torch.testing.assert_close(blocks.fit(batches(x, y)).score(batches(xt, yt)), cg_scores, rtol=1e-4, atol=1e-5)
    assert len(blocks.info) == 3  # 12 test examples in blocks of 5


def test_gauss_newton_equals_hessian_for_a_linear_model(problem):
    x, y, xt, yt, model, scores = problem
    gn = ak.InfluenceExplicit(model, Classification(), damping=DECAY, curvature="gauss-newton", verbose=False)
    torch.testing.assert_close(gn.fit(batches(x, y)).score(batches(xt, yt)), scores, rtol=1e-4, atol=1e-5)


def test_sign_on_a_duplicate_and_a_flipped_label():
    (x, y), (xt, yt) = logistic_data(seed=2)
    c = int(y.max()) + 1
    x = torch.cat([x, xt[:2]])
    y = torch.cat([y, torch.stack([yt[0], (yt[1] + 1) % c])])  # a copy of test 0, test 1 with a wrong label
    model = fit_logistic(x, y)
    for method in (ak.InfluenceExplicit, ak.InfluenceCG):
        scores = method(model, Classification(), damping=DECAY, verbose=False).fit(batches(x, y)).score(
            batches(xt, yt))
        assert scores.shape == (x.shape[0], xt.shape[0])
        assert scores[-2, 0] > 0 and int(scores[:, 0].argmax()) == x.shape[0] - 2
        assert scores[-1, 1] < 0 and int(scores[:, 1].argmin()) == x.shape[0] - 1


def test_checkpoints_are_averaged_and_model_weights_restored(problem):
    x, y, xt, yt, model, scores = problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = model.state_dict()
    other = {k: v * 0.5 for k, v in state.items()}
    cg = ak.InfluenceCG(model, Classification(), damping=DECAY, tol=1e-7, verbose=False)
    single = cg.fit(batches(x, y), [Checkpoint(other, 1, 0.1)]).score(batches(xt, yt))
    both = cg.fit(batches(x, y), [state, Checkpoint(other, 1, 0.1)]).score(batches(xt, yt))
    torch.testing.assert_close(both, (scores + single) / 2, rtol=1e-3, atol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def small_mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("method", [ak.InfluenceExplicit, ak.InfluenceCG])
def test_indefinite_hessian_without_damping_suggests_a_damping(method):
    (x, y), (xt, yt) = logistic_data(n=40)
    model = small_mlp()  # untrained: the Hessian of a non-convex model is indefinite here
    with pytest.raises(ValueError, match=r"not positive definite.*Pass damping >= ") as err:
        method(model, Classification(), damping=0.0, verbose=False).fit(batches(x, y)).score(batches(xt, yt))
    suggested = float(re.search(r"damping >= ([0-9.e+-]+)", str(err.value)).group(1))
    scores = method(model, Classification(), damping=suggested, verbose=False).fit(batches(x, y)).score(
        batches(xt, yt))
    assert bool(torch.isfinite(scores).all())


def test_bad_input(problem):
    x, y, xt, yt, model, _ = problem
    task = Classification()
    with pytest.raises(ValueError, match="damping must be >= 0"):
        ak.InfluenceCG(model, task, damping=-0.1)
    with pytest.raises(ValueError, match="curvature must be one of"):
        ak.InfluenceCG(model, task, curvature="fisher")
    with pytest.raises(RuntimeError, match="fit"):
        ak.InfluenceCG(model, task).score(batches(xt, yt))
    with pytest.warns(CGConvergenceWarning, match="did not reach tol"):
        ak.InfluenceCG(model, task, damping=DECAY, tol=1e-12, max_iter=1, verbose=False).fit(
            batches(x, y)).score(batches(xt, yt))
    with pytest.raises(LissaDivergenceError, match="raise scale"):
        ak.InfluenceLiSSA(model, task, damping=DECAY, scale=0.06, depth=50, verbose=False).fit(
            batches(x, y)).score(batches(xt, yt))
    with pytest.raises(ValueError, match="does not match the model"):
        ak.InfluenceCG(model, task).fit(batches(x, y), [{"weight": torch.zeros(1)}])


@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_curvature_products_carry_no_autograd_graph_with_untracked_parameters(curvature):
    # With params= a subset, the other parameters (requires_grad) used to tie every product to an
    # autograd graph of its batch, which block CG's residuals kept alive (memory grew per solve).
    from attrkernels.capture.hooks import make_plan
    from attrkernels.methods.curvature import Curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    plan = make_plan(model, ["2.weight"])
    op = Curvature(model, Classification(), plan, [(x, y)], damping=0.1, curvature=curvature)
    P = torch.randn(plan.total, 3)
    out = op.matvec(P)
    assert not out.requires_grad and out.grad_fn is None
    # the same products as with every parameter frozen (no graph possible)
    for p in model.parameters():
        p.requires_grad_(False)
    model[2].weight.requires_grad_(True)
    assert torch.allclose(out, op.matvec(P), rtol=1e-5, atol=1e-6)
