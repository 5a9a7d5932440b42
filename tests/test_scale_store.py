"""Shard manifests and the pure merge: covers from any split, refusals naming the shard."""
import numpy as np
import pytest

from attrkernels.distributed import (MissingShards, batch_shard, check_data, check_settings, cover,
                                     merged_fingerprint, shard_directory, shard_manifests, shard_of, write_manifest)
from attrkernels.store import StoreMismatch, combine

SETTINGS = {"k": 16, "seed": 0}


def digests(n, salt=0):
    return (np.arange(n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(salt + 1))


def write_split(root, n, count, batch=None, skip=(), salt=0, settings=SETTINGS):
    d = digests(n, salt)
    for i in range(count):
        s = batch_shard(n, batch, i, count) if batch else shard_of(n, i, count)
        if i in skip:
            continue
        write_manifest(shard_directory(root, s), s, settings=settings, digests=d[s.start:s.stop],
                       info={"batch": batch} if batch else {})


def test_batch_shards_start_at_batch_boundaries_and_cover_once():
    for n, batch, count in [(10, 3, 2), (96, 8, 3), (5, 8, 3), (1, 1, 4)]:
        shards = [batch_shard(n, batch, i, count) for i in range(count)]
        assert shards[0].start == 0 and shards[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
        assert all(s.start % batch == 0 or s.start == n for s in shards)


def test_shards_of_two_splits_mix_and_the_merge_is_the_whole_fingerprint(tmp_path):
    write_split(tmp_path, 10, 2)
    write_split(tmp_path, 10, 3, skip=(0, 1))
    found = shard_manifests(tmp_path)
    assert len(found) == 3
    pieces = cover(found, 10)
    assert [(p.start, p.stop) for p in pieces] == [(0, 5), (5, 10)]
    assert merged_fingerprint(pieces) == combine(digests(10))
    # a rank of a 3-process run whose rows [4, 7) lie in two shards of the 2-process run
    assert [(p.start, p.stop) for p in cover(found, 10, 4, 7)] == [(4, 5), (5, 7)]
    for p in cover(found, 10, 4, 7):
        check_data(p, digests(10)[p.start:p.stop])


def test_missing_shard_is_named(tmp_path):
    write_split(tmp_path, 96, 3, batch=8, skip=(1,))
    with pytest.raises(MissingShards, match=r"examples \[32, 64\) \(missing: shard 1 of 3 \[32, 64\)\)"):
        cover(shard_manifests(tmp_path), 96)


def test_shards_of_other_settings_or_size_are_refused(tmp_path):
    write_split(tmp_path, 10, 2, skip=(1,))
    write_split(tmp_path, 10, 2, skip=(0,), settings={"k": 32, "seed": 0})
    with pytest.raises(StoreMismatch, match=r"(?s)shard .*000000000005-000000000010.*k: stored 32, requested 16"):
        check_settings(shard_manifests(tmp_path), SETTINGS)
    with pytest.raises(StoreMismatch, match="training set of 10 examples, this one has 11"):
        cover(shard_manifests(tmp_path), 11)


def test_shard_of_other_data_is_refused_naming_shard_and_fingerprints(tmp_path):
    write_split(tmp_path, 10, 2)
    other = digests(10, salt=7)
    pieces = cover(shard_manifests(tmp_path), 10)
    check_data(pieces[0], digests(10)[:5])
    stored = pieces[1].manifest.data["digest"]
    with pytest.raises(StoreMismatch, match=rf"000000000005-000000000010.*example 5 differs.*{stored}.*"
                                            rf"{combine(other[5:])['digest']}"):
        check_data(pieces[1], other[5:])
