"""The shard split and the bucketed all-reduce, on two gloo processes spawned by the test."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from attrkernels.distributed import Shard, all_reduce_sum, process_group, shard_of

sys.path.insert(0, str(Path(__file__).parent))
from scale_worker import spawn  # noqa: E402


def test_shards_cover_every_example_once_for_any_count():
    for n in (0, 1, 7, 100, 101):
        for count in (1, 2, 3, 8, 150):
            shards = [shard_of(n, i, count) for i in range(count)]
            assert shards[0].start == 0 and shards[-1].stop == n
            assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
            sizes = [len(s) for s in shards]
            assert max(sizes) - min(sizes) <= 1


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match="index"):
        shard_of(10, 3, 3)
    with pytest.raises(ValueError, match="count"):
        shard_of(10, 0, 0)
    with pytest.raises(ValueError, match="reaches past"):
        Shard(0, 11, n=10)
    assert shard_of(10, 1, 3).name == "000000000004-000000000007"


def test_no_group_means_one_process():
    assert process_group().size == 1
    t = torch.ones(3)
    all_reduce_sum([t])
    assert torch.equal(t, torch.ones(3))


def _worker(rank, world, port, mismatch, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        a = torch.full((5, 3), float(rank + 1), dtype=torch.float64)
        b = torch.arange(7, dtype=torch.float32) * (rank + 1)
        c = torch.full((2,), rank + 1, dtype=torch.int64)
        if mismatch and rank == 1:
            b = torch.zeros(8)
        try:
            all_reduce_sum([a, b, c], what="test sums", bucket_bytes=16)
            results[rank] = (a.clone(), b.clone(), c.clone())
        except RuntimeError as err:
            results[rank] = str(err)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mismatch", [False, True])
def test_all_reduce_sum_on_two_gloo_processes(mismatch):
    results = spawn(_worker, 2, mismatch)
    if mismatch:
        assert all("differ in shape or dtype" in results[r] and "test sums" in results[r] for r in (0, 1))
        return
    for r in (0, 1):
        a, b, c = results[r]
        assert torch.equal(a, torch.full((5, 3), 3.0, dtype=torch.float64))
        assert torch.equal(b, torch.arange(7, dtype=torch.float32) * 3)
        assert torch.equal(c, torch.full((2,), 3, dtype=torch.int64))


def test_shard_loader_yields_the_shards_examples_in_order():
    from torch.utils.data import DataLoader, TensorDataset

    from attrkernels.distributed import shard_loader
    data = TensorDataset(torch.arange(10).float(), torch.arange(10))
    loader = DataLoader(data, batch_size=3)
    parts = [torch.cat([b[1] for b in shard_loader(loader, shard_of(10, i, 3))]) for i in range(3)]
    assert torch.equal(torch.cat(parts), torch.arange(10))
    with pytest.raises(ValueError, match="shuffles"):
        shard_loader(DataLoader(data, batch_size=3, shuffle=True), shard_of(10, 0, 2))
    with pytest.raises(TypeError, match="DataLoader"):
        shard_loader([data[:3]], shard_of(3, 0, 1))
