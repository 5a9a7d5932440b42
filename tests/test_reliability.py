"""The shared pieces behind "no silent wrong answers": checked passes over a loader
(``methods.passes``), snapshotted checkpoints (``methods.checkpoints``), label and finiteness
checks, and TRAK's store under concurrent writers."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import attrkernels as ak
from attrkernels.methods.checkpoints import as_checkpoints, read_checkpoint
from attrkernels.methods.passes import DataPasses, chunk_digest
from attrkernels.store import DataMismatch, StoreMismatch
from attrkernels.utils.errors import ExampleError

sys.path.insert(0, str(Path(__file__).parent))
import trak_worker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = ak.tasks.Classification()


def batches(x, y, bs=8):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def data(n=20):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


# ---------------------------------------------------------------------------------------------
# DataPasses


def test_passes_record_the_first_pass_and_compare_the_next():
    x, y = data()
    passes = DataPasses(batches(x, y), TASK, "train")
    with passes.over("checkpoint 0") as first:
        assert [(s, n) for s, _, n in first] == [(0, 8), (8, 8), (16, 4)]
    assert passes.examples == 20 and passes.fingerprint()["examples"] == 20
    with passes.over("checkpoint 1") as again:
        list(again)  # the same examples: accepted
    passes.loader = batches(x.flip(0), y.flip(0))
    with pytest.raises(DataMismatch, match=r"example 0 .*checkpoint 2.*reorders"):
        with passes.over("checkpoint 2") as moved:
            list(moved)
    passes.loader = batches(x[:16], y[:16])
    with pytest.raises(DataMismatch, match="yielded 16 examples"):
        with passes.over() as short:
            list(short)


def test_passes_name_the_global_example_and_the_checkpoint():
    x, y = data()
    passes = DataPasses(batches(x, y), TASK, "train")
    with pytest.raises(ExampleError, match=r"examples \[11\] of the train loader \(checkpoint 3\)") as info:
        with passes.over("checkpoint 3") as each:
            for start, batch, size in each:
                if start == 8:
                    raise ExampleError("bad", [3])
    assert info.value.examples == [11]


def test_passes_refuse_loaders_before_any_pass():
    x, y = data()
    with pytest.raises(TypeError, match="generator"):
        DataPasses((b for b in batches(x, y)), TASK)
    with pytest.raises(ValueError, match="drop_last"):
        DataPasses(DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True), TASK)
    with pytest.raises(ValueError, match="shuffle"):
        DataPasses(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), TASK)


def test_batches_is_a_re_iterable_of_checked_passes():
    x, y = data()
    passes = DataPasses(batches(x, y), TASK, "train")
    stream = passes.batches("checkpoint 0")
    assert len(list(stream)) == len(list(stream)) == 3
    passes.loader = batches(x + 1, y)
    with pytest.raises(DataMismatch):
        list(stream)


def test_chunk_digest_is_a_non_negative_int64():
    d = chunk_digest(np.array([1, 2, 3], dtype=np.uint64))
    assert 0 <= d < 2**63 and d == chunk_digest([1, 2, 3]) != chunk_digest([1, 3, 2])


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_state_dicts_are_snapshotted():
    model = mlp()
    live = model.state_dict()
    (snap,) = as_checkpoints(model, [live])
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(snap["0.weight"], live["0.weight"])


def test_a_checkpoint_file_that_changed_since_fit_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(mlp().state_dict(), path)
    (ckpt,) = as_checkpoints(mlp(), [path])
    assert set(read_checkpoint(ckpt)) == set(mlp().state_dict())
    torch.save(mlp(1).state_dict(), path)
    with pytest.raises(ValueError, match=r"checkpoint 0: the file .*ckpt\.pt changed since fit"):
        read_checkpoint(ckpt)


def test_non_finite_weights_name_the_checkpoint_and_entry():
    bad = mlp().state_dict()
    bad["0.bias"][1] = float("nan")
    with pytest.raises(ValueError, match=r"checkpoint 1: '0\.bias' has 1 NaN or Inf value"):
        ak.TracIn(mlp(), TASK, verbose=False).fit(batches(*data()), [mlp().state_dict(), bad], learning_rates=[1, 1])


# ---------------------------------------------------------------------------------------------
# Labels and non-finite task values


def test_label_minus_100_names_the_fix():
    x, y = data()
    y[2] = -100
    with pytest.raises(ExampleError, match=r"out of range \[0, 3\).*\[2\].*ignore_index"):
        TASK.loss(mlp(), (x, y))


def test_influence_names_a_non_finite_loss_before_the_curvature():
    x, y = data()
    x[17, 0] = float("nan")
    method = ak.InfluenceCG(mlp(), TASK, damping=0.1, verbose=False)
    with pytest.raises(ExampleError, match=r"task\.loss is NaN or Inf: examples \[17\] of the train loader \(checkpoint 0\)"):
        method.fit(batches(x, y))


def test_influence_refuses_train_data_that_changed_between_fit_and_score():
    x, y = data()
    train = batches(x, y)
    method = ak.InfluenceCG(mlp(), TASK, damping=0.1, max_iter=2, verbose=False).fit(train)
    train[1] = (train[1][0] + 0.5, train[1][1])
    with pytest.raises(DataMismatch, match=r"train example 8 differs"):
        method.score(batches(*data(4)))


# ---------------------------------------------------------------------------------------------
# TRAK store: two writers with different data never leave a mixed result


def _features(store):
    return np.fromfile(store / "train_0.f32", dtype=np.float32)


def test_two_processes_with_different_data_on_one_store_never_mix(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save(trak_worker.model().state_dict(), ckpt)
    store = tmp_path / "shared"
    worker = str(Path(__file__).parent / "trak_worker.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, worker, str(store), str(ckpt), "0.02", which],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for which in ("same", "other")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = [code for code, _ in results]
    assert sorted(codes)[0] == 0 and sorted(codes)[1] != 0, results
    loser = results[codes.index(next(c for c in codes if c != 0))][1]
    assert "StoreMismatch" in loser and "other training examples" in loser, loser
    winner = ("same", "other")[codes.index(0)]
    fresh = tmp_path / "fresh"
    ak.TRAK(trak_worker.model(), TASK, k=40, store=fresh, verbose=False).fit(
        trak_worker.SlowLoader(0.0, winner == "other"), [ckpt])
    assert np.array_equal(_features(store), _features(fresh))


def test_resuming_a_partial_store_with_other_data_writes_nothing(tmp_path):
    """A killed fit left some chunks done; a fit with other data is refused before it writes a
    chunk, so the store never holds chunks of two data sets (fitting the first data still works)."""
    x, y = trak_worker.data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    ak.TRAK(trak_worker.model(), TASK, k=40, store=tmp_path, verbose=False).fit(loader)
    done = tmp_path / "train_0.f32.done.npy"
    mask = np.load(done)
    mask[:6] = False  # the first six chunks "not yet computed"
    np.save(done, mask)
    (tmp_path / "kernel_0.npz").unlink()
    before = (tmp_path / "train_0.f32.sums.npy").read_bytes()
    with pytest.raises(StoreMismatch, match="other training examples"):
        ak.TRAK(trak_worker.model(), TASK, k=40, store=tmp_path, verbose=False).fit(
            DataLoader(TensorDataset(x, 1 - y), batch_size=8))
    assert np.array_equal(np.load(done), mask) and (tmp_path / "train_0.f32.sums.npy").read_bytes() == before
    ak.TRAK(trak_worker.model(), TASK, k=40, store=tmp_path, verbose=False).fit(loader)
    assert np.load(done).all()
