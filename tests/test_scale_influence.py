"""Influence functions split across two gloo processes (spawned here), each compared with one
process: block CG with every curvature-vector product all-reduced (each rank's shard part, one
all-reduce per CG step, the same CG arithmetic on every rank), the explicit inverse built from
all-reduced products, score rows written by each rank into one shared file; uneven N and N <
world size; LiSSA refused under a process group (it runs in one process).

Tolerance: the all-reduced products differ from one process's by the rounding of the sums, which
CG carries to the scores: 1e-4 of the largest score.
"""
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

import attrkernels as ak

import scale_worker as W

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = ak.tasks.Classification()
CASES = (11, 1)  # uneven shards; fewer examples than ranks
METHODS = {
    "cg": lambda: ak.InfluenceCG(W.mlp(), TASK, damping=0.01, curvature="gauss-newton", tol=1e-6, verbose=False),
    "explicit": lambda: ak.InfluenceExplicit(W.mlp(), TASK, damping=0.01, curvature="gauss-newton", verbose=False),
}


def _worker(rank, world, port, root, results):
    W.init(rank, world, port)
    try:
        out = {}
        for n in CASES:
            train, test = W.mlp_loaders(n)
            for name, make in METHODS.items():
                m = make().fit(train)
                out[n, name] = m.score(test, out=Path(root) / f"{name}-{n}.npy").clone()
                if name == "cg":
                    out[n, "steps"] = [r.steps for r in m.info]
        out["lissa"] = W.failure(lambda: ak.InfluenceLiSSA(W.mlp(), TASK, damping=0.01, verbose=False).fit(train))
        bad, _ = W.mlp_loaders(11, nan_at=2)  # in rank 0's shard [0, 6)
        out["nan"] = W.failure(lambda: METHODS["cg"]().fit(bad))
        out["nan-ekfac"] = W.failure(lambda: ak.KFAC(W.mlp(), TASK, verbose=False).fit(bad))
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    results = W.spawn(_worker, 2, str(tmp_path))
    for n in CASES:
        train, test = W.mlp_loaders(n)
        for name, make in METHODS.items():
            m = make().fit(train)
            want = m.score(test).double()
            for rank in (0, 1):
                got = results[rank][n, name].double()
                assert got.shape == want.shape == (n, 5)
                assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), (n, name, rank)
            if name == "cg":  # the ranks ran the same CG: the same number of steps
                assert results[0][n, "steps"] == results[1][n, "steps"]
        assert np.array_equal(np.load(tmp_path / f"cg-{n}.npy"), results[0][n, "cg"].numpy())
    for rank in (0, 1):
        assert "InfluenceLiSSA runs in one process" in results[rank]["lissa"]
    # a bad example in one rank's shard stops both ranks, named by the rank that met it
    for key in ("nan", "nan-ekfac"):
        assert "ExampleError" in results[0][key] and "examples [2]" in results[0][key], results[0][key]
        assert results[1][key].startswith("RuntimeError") and "failed on rank(s) [0]" in results[1][key]
