"""Datamodels: recovery of a planted linear datamodel, the harness path, bad input."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attrkernels as ak
from attrkernels.eval import build_ground_truth, lds, sample_masks
from attrkernels.methods import Datamodels

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tasks import TinyLogReg  # noqa: E402


def planted(n=150, t=20, m=500, noise=0.3, seed=0):
    """Outputs Y = 1.5 + X Θ + noise with a sparse Θ [n, t] and subset masks X [m, n]."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n, t)) * (rng.random((n, t)) < 0.15)
    masks = sample_masks(n, m, 0.5, seed + 1)
    return theta, masks, 1.5 + masks @ theta + noise * rng.normal(size=(m, t))


@pytest.mark.parametrize("estimator", ["ridge", "lasso"])
def test_recovers_a_planted_linear_datamodel(estimator):
    theta, masks, outputs = planted()
    model = Datamodels(estimator=estimator).fit((masks, outputs))
    scores = model.score()
    assert isinstance(scores, torch.Tensor) and scores.shape == theta.shape  # [n_train, n_test]
    correlation = [np.corrcoef(scores[:, t].numpy(), theta[:, t])[0, 1] for t in range(theta.shape[1])]
    assert min(correlation) > 0.9
    np.testing.assert_allclose(model.intercept + masks.mean(0) @ model.weights,
                               outputs.mean(0), atol=1e-8)
    held_out = sample_masks(150, 60, 0.5, 9)
    assert lds(scores, held_out, held_out @ theta).mean > 0.9
    assert model.score([3, 5]).shape == (150, 2)


def test_ridge_with_tiny_penalty_is_least_squares():
    # Subsets of one size make the intercept collinear with Σ_i mask_i, so compare fitted values
    # and check that the weights are the minimum-norm solution (orthogonal to the ones vector).
    theta, masks, outputs = planted(n=40, m=200)
    model = Datamodels(l2=1e-9).fit((masks, outputs))
    design = np.hstack([np.ones((200, 1)), masks])
    expected = design @ np.linalg.lstsq(design, outputs, rcond=None)[0]
    np.testing.assert_allclose(model.intercept + masks @ model.weights, expected, atol=1e-6)
    np.testing.assert_allclose(model.weights.sum(axis=0), 0, atol=1e-6)


def test_lasso_is_sparse():
    theta, masks, outputs = planted()
    weights = Datamodels(estimator="lasso", l1=0.05).fit((masks, outputs)).weights
    assert (weights == 0).mean() > 0.5


def test_trains_its_models_with_the_harness_and_records_cost(tmp_path):
    task = TinyLogReg()
    evaluation = build_ground_truth(task, tmp_path / "eval", {"m": 6, "r": 1}, workers=1, verbose=False)
    model = Datamodels(task, tmp_path / "dm", m=20, workers=1, verbose=False).fit(exclude=evaluation)
    assert model.score().shape == (60, 20)
    cost = model.cost
    assert cost["n_models"] == 20 and cost["train_seconds"] > 0 and cost["fit_seconds"] > 0
    assert cost["total_seconds"] == pytest.approx(cost["train_seconds"] + cost["fit_seconds"])
    with pytest.raises(ValueError, match="also evaluation subsets"):
        Datamodels(task, tmp_path / "eval2", m=6, seed=0, workers=1, verbose=False).fit(exclude=evaluation)


def test_bad_input():
    theta, masks, outputs = planted(n=30, m=40)
    with pytest.raises(ValueError, match=r"outputs must be \[m=40"):
        Datamodels().fit((masks, outputs[:30]))
    with pytest.raises(ValueError, match="estimator"):
        Datamodels(estimator="ols")
    with pytest.raises(ValueError, match="needs task and directory"):
        Datamodels().fit()
    with pytest.raises(RuntimeError, match="fit"):
        Datamodels().score()
    assert ak.Datamodels is Datamodels
