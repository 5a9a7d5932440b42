"""TracIn: exact against autograd, sketched against exact, sign, learning rates required."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import attrkernels as ak
from attrkernels.tasks import Checkpoint, Classification


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data(n=30, n_test=6, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, d, generator=g)
    y = torch.randint(0, c, (n + n_test,), generator=g)
    return (x[:n], y[:n]), (x[n:], y[n:])


def model_and_checkpoints():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    states = []
    for scale in (1.0, 0.7):
        states.append({k: v * scale for k, v in model.state_dict().items()})
    return model, [Checkpoint(states[0], 1, 0.3), Checkpoint(states[1], 2, 0.05)]


def batches(x, y, size=8):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def autograd_reference(model, checkpoints, x, y, xt, yt):
    task = Classification()
    out = torch.zeros(x.shape[0], xt.shape[0], dtype=torch.float64)
    for ckpt in checkpoints:
        model.load_state_dict(ckpt.state_dict)

        def grads(fn, xs, ys):
            rows = []
            for i in range(xs.shape[0]):
                g = torch.autograd.grad(fn(model, (xs[i:i + 1], ys[i:i + 1])).sum(), list(model.parameters()))
                rows.append(torch.cat([v.reshape(-1) for v in g]))
            return torch.stack(rows).double()

        out -= ckpt.lr * grads(task.loss, x, y) @ grads(task.measure, xt, yt).T
    return out


def test_exact_equals_autograd_sum_over_checkpoints():
    (x, y), (xt, yt) = data()
    model, ckpts = model_and_checkpoints()
    want = autograd_reference(model, ckpts, x, y, xt, yt)
    model, ckpts = model_and_checkpoints()
    scores = ak.TracIn(model, Classification(), verbose=False).fit(batches(x, y), ckpts).score(batches(xt, yt))
    assert scores.shape == (30, 6) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), want, rtol=1e-4, atol=1e-5)
    # learning_rates= overrides / supplies the rates for plain state dicts
    plain = ak.TracIn(model, Classification(), verbose=False).fit(
        batches(x, y), [c.state_dict for c in ckpts], learning_rates=[c.lr for c in ckpts])
    torch.testing.assert_close(plain.score(batches(xt, yt)), scores)


@pytest.mark.parametrize("mode", ["dense", "factored"])
def test_sketched_approximates_exact_and_is_deterministic(mode):
    (x, y), (xt, yt) = data()
    model, ckpts = model_and_checkpoints()
    exact = ak.TracIn(model, Classification(), verbose=False).fit(batches(x, y), ckpts).score(batches(xt, yt))
    sketched = ak.TracIn(model, Classification(), k=2048, mode=mode, seed=3, verbose=False)
    first = sketched.fit(batches(x, y), ckpts).score(batches(xt, yt))
    assert torch.equal(first, sketched.score(batches(xt, yt)))
    assert np.corrcoef(first.flatten().numpy(), exact.flatten().numpy())[0, 1] > 0.9


def test_sign_on_a_duplicate():
    (x, y), (xt, yt) = data(seed=1)
    x, y = torch.cat([x, xt[:1]]), torch.cat([y, yt[:1]])
    model, ckpts = model_and_checkpoints()
    scores = ak.TracIn(model, Classification(), verbose=False).fit(batches(x, y), ckpts).score(batches(xt, yt))
    assert scores[-1, 0] > 0  # a gradient step on a copy of the test point raises its margin


def test_learning_rates_are_required():
    (x, y), _ = data()
    model, ckpts = model_and_checkpoints()
    method = ak.TracIn(model, Classification(), verbose=False)
    with pytest.raises(ValueError, match="needs the learning rate of every checkpoint"):
        method.fit(batches(x, y), [c.state_dict for c in ckpts])
    with pytest.raises(ValueError, match="needs the learning rate"):
        method.fit(batches(x, y))
    with pytest.raises(ValueError, match="one rate per checkpoint: got 1 for 2"):
        method.fit(batches(x, y), [c.state_dict for c in ckpts], learning_rates=[0.1])
    with pytest.raises(ValueError, match="learning rate of checkpoint 0 must be a finite number > 0"):
        method.fit(batches(x, y), [c.state_dict for c in ckpts], learning_rates=[-0.1, 0.1])
    with pytest.raises(RuntimeError, match="fit"):
        ak.TracIn(model, Classification()).score(batches(x, y))
    with pytest.raises(ValueError, match="k"):
        ak.TracIn(model, Classification(), k=0)
