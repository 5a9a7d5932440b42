"""TRAK: closed form on a linear model, sign, ensembling, resumable store, tiling, bad input."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import attrkernels as ak
from attrkernels.utils.errors import NotPositiveDefiniteError as KernelNotPositiveDefinite  # the one such error
from attrkernels.store import StoreMismatch

sys.path.insert(0, str(Path(__file__).parent))
import trak_worker  # noqa: E402


class BinaryLogistic(ak.tasks.Task):
    """Labels in {0, 1}, one logit s: margin = (2y - 1) s."""

    def measure(self, model, batch):
        x, y = batch
        return model(x).squeeze(1) * (2 * y - 1)

    def loss(self, model, batch):
        return F.softplus(-self.measure(model, batch))

    def out_to_loss(self, model, batch):
        return torch.sigmoid(-self.measure(model, batch))


def loader(x, y, bs=16):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def explicit_scores(model, task, ckpts, train, test, k, seed, kind, damping_ratio=None, damping=None):
    """The formula of methods/trak.py computed directly from materialised features."""
    num, qbar = 0, 0
    for m, sd in enumerate(ckpts):
        model.load_state_dict(sd)
        fz = ak.Featurizer(model, task.measure, k, seed=ak.derive_seed(seed, m), kind=kind)
        Phi, phi = fz(train).double(), fz(test).double()
        K = Phi.T @ Phi
        lam = damping if damping is not None else damping_ratio * torch.trace(K) / min(k, Phi.shape[0])
        num = num + Phi @ torch.linalg.solve(K + lam * torch.eye(k, dtype=K.dtype), phi.T)
        with torch.no_grad():
            qbar = qbar + task.out_to_loss(model, train).double()
    return (qbar / len(ckpts))[:, None] * num / len(ckpts)


def test_closed_form_on_logistic_regression():
    # k = p with a Gaussian (invertible) P: TRAK equals Q * G (G^T G)^{-1} g_test exactly.
    torch.manual_seed(0)
    x, y = torch.randn(60, 5), torch.randint(0, 2, (60,))
    xt, yt = torch.randn(7, 5), torch.randint(0, 2, (7,))
    model, task = nn.Linear(5, 1), BinaryLogistic()
    trak = ak.TRAK(model, task, k=6, kind="gaussian", damping=0.0, verbose=False)
    scores = trak.fit(loader(x, y)).score(loader(xt, yt, 4))
    fz = ak.Featurizer(model, task.measure, 8)
    G, Gt = fz.gradients((x, y)).double(), fz.gradients((xt, yt)).double()
    with torch.no_grad():
        Q = task.out_to_loss(model, (x, y)).double()
    want = Q[:, None] * (G @ torch.linalg.solve(G.T @ G, Gt.T))
    assert scores.shape == (60, 7) and scores.dtype == torch.float32
    assert rel(scores, want) < 1e-4


def test_ensemble_and_default_damping_follow_the_formula():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    task = ak.tasks.Classification()
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    xt, yt = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ckpts = [{k: v + 0.1 * i * torch.randn_like(v) for k, v in model.state_dict().items()} for i in range(3)]
    trak = ak.TRAK(model, task, k=32, seed=7, verbose=False)
    scores = trak.fit(loader(x, y), ckpts).score(loader(xt, yt))
    want = explicit_scores(model, task, ckpts, (x, y), (xt, yt), 32, 7, "rademacher", damping_ratio=2.0)
    assert rel(scores, want) < 1e-4


def trained_classifier(x, y, classes, steps=300):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_sign_duplicated_point_and_flipped_label():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(3, 6, generator=g) * 3
    y = torch.arange(90) % 3
    x = centers[y] + torch.randn(90, 6, generator=g)
    xt = centers[torch.tensor([0, 1, 2])] + torch.randn(3, 6, generator=g)
    yt = torch.tensor([0, 1, 2])
    x[10], y[10] = xt[1], yt[1]          # training example 10 duplicates test example 1
    x[20], y[20] = xt[2] + 0.01, (yt[2] + 1) % 3  # training example 20: test 2 with a wrong label
    model = trained_classifier(x, y, 3, steps=20)  # not yet confident: 1 - p is not ~0
    for ratio in (1e-3, None):  # a near-exact inverse kernel, then the default damping
        kwargs = {} if ratio is None else {"damping_ratio": ratio}
        scores = ak.TRAK(model, ak.tasks.Classification(), k=256, verbose=False, **kwargs).fit(
            loader(x, y)).score(loader(xt, yt))
        assert scores[10, 1] > 0 and (scores[:, 1] > scores[10, 1]).sum() < 5
        assert scores[:, 2].argmin().item() == 20 and scores[20, 2] < 0
        if ratio is not None:  # the near-exact inverse kernel isolates the exact duplicate
            assert scores[:, 1].argmax().item() == 10


def test_tiled_scoring_and_memmap_output(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    xt, yt = torch.randn(6, 4), torch.randint(0, 3, (6,))
    trak = ak.TRAK(model, ak.tasks.Classification(), k=24, verbose=False).fit(loader(x, y))
    full = trak.score(loader(xt, yt))
    tiled = trak.score(loader(xt, yt), tile=7)
    mapped = trak.score(loader(xt, yt), tile=9, out=tmp_path / "scores.npy")
    # equal up to float32 rounding (the GEMM blocks rows differently for other tile sizes)
    assert torch.allclose(full, tiled, rtol=1e-6, atol=1e-6 * full.abs().max().item())
    assert torch.equal(tiled, trak.score(loader(xt, yt), tile=7))  # deterministic
    assert torch.allclose(full, mapped, rtol=1e-6, atol=1e-6 * full.abs().max().item())
    assert np.array_equal(np.load(tmp_path / "scores.npy"), mapped.numpy())


def test_model_weights_are_restored():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = {k: torch.zeros_like(v) + 0.1 for k, v in before.items()}
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    ak.TRAK(model, ak.tasks.Classification(), k=8, verbose=False).fit(loader(x, y), [ckpt]).score(loader(x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# The store


def stored_features(store):
    arr = np.fromfile(Path(store) / "train_0.f32", dtype=np.float32)
    return arr


def test_resume_after_kill_gives_identical_features(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save(trak_worker.model().state_dict(), ckpt)
    # the worker imports this checkout's attrkernels (its script directory, not the cwd, is on its path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    killed = tmp_path / "killed"
    mask = killed / "train_0.f32.done.npy"
    done = trak_worker.kill_mid_run([str(Path(__file__).parent / "trak_worker.py"), str(killed), str(ckpt), "0.3"],
                                    env, mask, 2, 12, 60)
    assert 2 <= done.sum() < len(done), "the worker was not killed mid-fit"

    calls = []
    resumed = ak.TRAK(trak_worker.model(), ak.tasks.Classification(), k=40, store=killed, verbose=False)
    original = resumed._featurizer

    def counting(m):
        f = original(m)
        return lambda batch: calls.append(1) or f(batch)

    resumed._featurizer = counting
    resumed.fit(trak_worker.SlowLoader(0.0), [ckpt])
    assert len(calls) == len(done) - done.sum()  # only the missing chunks were featurised

    fresh = tmp_path / "fresh"
    ak.TRAK(trak_worker.model(), ak.tasks.Classification(), k=40, store=fresh, verbose=False).fit(
        trak_worker.SlowLoader(0.0), [ckpt])
    assert np.array_equal(stored_features(killed), stored_features(fresh))

    calls.clear()
    resumed.fit(trak_worker.SlowLoader(0.0), [ckpt])  # finished: no work
    assert not calls


def test_store_with_other_settings_is_refused(tmp_path):
    model = trak_worker.model()
    x, y = trak_worker.data()
    ak.TRAK(model, ak.tasks.Classification(), k=16, store=tmp_path, verbose=False).fit(loader(x, y))
    with pytest.raises(StoreMismatch, match="k: stored 16, requested 32"):
        ak.TRAK(model, ak.tasks.Classification(), k=32, store=tmp_path, verbose=False).fit(loader(x, y))
    other = {k: v + 1 for k, v in model.state_dict().items()}
    with pytest.raises(StoreMismatch, match="checkpoints"):
        ak.TRAK(model, ak.tasks.Classification(), k=16, store=tmp_path, verbose=False).fit(loader(x, y), [other])


# ---------------------------------------------------------------------------------------------
# Bad input


def test_checkpoint_that_does_not_match_the_model():
    model = trak_worker.model()
    x, y = trak_worker.data()
    bad = {k: v for k, v in model.state_dict().items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"checkpoint 0 does not match the model: missing keys \['2.bias'\]"):
        ak.TRAK(model, ak.tasks.Classification(), k=8, verbose=False).fit(loader(x, y), [bad])
    wrong = dict(model.state_dict(), **{"0.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="shape mismatches 0.weight"):
        ak.TRAK(model, ak.tasks.Classification(), k=8, verbose=False).fit(loader(x, y), [wrong])


def test_empty_loader():
    with pytest.raises(ValueError, match="no examples"):
        ak.TRAK(trak_worker.model(), ak.tasks.Classification(), k=8, verbose=False).fit(
            loader(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)))


def test_test_loader_the_task_cannot_read():
    model = trak_worker.model()
    x, y = trak_worker.data()
    trak = ak.TRAK(model, ak.tasks.Classification(), k=8, verbose=False).fit(loader(x, y))
    with pytest.raises(TypeError, match="Classification expects batches"):
        trak.score(DataLoader(TensorDataset(x), batch_size=8))


def test_shuffled_loader_is_refused():
    x, y = trak_worker.data()
    with pytest.raises(ValueError, match="shuffles"):
        ak.TRAK(trak_worker.model(), ak.tasks.Classification(), k=8, verbose=False).fit(
            DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))


def test_singular_kernel_without_damping():
    x, y = trak_worker.data()
    with pytest.raises(KernelNotPositiveDefinite, match=r"k = 200 exceeds n_train = 96.*damping="):
        ak.TRAK(trak_worker.model(), ak.tasks.Classification(), k=200, damping=0.0, verbose=False).fit(loader(x, y))


def test_bad_arguments():
    model = trak_worker.model()
    with pytest.raises(ValueError, match="damping must be"):
        ak.TRAK(model, ak.tasks.Classification(), damping=-1.0)
    with pytest.raises(ValueError, match="k must be"):
        ak.TRAK(model, ak.tasks.Classification(), k=0)
    with pytest.raises(RuntimeError, match="before score"):
        ak.TRAK(model, ak.tasks.Classification(), k=8).score(loader(*trak_worker.data()))
