"""TracIn split across two gloo processes (spawned here), compared with one process: each rank
passes over its shard of the training set and writes its rows of the scores into one shared
file (exact gradients and sketches; uneven N and N < world size). Tolerance 1e-5 of the largest
score (the same per-example products, rows computed in other batches)."""
from pathlib import Path

import pytest
import torch.distributed as dist

import attrkernels as ak

import scale_worker as W

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = ak.tasks.Classification()
CASES = ((11, None), (11, 16), (1, None))  # (n, k): uneven shards exact and sketched; N < world size


def _scores(n, k, out=None):
    train, test = W.mlp_loaders(n)
    model = W.mlp()
    checkpoints = [{name: p.detach() * scale for name, p in model.state_dict().items()} for scale in (1.0, 0.8)]
    m = ak.TracIn(model, TASK, k=k, verbose=False).fit(train, checkpoints, learning_rates=[0.1, 0.05])
    return m.score(test, out=out)


def _worker(rank, world, port, root, results):
    W.init(rank, world, port)
    try:
        out = {(n, k): _scores(n, k, Path(root) / f"tracin-{n}-{k}.npy").clone() for n, k in CASES}
        train, test = W.mlp_loaders(11, nan_at=8)  # in rank 1's shard [6, 11)
        m = ak.TracIn(W.mlp(), TASK, verbose=False).fit(train, learning_rates=0.1)
        out["nan"] = W.failure(lambda: m.score(test, out=Path(root) / "nan.npy"))
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    results = W.spawn(_worker, 2, str(tmp_path))
    for n, k in CASES:
        want = _scores(n, k).double()
        for rank in (0, 1):
            got = results[rank][n, k].double()
            assert got.shape == want.shape == (n, 5)
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), (n, k, rank)
    # a bad example in one rank's shard stops both ranks (none left waiting), named by the rank that met it
    assert "ExampleError" in results[1]["nan"] and "examples [8]" in results[1]["nan"], results[1]["nan"]
    assert results[0]["nan"].startswith("RuntimeError") and "failed on rank(s) [1]" in results[0]["nan"]


def test_scoring_with_another_world_size_than_fit_is_refused():
    from attrkernels.distributed import check_world
    check_world(1, "TracIn")  # no process group: one process, as at fit
    with pytest.raises(RuntimeError, match="fitted with 2 process.*scores with 1"):
        check_world(2, "TracIn")
