"""Data fingerprints: independent of batching, sensitive to any change of data or order."""
import numpy as np
import pytest
import torch

from attrkernels.store import DataMismatch, DataPass, combine, example_digests


def _passes(batches):
    p = DataPass()
    start = 0
    for b in batches:
        p.update(start, b, b[0].shape[0])
        start += b[0].shape[0]
    p.finish()
    return p


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.arange(n) % 3


def _batched(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def test_fingerprint_does_not_depend_on_batching():
    x, y = _data()
    assert _passes(_batched(x, y, 5)).fingerprint() == _passes(_batched(x, y, 12)).fingerprint()


def test_fingerprint_changes_with_one_value_the_order_or_the_count():
    x, y = _data()
    base = _passes(_batched(x, y, 4)).fingerprint()
    x2 = x.clone()
    x2[7, 1] += 1e-6
    assert _passes(_batched(x2, y, 4)).fingerprint() != base
    y2 = y.clone()
    y2[3] = (y2[3] + 1) % 3
    assert _passes(_batched(x, y2, 4)).fingerprint() != base
    perm = torch.arange(12).flip(0)
    assert _passes(_batched(x[perm], y[perm], 4)).fingerprint() != base
    assert _passes(_batched(x[:8], y[:8], 4)).fingerprint() != base
    assert base["examples"] == 12


def test_dict_batches_and_non_tensor_values():
    x, y = _data(4)
    a = example_digests({"input_ids": x, "labels": y, "note": "v1"}, 4)
    b = example_digests({"input_ids": x, "labels": y, "note": "v2"}, 4)
    assert a.shape == (4,) and not np.array_equal(a, b)


def test_second_pass_names_the_first_differing_example_and_the_fix():
    x, y = _data()
    first = _passes(_batched(x, y, 4))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    check = DataPass(first.digests(), context="checkpoint 1")
    with pytest.raises(DataMismatch, match=r"train example \d+ differs .*\(checkpoint 1\).*reorders.*shuffle=False"):
        for i, b in enumerate(_batched(x[perm], y[perm], 4)):
            check.update(4 * i, b, 4)


def test_second_pass_with_fewer_examples_or_none():
    x, y = _data()
    first = _passes(_batched(x, y, 5))
    short = DataPass(first.digests())
    for i, b in enumerate(_batched(x, y, 5)[:2]):  # drop_last
        short.update(5 * i, b, 5)
    with pytest.raises(DataMismatch, match="yielded 10 examples, the first pass 12.*drop_last=False"):
        short.finish()
    with pytest.raises(ValueError, match="yielded no examples.*generator"):
        DataPass(first.digests()).finish()


def test_combine_is_order_sensitive():
    d = np.arange(5, dtype=np.uint64)
    assert combine(d) != combine(d[::-1])
