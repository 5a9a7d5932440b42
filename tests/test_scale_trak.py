"""TRAK scale-out: shards on gloo processes against one process, resume after kill -9, merges of
any split, refusals (other data, missing shard, other settings), 16-bit storage, tiles.

Run as a script (``python test_scale_trak.py STORE CKPT SHARD_INDEX SHARD_COUNT PAUSE``), it fits
one shard slowly so that a test can kill it mid-way."""
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import attrkernels as ak  # noqa: E402
import trak_worker  # noqa: E402
from scale_worker import spawn  # noqa: E402
from attrkernels.distributed import MissingShards  # noqa: E402
from attrkernels.methods import trak_score  # noqa: E402
from attrkernels.methods.trak_store import decode, feature_array, feature_file  # noqa: E402
from attrkernels.store import StoreMismatch  # noqa: E402

TASK = ak.tasks.Classification()
K = 16


class Slow(Dataset):
    """The worker's examples with a pause per example (long enough to be killed in between)."""

    def __init__(self, pause, n=96, other=False):
        self.x, self.y = (t[:n] for t in trak_worker.data(other))
        self.pause = pause

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        time.sleep(self.pause)
        return self.x[i], self.y[i]


def train_loader(n=96, other=False, pause=0.0):
    return DataLoader(Slow(pause, n, other), batch_size=8)


def queries():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 1] > 0).long()), batch_size=4)


def checkpoints():
    torch.manual_seed(1)
    other = trak_worker.model().state_dict()
    return [trak_worker.model().state_dict(), {k: v + 0.1 * torch.randn_like(v) for k, v in other.items()}]


def trak(store, **kw):
    return ak.TRAK(trak_worker.model(), TASK, k=K, store=store, verbose=False, **kw)


def features(store, n, m=0, dtype="float32"):
    """Checkpoint m's stored rows [n, width] in order: the top-level file or the shards'."""
    store = Path(store)
    top = store / feature_file(m, dtype)
    if top.exists():
        return feature_array(top, n, K, 8, dtype).read_rows(0, n)
    parts = []
    for d in sorted((store / "shards").iterdir()):
        start, stop = (int(v) for v in d.name.split("-"))
        parts.append(feature_array(d / feature_file(m, dtype), stop - start, K, 8, dtype).read_rows(0, stop - start))
    return np.concatenate(parts)


def _rank(rank, world, port, jobs, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for store, n, out in jobs:
            method = trak(store).fit(train_loader(n), checkpoints())
            method.score(queries(), out=out)
            results[(rank, n)] = method.self_influence()
    finally:
        dist.destroy_process_group()


def run_ranks(world, jobs):
    return spawn(_rank, world, [(str(s), n, str(o)) for s, n, o in jobs])


def test_two_gloo_processes_match_one_process_and_open_in_three(tmp_path):
    sizes = (45, 5)  # uneven shards; fewer batches than ranks (rank 1 has no example)
    ones = {n: trak(tmp_path / f"one{n}").fit(train_loader(n), checkpoints()) for n in sizes}
    results = run_ranks(2, [(tmp_path / f"two{n}", n, tmp_path / f"scores2_{n}.npy") for n in sizes])
    shards = {n: sorted(p.name for p in (tmp_path / f"two{n}" / "shards").iterdir()) for n in sizes}
    # the 2-process stores opened by 3 processes: nothing featurised again, the same scores
    run_ranks(3, [(tmp_path / f"two{n}", n, tmp_path / f"scores3_{n}.npy") for n in sizes])
    for n in sizes:
        want = ones[n].score(queries())
        for m in range(2):
            assert np.array_equal(features(tmp_path / f"two{n}", n, m), features(tmp_path / f"one{n}", n, m))
        for world in (2, 3):
            got = torch.from_numpy(np.load(tmp_path / f"scores{world}_{n}.npy"))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        for r in (0, 1):
            torch.testing.assert_close(results[(r, n)], ones[n].self_influence(), rtol=1e-4, atol=1e-6)
        assert sorted(p.name for p in (tmp_path / f"two{n}" / "shards").iterdir()) == shards[n]
    assert shards[5] == ["000000000000-000000000005"]


def test_job_array_shards_merge_to_the_one_process_result(tmp_path):
    one = trak(tmp_path / "one").fit(train_loader(), checkpoints())
    store = tmp_path / "array"
    for i in (2, 0, 1):
        trak(store).fit(train_loader(), checkpoints(), shard=(i, 3))
    with pytest.raises(RuntimeError, match="fit"):  # a shard alone cannot score
        trak(store).fit(train_loader(), checkpoints(), shard=(0, 3)).score(queries())
    merged = trak(store).fit(train_loader(), checkpoints())
    assert np.array_equal(features(store, 96, 1), features(tmp_path / "one", 96, 1))
    torch.testing.assert_close(merged.score(queries()), one.score(queries()), rtol=1e-5, atol=1e-7)
    assert ak.store.read_json(store / "data.json") == ak.store.read_json(tmp_path / "one" / "data.json")


def test_missing_shard_is_named(tmp_path):
    for i in (0, 2):
        trak(tmp_path).fit(train_loader(), checkpoints(), shard=(i, 3))
    with pytest.raises(MissingShards, match=r"examples \[32, 64\) \(missing: shard 1 of 3 \[32, 64\)\)"):
        trak(tmp_path).fit(train_loader(), checkpoints())


def test_shards_of_other_data_are_refused_naming_shard_and_fingerprint(tmp_path):
    trak(tmp_path).fit(train_loader(), checkpoints(), shard=(0, 2))
    trak(tmp_path).fit(train_loader(other=True), checkpoints(), shard=(1, 2))  # same size and batch size
    with pytest.raises(StoreMismatch, match=r"shard .*000000000048-000000000096.*example 48 differs.*"
                                            r"fingerprint is [0-9a-f]{32}.*have [0-9a-f]{32}"):
        trak(tmp_path).fit(train_loader(), checkpoints())


def test_shards_of_other_settings_are_refused(tmp_path):
    trak(tmp_path / "a").fit(train_loader(), checkpoints(), shard=(0, 2))
    trak(tmp_path / "b", seed=5).fit(train_loader(), checkpoints(), shard=(1, 2))
    shutil.copytree(tmp_path / "b" / "shards", tmp_path / "a" / "shards", dirs_exist_ok=True)
    with pytest.raises(StoreMismatch, match=r"(?s)000000000048-000000000096.*seed: stored 5, requested 0"):
        trak(tmp_path / "a").fit(train_loader(), checkpoints())
    with pytest.raises(StoreMismatch, match="seed: stored 0, requested 5"):  # the store's own settings
        trak(tmp_path / "a", seed=5).fit(train_loader(), checkpoints(), shard=(1, 2))
    with pytest.raises(ValueError, match="multiples of the batch size 8"):
        trak(tmp_path / "c").fit(train_loader(), checkpoints(), shard=ak.distributed.Shard(0, 12))


def test_shard_killed_mid_way_resumes_to_the_identical_result(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save(trak_worker.model().state_dict(), ckpt)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    store = tmp_path / "killed"
    mask = store / "shards" / "000000000048-000000000096" / "train_0.f32.done.npy"
    done = trak_worker.kill_mid_run([__file__, str(store), str(ckpt), "1", "2", "0.04"], env, mask, 2, 6, 120)
    assert 2 <= done.sum() < len(done), "the worker was not killed mid-shard"

    calls = []
    resumed = trak(store)
    original = resumed._featurizer
    resumed._featurizer = lambda m: (lambda f: (lambda batch: calls.append(1) or f(batch)))(original(m))
    resumed.fit(train_loader(), [ckpt], shard=(1, 2))
    assert len(calls) == len(done) - done.sum()  # only the missing chunks
    trak(store).fit(train_loader(), [ckpt], shard=(0, 2))
    merged = trak(store).fit(train_loader(), [ckpt])
    fresh = trak(tmp_path / "fresh").fit(train_loader(), [ckpt])
    assert np.array_equal(features(store, 96), features(tmp_path / "fresh", 96))
    assert torch.equal(merged.score(queries()), fresh.score(queries()))
    calls.clear()
    resumed.fit(train_loader(), [ckpt], shard=(1, 2))  # finished: no work
    assert not calls


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_storage_halves_the_disk_and_keeps_the_scores(tmp_path, dtype):
    full = trak(tmp_path / "f32").fit(train_loader(), checkpoints())
    half = trak(tmp_path / dtype, dtype=dtype).fit(train_loader(), checkpoints())
    f32, f16 = features(tmp_path / "f32", 96), features(tmp_path / dtype, 96, dtype=dtype)
    assert f16.nbytes == 2 * 96 * (K + 2) and f32.nbytes == 4 * 96 * (K + 1)
    phi, q = decode(f16, K, dtype)
    assert np.array_equal(q, f32[:, K])  # the weights Q are exact float32
    tol = {"float16": 1e-3, "bfloat16": 1e-2}[dtype]
    torch.testing.assert_close(phi, torch.from_numpy(f32[:, :K]), rtol=tol, atol=tol * np.abs(f32).max())
    want, got = full.score(queries()), half.score(queries())
    assert ((got - want).abs().max() / want.abs().max()).item() < 5 * tol


def test_tiles_self_influence_and_out_path(tmp_path, monkeypatch):
    method = trak(tmp_path).fit(train_loader(45), checkpoints())
    want = method.score(queries())
    monkeypatch.setattr(trak_score, "DEFAULT_SOLVE_BUDGET", 4 * K * 2 * 3)  # 3 test columns per block
    monkeypatch.setattr(trak_score, "TILE_BUDGET", 4 * 3 * 2)  # output tiles of 2 rows x 3 columns
    got = method.score(queries(), out=tmp_path / "s.npy", tile=7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    train_as_test = DataLoader(TensorDataset(*(t[:45] for t in trak_worker.data())), batch_size=8)
    diag = torch.diagonal(method.score(train_as_test))
    torch.testing.assert_close(method.self_influence(tile=7), diag, rtol=1e-4, atol=1e-6)


def test_score_under_a_group_needs_an_output_every_rank_sees():
    from attrkernels.distributed import Group
    from attrkernels.methods.scores import ScoreOutput
    with pytest.raises(ValueError, match="out= a path"):
        ScoreOutput(None, 3, n_train=5, group=Group(0, 2))


if __name__ == "__main__":
    store, ckpt, index, count, pause = sys.argv[1:6]
    trak(store).fit(train_loader(pause=float(pause)), [ckpt], shard=(int(index), int(count)))
