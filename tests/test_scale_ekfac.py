"""EK-FAC / K-FAC split across processes, each compared with one process running the same job:
two gloo processes spawned here (sums all-reduced, eigendecompositions spread by layer, score rows
written into one shared file), partial sums of shards written offline and merged by a run of
another size, a shard killed with SIGKILL and resumed, shards of other data refused.

Tolerances: the factors are float32 sums over examples (added in float64 across shards), so the
split changes only their rounding: rtol 1e-5 on the factors and the eigenvalues; bases are
compared up to the sign of each eigenvector; scores rtol 1e-4 of the largest entry.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import attrkernels as ak
from attrkernels.distributed import Shard
from attrkernels.distributed import MissingShards
from attrkernels.store import StoreMismatch

import scale_worker as W

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = ak.tasks.Classification()
CLASSES = {"ekfac": ak.EKFAC, "kfac": ak.KFAC}


def _method(strategy, store=None):
    return CLASSES[strategy](W.Net(), TASK, store=store, verbose=False)


def _one_process(strategy, n, store=None):
    train, test = W.loaders(n)
    m = _method(strategy, store).fit(train)
    return W.factor_tensors(m), m.score(test), m.self_influence()


def _curvature(factors, layer):
    """The layer's Kronecker-factored curvature in its eigenbasis, (Q_S (x) Q_A) diag(lambda) (...)^T,
    lambda = Lambda (EK-FAC) or e_S e_A^T (K-FAC): what scoring inverts, free of the sign and
    the rotation within (near-)degenerate eigenspaces of the bases."""
    Q = torch.kron(factors[f"{layer}/Q_s"], factors[f"{layer}/Q_a"])
    lam = factors.get(f"{layer}/lam")
    lam = torch.outer(factors[f"{layer}/eig_s"], factors[f"{layer}/eig_a"]) if lam is None else lam
    return Q @ torch.diag(lam.reshape(-1)) @ Q.T


def assert_factors_close(got, want):
    assert set(got) == set(want)
    for key, w in want.items():
        if key.endswith(("/A", "/S", "/eig_a", "/eig_s")):
            torch.testing.assert_close(got[key], w, rtol=1e-5, atol=1e-5 * float(w.abs().max()), msg=key)
    for layer in {key.rsplit("/", 1)[0] for key in want}:
        w = _curvature(want, layer)
        torch.testing.assert_close(_curvature(got, layer), w, rtol=0, atol=1e-5 * float(w.abs().max()), msg=layer)


def assert_scores_close(got, want):
    got, want = torch.as_tensor(np.asarray(got)).double(), torch.as_tensor(np.asarray(want)).double()
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


CASES = ((11, True), (1, False))  # uneven shards with a store; fewer examples than ranks without
OFFLINE_N = 13


def _group_worker(rank, world, port, root, results):
    W.init(rank, world, port)
    try:
        out = {}
        for n, with_store in CASES:
            train, test = W.loaders(n)
            for strategy in ("ekfac", "kfac"):
                m = _method(strategy, Path(root) / f"store-{strategy}-{n}" if with_store else None).fit(train)
                scores = m.score(test, out=Path(root) / f"scores-{strategy}-{n}.npy")
                self_inf = m.self_influence()
                out[n, strategy] = (W.factor_tensors(m), scores.clone(), self_inf.clone())
        train, _ = W.loaders(OFFLINE_N)
        for wave in range(2):  # a job array of two shards run concurrently, twice (covariances, corrections)
            _method("ekfac", Path(root) / "offline").fit(train, shard=(rank, world))
            dist.barrier()
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    """One spawn for both cases and a two-shard job array: starting a process that imports torch
    takes seconds."""
    results = W.spawn(_group_worker, 2, str(tmp_path))
    for n, with_store in CASES:
        for strategy in ("ekfac", "kfac"):
            factors, scores, self_inf = _one_process(strategy, n)
            for rank in (0, 1):
                got_factors, got_scores, got_self = results[rank][n, strategy]
                assert_factors_close(got_factors, factors)
                assert_scores_close(got_scores, scores)
                assert_scores_close(got_self, self_inf)
            assert (tmp_path / f"scores-{strategy}-{n}.npy").exists()
        if with_store:  # the group's store is whole: a one-process run loads it and scores the same
            train, test = W.loaders(n)
            loaded = _method("ekfac", tmp_path / f"store-ekfac-{n}")
            assert_scores_close(loaded.score(test, train=train), _one_process("ekfac", n)[1])
    assert not list(tmp_path.glob("*.tmp.*"))
    # the shards the two processes wrote with shard=(rank, 2), merged by one process
    for stage in ("covariance", "lambda"):
        assert len(list((tmp_path / "offline").glob(f"partial/{stage}_*/shards/*/manifest.json"))) == 2
    train, _ = W.loaders(OFFLINE_N)
    merged = _method("ekfac", tmp_path / "offline").fit(train)
    assert_factors_close(W.factor_tensors(merged), _one_process("ekfac", OFFLINE_N)[0])


def _offline_shards(store, count, train, strategy="ekfac"):
    """Every shard's fit, in order, until the method reports the factors complete."""
    for wave in range(2):
        for i in range(count):
            m = _method(strategy, store).fit(train, shard=(i, count))
    assert m.complete
    return m


def _merge_worker(rank, world, port, store, n, results):
    W.init(rank, world, port)
    try:
        train, test = W.loaders(n)
        m = _method("ekfac", store).fit(train)
        results[rank] = (W.factor_tensors(m), m.score(test, out=Path(store).parent / "merged.npy").clone())
    finally:
        dist.destroy_process_group()


def test_partial_sums_of_two_shards_merged_by_three_processes_and_by_one(tmp_path):
    n = 13
    train, test = W.loaders(n)
    store = tmp_path / "store"
    first = _method("ekfac", store).fit(train, shard=(0, 2))
    assert not first.complete and not first.fitted  # the eigenbasis needs every shard's covariances
    _offline_shards(store, 2, train)
    assert sorted(p.parent.name for p in store.glob("partial/covariance_*/shards/*/manifest.json")) == [
        "000000000000-000000000008", "000000000008-000000000013"]
    for merged in store.glob("*.safetensors"):  # keep the partial sums only: the runs below merge them
        merged.unlink()
    (store / "train_data.npz").unlink()
    factors, scores, _ = _one_process("ekfac", n)
    results = W.spawn(_merge_worker, 3, str(store), n)
    for rank in range(3):
        assert_factors_close(results[rank][0], factors)
        assert_scores_close(results[rank][1], scores)
    one = _method("ekfac", store).fit(train)  # and by one process, from the files the group wrote
    assert_factors_close(W.factor_tensors(one), factors)


def test_missing_shard_is_named_and_other_data_refused(tmp_path):
    train, _ = W.loaders(12)
    store = tmp_path / "store"
    _method("kfac", store).fit(train, shard=(1, 3))
    with pytest.raises(MissingShards, match=r"examples \[0, 4\) \(missing: shard 0 of 3 \[0, 4\)\).*"
                                            r"examples \[8, 12\) \(missing: shard 2 of 3"):
        _method("kfac", store).fit(train)
    other, _ = W.loaders(12, seed=5)  # same size and batch size, other examples
    with pytest.raises(StoreMismatch, match=r"000000000004-000000000008 \(examples \[4, 8\)\) was computed from "
                                            r"other training data.*fingerprint is [0-9a-f]{32}"):
        for i in (0, 2):
            _method("kfac", store).fit(other, shard=(i, 3))
    with pytest.raises(StoreMismatch, match="other settings"):  # the same shards, other batch size
        _method("kfac", store).fit(W.loaders(12, batch_size=2)[0])
    with pytest.raises(ValueError, match="batch boundary"):
        _method("ekfac", tmp_path / "s2").fit(train, shard=Shard(2, 6, n=12))
    with pytest.raises(ValueError, match="store="):
        _method("ekfac").fit(train, shard=(0, 2))


def test_shard_killed_mid_pass_resumes_to_the_identical_result(tmp_path):
    train, _ = W.loaders(40)
    fresh = _offline_shards(tmp_path / "fresh", 2, train)
    store, progress = tmp_path / "killed", tmp_path / "progress"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "scale_worker.py"), str(store), "0", "2",
                             "0.2", str(progress)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not (progress.exists() and progress.read_text() and
                                          int(progress.read_text()) >= 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= int(progress.read_text()) < 20, "the shard was not killed mid-pass"
    assert not list(store.glob("partial/*/shards/*/manifest.json")), "the killed shard left a finished shard"
    resumed = _offline_shards(store, 2, train)
    for key, value in W.factor_tensors(fresh).items():
        assert torch.equal(W.factor_tensors(resumed)[key], value), key
    before = {p: p.stat().st_mtime_ns for p in (store / "partial").rglob("*")}
    _method("ekfac", store).fit(train, shard=(1, 2))  # a finished shard: nothing recomputed or rewritten
    assert before == {p: p.stat().st_mtime_ns for p in (store / "partial").rglob("*")}
