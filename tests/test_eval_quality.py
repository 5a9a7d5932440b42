"""Split-half correlation of a ground truth."""
import numpy as np
import pytest

from attrkernels.eval import split_half


def test_noiseless_ground_truth_is_perfectly_reliable():
    signal = np.random.default_rng(0).normal(size=(30, 1, 12))
    result = split_half(np.repeat(signal, 4, axis=1))
    assert result.correlation == pytest.approx(1.0)
    assert result.spearman_brown == pytest.approx(1.0)


def test_matches_the_signal_to_noise_ratio():
    # Y = S + noise: an h-seed mean has correlation var(S) / (var(S) + σ²/h) with another.
    rng = np.random.default_rng(1)
    m, r, t, sigma = 400, 4, 50, 1.0
    outputs = rng.normal(size=(m, 1, t)) + sigma * rng.normal(size=(m, r, t))
    result = split_half(outputs)
    expected = 1 / (1 + sigma ** 2 / 2)
    assert result.seeds_per_half == 2
    assert result.correlation == pytest.approx(expected, abs=0.02)
    assert result.spearman_brown == pytest.approx(2 * expected / (1 + expected), abs=0.02)


def test_needs_two_seeds_and_complete_outputs():
    with pytest.raises(ValueError, match="r >= 2"):
        split_half(np.zeros((5, 1, 3)))
    bad = np.random.default_rng(2).normal(size=(5, 2, 3))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="incomplete"):
        split_half(bad)
