"""LDS: hand-made cases, agreement with scipy, bootstrap CI, dattri's form, bad input."""
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import attrkernels as ak
from attrkernels.eval import lds, sample_masks, spearman_columns


def planted(n=80, m=40, t=25, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n, t))
    masks = sample_masks(n, m, 0.5, seed)
    return theta, masks, masks @ theta


def test_perfect_reversed_shuffled():
    theta, masks, outputs = planted()
    assert lds(theta, masks, outputs).mean == pytest.approx(1.0)
    assert lds(-theta, masks, outputs).mean == pytest.approx(-1.0)
    theta, masks, outputs = planted(t=400)
    shuffled = theta[np.random.default_rng(1).permutation(theta.shape[0])]
    result = lds(shuffled, masks, outputs)
    assert abs(result.mean) < 0.05
    assert result.ci_low < 0 < result.ci_high


def test_matches_scipy_per_example():
    theta, masks, outputs = planted()
    rng = np.random.default_rng(2)
    noisy = outputs + rng.normal(scale=3.0, size=outputs.shape)
    scores = theta + rng.normal(size=theta.shape)
    result = lds(torch.tensor(scores, dtype=torch.float64), torch.tensor(masks), torch.tensor(noisy))
    predictions = masks.astype(float) @ scores
    expected = [spearmanr(predictions[:, j], noisy[:, j]).statistic for j in range(noisy.shape[1])]
    np.testing.assert_allclose(result.per_example, expected, rtol=1e-10, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected))


def test_spearman_columns_ties_match_scipy():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, size=(30, 6)).astype(float)
    b = rng.normal(size=(30, 6))
    expected = [spearmanr(a[:, j], b[:, j]).statistic for j in range(6)]
    np.testing.assert_allclose(spearman_columns(a, b), expected, rtol=1e-12)


def test_bootstrap_ci_contains_mean_and_is_seeded():
    theta, masks, outputs = planted(t=60)
    noisy = outputs + np.random.default_rng(4).normal(scale=4.0, size=outputs.shape)
    result = lds(theta, masks, noisy, n_bootstrap=500, seed=7)
    assert result.ci_low < result.mean < result.ci_high
    assert 0 < result.mean < 1
    again = lds(theta, masks, noisy, n_bootstrap=500, seed=7)
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)
    assert "LDS" in str(result)


def test_seed_axis_is_averaged():
    theta, masks, outputs = planted()
    noise = np.random.default_rng(5).normal(size=(outputs.shape[0], 3, outputs.shape[1]))
    per_seed = outputs[:, None, :] + noise
    a = lds(theta, masks, per_seed)
    b = lds(theta, masks, per_seed.mean(axis=1))
    np.testing.assert_array_equal(a.per_example, b.per_example)


def test_dattri_form_gives_the_same_answer():
    theta, masks, outputs = planted()
    noisy = outputs + np.random.default_rng(6).normal(scale=2.0, size=outputs.shape)
    indices = np.stack([np.flatnonzero(row) for row in masks])
    ours = lds(theta, masks, noisy)
    theirs = lds(torch.tensor(theta), (torch.tensor(noisy), torch.tensor(indices)))
    np.testing.assert_allclose(theirs.per_example, ours.per_example, rtol=1e-12)
    assert theirs.mean == pytest.approx(ours.mean)


def test_agrees_with_installed_dattri():
    metrics = pytest.importorskip("dattri.metric")
    theta, masks, outputs = planted(t=10)
    noisy = outputs + np.random.default_rng(8).normal(scale=2.0, size=outputs.shape)
    indices = torch.tensor(np.stack([np.flatnonzero(row) for row in masks]))
    corr, _ = metrics.lds(torch.tensor(theta), (torch.tensor(noisy), indices))
    np.testing.assert_allclose(lds(theta, masks, noisy).per_example, corr.numpy(), rtol=1e-10)


def test_degenerate_columns():
    theta, masks, outputs = planted(t=4)
    scores = theta.copy()
    scores[:, 0] = 1.0  # constant prediction: the method ranks nothing -> 0
    outputs = outputs.copy()
    outputs[:, 1] = 2.0  # constant ground truth: undefined, left out
    with pytest.warns(RuntimeWarning, match="constant ground truth"):
        result = lds(scores, masks, outputs)
    assert result.per_example[0] == 0.0 and np.isnan(result.per_example[1])
    assert result.n_undefined == 1
    assert result.mean == pytest.approx(np.mean([0.0, 1.0, 1.0]))


def test_exported_from_package():
    assert ak.lds is lds


@pytest.mark.parametrize("case, message", [
    ("transposed", "scores.T"),
    ("rows", "rows \\(training examples\\)"),
    ("columns", "columns \\(test examples\\)"),
    ("subsets", "outputs must be \\[m=40"),
    ("nan", "NaN"),
    ("mask values", "masks must be boolean"),
    ("scores 1-D", "scores must be 2-D"),
])
def test_bad_input_names_the_argument(case, message):
    theta, masks, outputs = planted(n=80, t=25)
    args = {"scores": theta, "masks": masks, "outputs": outputs}
    if case == "transposed":
        args["scores"] = theta.T
    elif case == "rows":
        args["scores"] = theta[:70]
    elif case == "columns":
        args["scores"] = theta[:, :20]
    elif case == "subsets":
        args["outputs"] = outputs[:30]
    elif case == "nan":
        args["outputs"] = outputs.copy()
        args["outputs"][0, 0] = np.nan
    elif case == "mask values":
        args["masks"] = masks * 2
    elif case == "scores 1-D":
        args["scores"] = theta[:, 0]
    with pytest.raises(ValueError, match=message):
        lds(**args)


def test_dattri_form_rejects_outputs_too():
    theta, masks, outputs = planted()
    indices = np.stack([np.flatnonzero(row) for row in masks])
    with pytest.raises(TypeError, match="not both"):
        lds(theta, (outputs, indices), outputs)
    with pytest.raises(ValueError, match="indices must lie in"):
        lds(theta[:50], (outputs, indices))


def test_centred_lds_ignores_a_shift_of_every_output_of_a_subset():
    rng = np.random.default_rng(0)
    masks = rng.random((30, 40)) < 0.5
    scores = rng.normal(size=(40, 12))
    outputs = masks @ scores + 0.3 * rng.normal(size=(30, 12))
    shifted = outputs + 50.0 * rng.normal(size=(30, 1))  # one shift per subset, all test examples
    assert lds(scores, masks, shifted).mean < 0.5 * lds(scores, masks, outputs).mean
    centred = lds(scores, masks, shifted, centre=True).mean
    assert abs(centred - lds(scores, masks, outputs, centre=True).mean) < 1e-12
    assert centred > 0.5
