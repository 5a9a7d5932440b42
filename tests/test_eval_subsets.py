"""Subset sampling, protocol resolution and model seeds."""
import numpy as np
import pytest

from attrkernels.eval import Protocol, indices_to_counts, model_seed, resolve_protocol, sample_masks
from attrkernels.tasks import get


def test_masks_have_the_protocol_size_and_are_seeded():
    masks = sample_masks(101, 20, alpha=0.5, seed=3)
    assert masks.shape == (20, 101) and masks.dtype == bool
    assert (masks.sum(axis=1) == 50).all()  # round(0.5 * 101) = 50 (round half to even)
    np.testing.assert_array_equal(masks, sample_masks(101, 20, alpha=0.5, seed=3))
    assert not np.array_equal(masks, sample_masks(101, 20, alpha=0.5, seed=4))
    assert len({row.tobytes() for row in masks}) == 20


def test_fewer_subsets_are_a_prefix():
    np.testing.assert_array_equal(sample_masks(50, 5, seed=1), sample_masks(50, 12, seed=1)[:5])


def test_model_seeds_are_distinct_and_stable():
    seeds = {model_seed(0, j, k) for j in range(30) for k in range(4)}
    assert len(seeds) == 120
    assert model_seed(0, 3, 1) == model_seed(0, 3, 1) != model_seed(1, 3, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_resolve_protocol():
    task = get("digits-mlp")
    assert resolve_protocol(task, "quick") == Protocol(**task.lds_protocols["quick"])
    assert resolve_protocol(task, "default", seed=1).seed == 1
    assert resolve_protocol(task, {"m": 3, "r": 1}) == Protocol(3, 1)
    with pytest.raises(KeyError, match="'nope' is not defined"):
        resolve_protocol(task, "nope")
    with pytest.raises(ValueError, match="alpha"):
        Protocol(m=3, r=1, alpha=1.5)
    with pytest.raises(TypeError, match="Protocol.m"):
        Protocol(m=3.0, r=1)


def test_indices_to_counts():
    counts = indices_to_counts(np.array([[0, 2], [1, 1]]), 3)
    np.testing.assert_array_equal(counts, [[1, 0, 1], [0, 2, 0]])
    with pytest.raises(ValueError, match="indices must lie in"):
        indices_to_counts(np.array([[0, 3]]), 3)
    with pytest.raises(ValueError, match="integer array"):
        indices_to_counts(np.array([[0.0, 1.0]]), 3)
