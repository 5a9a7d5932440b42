"""What the methods share: the checkpoint loop, batches on the model's device, score(out=), the
one not-positive-definite error, the task's logit-space loss for Gauss-Newton, argument checks
without building a Featurizer."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attrkernels as ak
from attrkernels.methods.passes import iterate
from attrkernels.methods.checkpoints import Checkpoint, checked_checkpoints, checkpoint_loop
from attrkernels.methods.scores import ScoreOutput
from attrkernels.utils.errors import NotPositiveDefiniteError


def mlp(seed=0, dropout=False):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.1) if dropout else nn.Identity(), nn.Tanh(), nn.Linear(6, 3))


def data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def batches(x, y, bs=16):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_loop_loads_each_checkpoint_in_eval_mode_and_restores_on_error():
    model = mlp(dropout=True).train()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts = [mlp(1, dropout=True).state_dict(), mlp(2, dropout=True).state_dict()]
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoint_loop(model, ckpts) as loop:
            for k, ckpt in loop:
                assert not model.training
                assert torch.equal(model[0].weight, ckpt["0.weight"])
                seen.append(k)
                if k == 1:
                    raise RuntimeError("boom")
    assert seen == [0, 1] and model.training
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside its with block"):
        next(iter(checkpoint_loop(model, ckpts)))


def test_checked_checkpoints_refuse_a_mismatch_without_touching_the_model():
    model = mlp()
    before = model[0].weight.clone()
    with pytest.raises(ValueError, match=r"checkpoint 1 does not match the model: missing keys"):
        checked_checkpoints(model, [mlp(1).state_dict(), {"0.weight": torch.zeros(6, 4)}])
    assert torch.equal(model[0].weight, before)
    assert checked_checkpoints(model, Checkpoint(mlp(1).state_dict(), 1, 0.1))[0]["0.weight"].shape == (6, 4)


def test_one_checkpoint_class():
    from attrkernels.tasks.training import Checkpoint as FromTraining

    assert ak.tasks.Checkpoint is Checkpoint is FromTraining is ak.methods.Checkpoint


def test_batches_reach_the_requested_device():
    task = ak.tasks.Classification()
    x, y = data(20)
    seen = [(start, batch, size) for start, batch, size in iterate(batches(x, y, 8), task, "train", device="meta")]
    assert [(s, n) for s, _, n in seen] == [(0, 8), (8, 8), (16, 4)]
    assert all(t.device.type == "meta" for _, batch, _ in seen for t in batch)


# ---------------------------------------------------------------------------------------------
# score(out=)


def test_score_output_contract(tmp_path):
    tiles = [torch.arange(12.0).reshape(3, 4), torch.ones(2, 4)]
    want = 2 * torch.cat(tiles)

    def fill(out, n_train):
        with ScoreOutput(out, 4, n_train=n_train) as dest:
            for k in range(2):  # two checkpoints: = then +=
                start = 0
                for t in tiles:
                    dest.write(start, t, first=k == 0)
                    start += len(t)
            return dest.finish(rows=5)

    assert torch.equal(fill(None, 5), want)
    assert torch.equal(fill(None, None), want)
    array = np.full((5, 4), np.nan, np.float32)
    assert fill(array, 5) is array and np.array_equal(array, want.numpy())
    tensor = torch.full((5, 4), float("nan"))
    assert fill(tensor, None) is tensor and torch.equal(tensor, want)
    mapped = fill(tmp_path / "s.npy", 5)
    assert torch.is_tensor(mapped) and torch.equal(mapped, want)
    assert np.array_equal(np.load(tmp_path / "s.npy"), want.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]

    with pytest.raises(ValueError, match=r"out has shape \(4, 4\); the scores are \[5, 4\]"):
        ScoreOutput(np.zeros((4, 4), np.float32), 4, n_train=5)
    with pytest.raises(ValueError, match="out has shape .* too small"):  # n_train unknown: seen as rows arrive
        fill(np.zeros((4, 4), np.float32), None)
    with pytest.raises(ValueError, match="out has 6 rows but the train loader yielded 5"):
        fill(np.zeros((6, 4), np.float32), None)
    with pytest.raises(ValueError, match="needs the number of training examples"):
        ScoreOutput(tmp_path / "x.npy", 4)
    with pytest.raises(TypeError, match="out must be None, a path or"):
        ScoreOutput([[0.0]], 4, n_train=1)
    with pytest.raises(RuntimeError, match="killed"):  # a failure leaves neither the file nor its temporary
        with ScoreOutput(tmp_path / "failed.npy", 4, n_train=5):
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]


def test_trak_fills_an_array_in_place():
    x, y = data()
    xt, yt = data(6, 1)
    trak = ak.TRAK(mlp(), ak.tasks.Classification(), k=16, verbose=False).fit(batches(x, y))
    want = trak.score([(xt, yt)])
    out = torch.full((40, 6), float("nan"))
    assert trak.score([(xt, yt)], out=out) is out and torch.equal(out, want)


# ---------------------------------------------------------------------------------------------
# One not-positive-definite error


def test_influence_raises_the_one_not_positive_definite_error():
    x, y = data()
    model = mlp().double()  # untrained: the Hessian is indefinite
    with pytest.raises(NotPositiveDefiniteError, match="Pass damping >= "):
        ak.InfluenceCG(model, ak.tasks.Classification(), damping=0.0, verbose=False).fit(
            batches(x.double(), y)).score([(x[:3].double(), y[:3])])


# ---------------------------------------------------------------------------------------------
# Gauss-Newton through the task's logits and logit_loss


class DictTask(ak.tasks.Task):
    """Batches {"x": inputs, "y": labels}: not a Classification, but it defines logits and logit_loss."""

    def logits(self, model, batch):
        return model(batch["x"])

    def logit_loss(self, logits, batch):
        return F.cross_entropy(logits, batch["y"], reduction="none")

    def loss(self, model, batch):
        return self.logit_loss(self.logits(model, batch), batch)

    def measure(self, model, batch):
        return ak.tasks.margin(self.logits(model, batch), batch["y"])

    def batch_size(self, batch):
        return batch["x"].shape[0]


class NoLogits(ak.tasks.Task):
    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    def measure(self, model, batch):
        return -self.loss(model, batch)


class ScaledLoss(DictTask):
    def loss(self, model, batch):
        return 2 * super().loss(model, batch)


def test_gauss_newton_uses_the_tasks_logit_loss():
    x, y = data()
    xt, yt = data(5, 1)
    model = mlp()
    kw = dict(damping=0.1, curvature="gauss-newton", verbose=False)
    want = ak.InfluenceExplicit(model, ak.tasks.Classification(), **kw).fit(batches(x, y)).score([(xt, yt)])
    train = [{"x": a, "y": b} for a, b in batches(x, y)]
    got = ak.InfluenceExplicit(model, DictTask(), **kw).fit(train).score([{"x": xt, "y": yt}])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs task.logits.*NoLogits does not define logits and logit_loss"):
        ak.InfluenceCG(model, NoLogits(), curvature="gauss-newton")
    with pytest.raises(ValueError, match="task.loss is not task.logit_loss of task.logits"):
        ak.InfluenceCG(model, ScaledLoss(), **kw).fit(train)


# ---------------------------------------------------------------------------------------------
# Argument checks


def test_trak_and_tracin_check_arguments_without_building_a_featurizer(monkeypatch):
    import attrkernels.capture.featurizer as featurizer

    def refuse(*args, **kwargs):
        raise AssertionError("a Featurizer was built")

    monkeypatch.setattr(featurizer.Featurizer, "__init__", refuse)
    model, task = mlp(), ak.tasks.Classification()
    ak.TRAK(model, task, k=8, mode="factored")
    ak.TracIn(model, task, k=8)
    for bad, match in [({"k": 0}, "k must be"), ({"kind": "x"}, "kind must be"), ({"mode": "x"}, "mode must be"),
                       ({"seed": -1}, "seed must be"), ({"params": ["nope"]}, "unknown parameters")]:
        with pytest.raises(ValueError, match=match):
            ak.TRAK(model, task, **{"k": 8, **bad})
        with pytest.raises(ValueError, match=match):
            ak.TracIn(model, task, **{"k": 8, **bad})
    with pytest.raises(ValueError, match="memory_budget must be"):
        ak.TRAK(model, task, memory_budget=10)
    with pytest.raises(ValueError, match="damping must be"):  # TRAK's damping check had no type test
        ak.TRAK(model, task, damping="1")
    with pytest.raises(ValueError, match="damping_ratio must be"):
        ak.TRAK(model, task, damping_ratio=float("nan"))


def test_datamodels_protocol_arguments_are_checked():
    with pytest.raises(ValueError, match="m must be a positive int"):
        ak.Datamodels(m=0)
    with pytest.raises(ValueError, match="seed must be"):
        ak.Datamodels(seed=-1)
    with pytest.raises(ValueError, match="l2 must be"):
        ak.Datamodels(l2=0.0)
