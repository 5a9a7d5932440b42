"""ak.SOURCE against references: the dense SOURCE formula (``unrolled_scores``, float64, explicit
curvatures, learning-rate sums and per-example gradients from autograd), autograd through a
least-squares training loop, the influence function with damping 1/s, and the factors' own
definitions. Tolerances: 1e-4 relative to the largest entry for float32 pipelines against
float64 references; the discretisation tolerances are stated where they are used."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import attrkernels as ak
from attrkernels.methods.source import backward_fn, segment_fn, unrolled_scores
from attrkernels.store import StoreMismatch
from test_ekfac import LAYERS, Loader, NetTask, blobs, make_net, net_data, per_example

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# F_seg and F_back


def test_segment_functions_are_stable_with_the_right_limits():
    s = 3.0
    sigma = torch.tensor([0.0, 1e-300, 1e-12, 1e-3, 1.0, 50.0, 1e4, 1e300], dtype=torch.float64)
    f = segment_fn(sigma, s)
    assert torch.isfinite(f).all() and torch.isfinite(backward_fn(sigma, s)).all()
    assert f[0] == s and f[1] == s and abs(f[2] / s - 1) < 1e-11  # limit s at 0, no cancellation
    assert abs(f[3] - (1 - np.exp(-3e-3)) / 1e-3) < 1e-12 and abs(f[4] - (1 - np.exp(-3.0))) < 1e-15
    assert f[5] == 1 / 50.0 and f[6] == 1e-4 and f[7] == 1e-300  # 1 / sigma for large s sigma
    assert torch.equal(backward_fn(sigma, s)[[0, 7]], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert abs(backward_fn(sigma, s)[4] - np.exp(-3.0)) < 1e-15
    f32 = segment_fn(torch.tensor([0.0, 1e-30, 1e-8, 1e30]), 1e6)  # float32: no NaN / inf either
    assert torch.isfinite(f32).all() and f32[0] == 1e6 and f32[1] == 1e6 and f32[3] == 1e-30
    # d/ds F_seg = F_back: F_seg is the integral of exp(-t sigma) over [0, s]
    h = 1e-6
    assert torch.allclose((segment_fn(sigma[3:6], s + h) - segment_fn(sigma[3:6], s - h)) / (2 * h),
                          backward_fn(sigma[3:6], s), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Least squares trained by full-batch gradient descent


class LeastSquares(ak.tasks.Task):
    """Batches (x, y); loss 1/2 (f(x) - y)^2, measurement f(x). The sampled loss f(x) r with
    r = +-1 has output gradient r, r^2 = 1: its Fisher (EK-FAC's too) is exactly the Hessian
    mean [x, 1][x, 1]^T."""

    def loss(self, model, batch):
        x, y = batch
        return 0.5 * (model(x)[:, 0] - y).square()

    def measure(self, model, batch):
        return model(batch[0])[:, 0]

    def sampled_loss(self, model, batch, generator):
        sign = torch.randint(0, 2, (batch[0].shape[0],), generator=generator).to(torch.float32) * 2 - 1
        return model(batch[0])[:, 0] * sign


def lsq_problem(n=12, d=3, n_test=4):
    gen = torch.Generator().manual_seed(0)
    x, y, xq = torch.randn(n, d, generator=gen), torch.randn(n, generator=gen), torch.randn(n_test, d, generator=gen)
    a = torch.cat([x, torch.ones(n, 1)], 1).double()
    aq = torch.cat([xq, torch.ones(n_test, 1)], 1).double()
    return x, y, xq, a, aq


def gd_trajectory(a, y, lr, steps, momentum=0.0):
    """Full-batch heavy-ball GD on the mean loss + eps . losses from theta = 0 (float64): the
    parameters after every step, and d f_q(theta_T) / d eps [n, n_test] by autograd through the loop."""
    eps = torch.zeros(a.shape[0], dtype=torch.float64, requires_grad=True)
    theta, velocity, out = torch.zeros(a.shape[1], dtype=torch.float64), 0, []
    for _ in range(steps):
        r = a @ theta - y.double()
        velocity = momentum * velocity + (a * r[:, None]).mean(0) + (eps * r) @ a
        theta = theta - lr * velocity
        out.append(theta.detach())
    return out, lambda aq: torch.stack([torch.autograd.grad(f, eps, retain_graph=True)[0] for f in aq @ theta], 1)


def lsq_checkpoints(thetas):
    return [{"weight": t[None, :-1].float(), "bias": t[-1:].float()} for t in thetas]


def lsq_model(d=3):
    torch.manual_seed(0)
    return nn.Linear(d, 1)


def test_least_squares_one_segment_per_step_is_the_unrolled_derivative():
    x, y, xq, a, aq = lsq_problem()
    hessian = a.T @ a / a.shape[0]
    train, test = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)], [(xq, torch.zeros(4))]
    errors = []
    for lr, steps in ((0.05, 40), (0.025, 80)):
        thetas, unrolled = gd_trajectory(a, y, lr, steps)
        exact = unrolled(aq)
        grads = [a * (a @ t - y.double())[:, None] for t in thetas]  # at each segment's checkpoint
        dense = unrolled_scores([hessian] * steps, [lr] * steps, grads, aq)
        errors.append(rel(dense, exact))
        if steps == 40:  # the EK-FAC pipeline computes the same formula (its curvature is exact here)
            m = ak.SOURCE(lsq_model(), LeastSquares(), segments=steps, verbose=False)
            got = m.fit(train, lsq_checkpoints(thetas), [lr] * steps).score(test)
            assert got.shape == (12, 4) and rel(got, dense) < 1e-5
    # SOURCE replaces I - lr H by exp(-lr H) and takes gradients at the end of each step: a
    # first-order discretisation of the exact derivative, exact as lr -> 0 with lr * steps fixed
    # (2.5% at lr = 0.05, lr sigma_max = 0.09; half that at lr = 0.025)
    assert errors[0] < 0.03 and 1.8 < errors[0] / errors[1] < 2.2, errors


def test_one_long_segment_is_the_influence_function_with_damping_one_over_s():
    x, y, xq, a, aq = lsq_problem()
    hessian = a.T @ a / a.shape[0]  # eigenvalues in [0.32, 1.76]
    lr, steps = 0.1, 2000
    s = lr * steps
    thetas, _ = gd_trajectory(a, y, lr, steps)
    g = a * (a @ thetas[-1] - y.double())[:, None]
    influence = -g @ torch.linalg.solve(hessian + torch.eye(4, dtype=torch.float64) / s, aq.T)
    # per eigenvalue sigma the two differ by the factor (1 - exp(-s sigma)) (1 + 1 / (s sigma)):
    # here within 1 / (s sigma_min) = 1.6%
    assert rel(unrolled_scores([hessian], [s], [g], aq), influence) < 0.016
    train, test = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)], [(xq, torch.zeros(4))]
    got = ak.SOURCE(lsq_model(), LeastSquares(), segments=1, verbose=False).fit(
        train, lsq_checkpoints(thetas[-1:]), [s]).score(test)
    ekfac = ak.EKFAC(lsq_model(), LeastSquares(), damping=1 / s, verbose=False).fit(
        train, lsq_checkpoints(thetas[-1:])).score(test)
    assert rel(got, influence) < 0.016 and rel(ekfac, influence) < 1e-4


def test_one_checkpoint_shares_ekfacs_factors_and_differs_only_by_the_function():
    # L = C = 1: the same seeded Fisher passes as EK-FAC's, so the same factors; per eigen
    # direction F_seg(sigma) (sigma + 1/s) = (1 - exp(-s sigma)) (1 + 1 / (s sigma)) lies in
    # [1, 1.2985] (maximum at s sigma = 1.79), so self-influence ratios lie there too
    x, y = blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    task = NegLossBlobs()
    train = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20)]
    states, _ = trajectory(model, task, train, lr=0.3, checkpoints=1, every=90)
    s = 10.0
    src = ak.SOURCE(model, task, segments=1, verbose=False).fit(train, states, [s])
    ekfac = ak.EKFAC(model, task, damping=1 / s, verbose=False).fit(train, states)
    for name in ("0", "2"):
        assert torch.equal(src.fitted_segments[0].factors[name].lam, ekfac.factors[0][name].lam)
    ratio = src.self_influence() / ekfac.self_influence()
    assert bool((ratio > 1 - 1e-5).all()) and bool((ratio < 1.2985 + 1e-5).all()) and ratio.max() > 1.01


def test_momentum_divides_the_segment_times():
    x, y, xq, a, aq = lsq_problem()
    train, test = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)], [(xq, torch.zeros(4))]
    beta, lr, steps = 0.75, 0.01, 240
    thetas, unrolled = gd_trajectory(a, y, lr, steps, momentum=beta)
    ckpts = lsq_checkpoints(thetas[59::60])
    heavy = ak.SOURCE(lsq_model(), LeastSquares(), segments=4, momentum=beta, verbose=False)
    heavy = heavy.fit(train, ckpts, [60 * lr] * 4).score(test)
    plain = ak.SOURCE(lsq_model(), LeastSquares(), segments=4, verbose=False)
    assert rel(heavy, plain.fit(train, ckpts, [60 * lr / (1 - beta)] * 4).score(test)) < 1e-6
    # the heavy-ball run's exact derivative: s / (1 - beta) tracks it, s alone does not
    exact = unrolled(aq)
    unscaled = ak.SOURCE(lsq_model(), LeastSquares(), segments=4, verbose=False).fit(train, ckpts, [60 * lr] * 4)
    assert rel(heavy, exact) < 0.06 and rel(unscaled.score(test), exact) > 0.2  # 3.5% and 28%


# ---------------------------------------------------------------------------------------------
# The EK-FAC pipeline against the dense formula on its own curvature


def trajectory(model, task, batches, lr, checkpoints, every):
    """SGD over the batches, a checkpoint every ``every`` steps: (state dicts, lr_sums)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    states, step = [], 0
    while len(states) < checkpoints:
        for batch in batches:
            opt.zero_grad()
            task.loss(model, batch).mean().backward()
            opt.step()
            step += 1
            if step % every == 0 and len(states) < checkpoints:
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states, [lr * every] * checkpoints


def dense_curvature(factors, weight_decay):
    """Block-diagonal (over LAYERS) (Q_S (x) Q_A) diag(vec Lambda) (Q_S (x) Q_A)^T + wd I, float64."""
    blocks = []
    for name in LAYERS:
        f = factors[name]
        K = torch.kron(f.basis_s.dense(), f.basis_a.dense())
        blocks.append(K @ torch.diag(f.lam.double().reshape(-1)) @ K.T)
    H = torch.block_diag(*blocks)
    return H + weight_decay * torch.eye(H.shape[0], dtype=torch.float64)


def flat(grads):
    return torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in LAYERS], 1)


@pytest.fixture(scope="module")
def net_run():
    torch.manual_seed(0)
    model, task = make_net(), NetTask()
    train, test = Loader(net_data(16, 1), 16), Loader(net_data(5, 2, batch=5), 5)
    states, sums = trajectory(model, task, train.batches, lr=0.2, checkpoints=4, every=2)
    return model, task, train, test, states, sums


def test_ekfac_source_equals_the_dense_formula_on_its_own_curvature(net_run):
    model, task, train, test, states, sums = net_run
    momentum, wd = 0.3, 0.01
    m = ak.SOURCE(model, task, segments=2, momentum=momentum, weight_decay=wd, fisher="empirical", verbose=False)
    got = m.fit(train, states, sums).score(test)
    grads = []
    for state in states:
        model.load_state_dict(state)
        grads.append(per_example(model, task.loss, train.batches))
    model.load_state_dict(states[-1])
    query = flat(per_example(model, task.measure, test.batches))
    for l, seg in enumerate(m.fitted_segments):  # the segment's factors from their definitions
        each = [ak.EKFAC(model, task, fisher="empirical", verbose=False).fit(train, [states[c]]).factors[0]
                for c in seg.checkpoints]
        for name in LAYERS:
            f = seg.factors[name]
            assert rel(f.A, sum(e[name].A for e in each) / 2) < 1e-12
            assert rel(f.S, sum(e[name].S for e in each) / 2) < 1e-12
            Qa, Qs = f.basis_a.dense(), f.basis_s.dense()
            lam = sum((Qs.T @ grads[c][name] @ Qa).square().mean(0) for c in seg.checkpoints) / 2
            assert rel(f.lam, lam) < 1e-4, (l, name)
    ref = unrolled_scores([dense_curvature(seg.factors, wd) for seg in m.fitted_segments],
                          [(sums[2 * l] + sums[2 * l + 1]) / (1 - momentum) for l in range(2)],
                          [(flat(grads[2 * l]) + flat(grads[2 * l + 1])) / 2 for l in range(2)], query)
    assert got.shape == (16, 5) and got.dtype == torch.float32
    assert rel(got, ref) < 1e-4
    # both query sides ran: layers with T > 1 score in parameter space, the others in the eigenbasis
    assert m.query_modes == [{"emb": "eigenbasis", "seq": "parameters", "conv": "parameters",
                              "conv2": "parameters", "head": "eigenbasis"}] * 2
    assert torch.equal(model.state_dict()["head.weight"], states[-1]["head.weight"])


class NegLoss(NetTask):
    def measure(self, model, batch):
        return -self.loss(model, batch)


def test_self_influence_is_the_diagonal_of_scores_with_measurement_minus_loss(net_run):
    model, _, train, _, states, sums = net_run
    m = ak.SOURCE(model, NegLoss(), segments=2, fisher="empirical", verbose=False).fit(train, states, sums)
    si = m.self_influence()
    assert si.shape == (16,)
    assert rel(si, torch.diagonal(m.score(train))) < 1e-4


# ---------------------------------------------------------------------------------------------
# Sign, store, out


class NegLossBlobs(ak.tasks.Classification):
    def measure(self, model, batch):
        return -self.loss(model, batch)


def test_sign_duplicate_raises_and_flipped_label_lowers_the_margin():
    x, y = blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    task = ak.tasks.Classification()
    train = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20)]
    states, sums = trajectory(model, task, train, lr=0.3, checkpoints=6, every=30)
    test = [(torch.stack([x[0], x[0]]), torch.tensor([2, 0]))]
    s = ak.SOURCE(model, task, segments=3, verbose=False).fit(train, states, sums).score(test)
    assert s[0, 0] > 0 and int(s[:, 0].argmax()) == 0  # its duplicate helps it most
    assert s[0, 1] < 0 and int(s[:, 1].argmin()) == 0  # and hurts the flipped label most


def test_store_resumes_and_loads_instead_of_recomputing(net_run, tmp_path, monkeypatch):
    model, task, train, test, states, sums = net_run
    kw = dict(segments=2, store=tmp_path / "f", verbose=False)
    first = ak.SOURCE(model, task, **kw).fit(train, states, sums).score(test)
    files = sorted(p.name for p in (tmp_path / "f").glob("*.safetensors"))
    assert len(files) == 4 + 2 + 4  # covariances and lambdas per checkpoint, eigen per segment
    (tmp_path / "f" / next(f for f in files if f.startswith("lambda"))).unlink()  # a fit killed before it
    calls = []
    real = ak.methods.ekfac.passes.Passes.correction

    def counted(self, *args, **kwargs):
        calls.append(args[1])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ak.methods.ekfac.passes.Passes, "covariances", lambda *a, **k: pytest.fail("recomputed"))
    monkeypatch.setattr(ak.methods.ekfac.passes.Passes, "correction", counted)
    again = ak.SOURCE(model, task, **kw).fit(train, states, sums)
    assert len(calls) == 1
    assert torch.equal(again.score(test), first)
    assert torch.equal(again.score(test, out=tmp_path / "s.npy"), first)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "s.npy")), first)
    arr = np.full((16, 5), np.nan, dtype=np.float32)
    assert again.score(test, out=arr) is arr and torch.equal(torch.from_numpy(arr), first)
    # other segments over the same checkpoints: the covariances are reused, new bases and Lambdas
    calls.clear()
    ak.SOURCE(model, task, **{**kw, "segments": 1}).fit(train, states, sums)
    assert sorted(calls) == [0, 1, 2, 3]
    with pytest.raises(StoreMismatch, match="strategy"):
        ak.EKFAC(model, task, store=tmp_path / "f", verbose=False).fit(train, states)
