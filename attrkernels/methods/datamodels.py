"""Datamodels (Ilyas et al., 2022): regress retrained models' outputs on their training subsets.

For m retrained models with subset masks X ∈ {0, 1}^{m×n} (n = n_train) and measured outputs
Y [m, n_test] (seed-averaged), fit per test example t the linear datamodel

    Y[:, t] ≈ b_t + X θ_t,          θ_t ∈ R^n,

so that θ_t[i] estimates how much including training example i raises the measurement of test
example t: ``score()`` = Θ = [θ_1 .. θ_T], [n_train, n_test], the attrkernels orientation.
When every subset has the same size, adding a constant to θ_t and subtracting it times the size
from b_t fits equally well (the ones vector is in the null space of the centred masks): ridge
returns the solution with Σ_i θ_t[i] = 0, the lasso the shift of least ℓ1 norm. LDS is unaffected.
With X_c, Y_c the column-centred X and Y (b_t is not penalised):

- ``estimator="ridge"`` minimises ||Y_c - X_c Θ||² + λ_t ||θ_t||². With the thin SVD
  X_c = U diag(s) Vᵀ, Θ = V diag(s / (s² + λ_t)) Uᵀ Y_c: one SVD serves every test example and
  every λ. ``l2=None`` picks λ_t per test example from a log grid by generalised cross-validation,
  GCV_t(λ) = m RSS_t(λ) / (m - 1 - Σ s²/(s² + λ))².
- ``estimator="lasso"`` minimises (1/2m) ||Y_c - X_c Θ||² + Σ_t λ_t ||θ_t||_1 by FISTA on all
  columns at once (gradient G Θ - B with G = X_cᵀX_c/m, B = X_cᵀY_c/m, step 1/‖G‖₂, per-column
  soft thresholding). ``l1`` is λ as a fraction of λ_max,t = ‖B[:, t]‖_∞ (the smallest λ giving
  θ_t = 0); ``l1=None`` picks the fraction per test example on a 20% holdout of the subsets along
  a warm-started path, then refits on all subsets.

The training models come from their own ground-truth directory, built with a protocol seed
(default 1) different from the LDS evaluation's (default 0): other subsets and other model
seeds. ``fit(exclude=...)`` refuses subsets shared with an evaluation ground truth.

Cost: ``cost["train_seconds"]`` is the summed one-core training time of the models used (the
compute to produce them, whatever the parallelism), ``cost["fit_seconds"]`` the regression's
wall time, ``cost["total_seconds"]`` their sum.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from ..utils.checks import check_number, check_positive_int, check_seed

ESTIMATORS = ("ridge", "lasso")


class Datamodels:
    """Direct datamodel estimator from retrained models.

    Not built from a model and loaders like the gradient-based methods (``methods.base``): it
    fits on the outputs of models retrained on training subsets, and scores the test examples of
    that ground truth.

    Datamodels(task=None, directory=None, *, m=1000, r=1, alpha=0.5, seed=1, estimator="ridge",
               l2=None, l1=None, workers=None, verbose=True)

    task, directory: a Benchmark (``ak.tasks.get(name)``) and the ground-truth directory for its
        training models (both needed only when ``fit()`` trains them); m, r, alpha, seed: that ground truth's protocol
        (m subsets of alpha * n_train examples, r seeds each, seeded by ``seed``);
    estimator, l2, l1: the regression (module docstring); workers, verbose: for the harness.

    ``fit(ground_truth=None, exclude=None)`` trains the missing models (``ground_truth=None``) or
    uses a given ``GroundTruth`` or ``(masks [m, n_train], outputs [m, n_test] or [m, r, n_test])``,
    and regresses. ``score(test_indices=None)`` returns float32 torch scores [n_train, n_test].
    """

    def __init__(self, task=None, directory=None, *, m: int = 1000, r: int = 1, alpha: float = 0.5,
                 seed: int = 1, estimator: str = "ridge", l2: Optional[float] = None,
                 l1: Optional[float] = None, workers: Optional[int] = None, verbose: bool = True):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        check_number("l2", l2, positive=True, optional=True)
        check_positive_int("m", m)
        check_positive_int("r", r)
        check_seed(seed)
        check_positive_int("workers", workers, optional=True)
        if l1 is not None and not 0 < l1 < 1:
            raise ValueError(f"l1 is a fraction of lambda_max and must be in (0, 1), got {l1}")
        self.task, self.directory = task, directory
        self.protocol = {"m": m, "r": r, "alpha": alpha, "seed": seed}
        self.estimator, self.l2, self.l1 = estimator, l2, l1
        self.workers, self.verbose = workers, verbose
        self.weights: Optional[np.ndarray] = None  # Θ [n_train, n_test]
        self.intercept: Optional[np.ndarray] = None  # b [n_test]
        self.penalty: Optional[np.ndarray] = None  # chosen λ_t (ridge) or λ_t / λ_max,t (lasso), [n_test]
        self.cost: dict = {}

    def fit(self, ground_truth=None, *, exclude=None) -> "Datamodels":
        """Regress outputs on masks; ``exclude`` (a GroundTruth or masks) must share no subset."""
        train_seconds = 0.0
        if ground_truth is None:
            if self.task is None or self.directory is None:
                raise ValueError("Datamodels.fit() without ground_truth needs task and directory "
                                 "to train its models")
            from ..eval import build_ground_truth

            ground_truth = build_ground_truth(self.task, self.directory, self.protocol,
                                              workers=self.workers, verbose=self.verbose)
        if isinstance(ground_truth, tuple):
            masks, outputs = ground_truth
        else:
            masks, outputs = ground_truth.masks, ground_truth.mean_outputs()
            train_seconds = ground_truth.train_seconds()
        masks, outputs = _as_numpy(masks), _as_numpy(outputs)
        if outputs.ndim == 3:
            outputs = outputs.mean(axis=1)
        _check(masks, outputs)
        if exclude is not None:
            _check_disjoint(masks, getattr(exclude, "masks", exclude))

        start = time.perf_counter()
        x = masks.astype(np.float64)
        y = outputs.astype(np.float64)
        x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
        xc, yc = x - x_mean, y - y_mean
        if self.estimator == "ridge":
            self.weights, self.penalty = ridge(xc, yc, self.l2)
        else:
            self.weights, self.penalty = lasso(xc, yc, self.l1)
        self.intercept = y_mean - x_mean @ self.weights
        fit_seconds = time.perf_counter() - start
        self.cost = {"n_models": int(masks.shape[0]), "train_seconds": float(train_seconds),
                     "fit_seconds": fit_seconds, "total_seconds": float(train_seconds) + fit_seconds}
        return self

    def score(self, test_indices=None) -> torch.Tensor:
        """Scores [n_train, n_test] (columns ``test_indices`` if given) as a float32 tensor."""
        if self.weights is None:
            raise RuntimeError("call Datamodels.fit() before score()")
        weights = self.weights if test_indices is None else self.weights[:, np.asarray(test_indices)]
        return torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _check(masks: np.ndarray, outputs: np.ndarray) -> None:
    if masks.ndim != 2:
        raise ValueError(f"masks must be [m, n_train], got shape {masks.shape}")
    if masks.dtype != bool and not np.isin(masks, (0, 1)).all():
        raise ValueError("masks must be boolean (or 0/1)")
    if outputs.ndim != 2 or outputs.shape[0] != masks.shape[0]:
        raise ValueError(f"outputs must be [m={masks.shape[0]}, n_test] or [m, r, n_test], "
                         f"got shape {outputs.shape}")
    if masks.shape[0] < 3:
        raise ValueError(f"datamodels need at least 3 retrained models, got {masks.shape[0]}")
    if not np.isfinite(outputs).all():
        raise ValueError("outputs contain NaN or infinite values (an incomplete ground truth?)")


def _check_disjoint(masks: np.ndarray, other) -> None:
    other = _as_numpy(other).astype(bool)
    if other.ndim != 2 or other.shape[1] != masks.shape[1]:
        raise ValueError(f"exclude must be masks [m', n_train={masks.shape[1]}], got shape {other.shape}")
    shared = {row.tobytes() for row in np.packbits(masks.astype(bool), axis=1)} & \
             {row.tobytes() for row in np.packbits(other, axis=1)}
    if shared:
        raise ValueError(f"{len(shared)} datamodel training subsets are also evaluation subsets; build "
                         "the datamodel ground truth with another protocol seed")


def ridge(xc: np.ndarray, yc: np.ndarray, l2: Optional[float] = None,
          grid: int = 41) -> tuple[np.ndarray, np.ndarray]:
    """Ridge weights [n, T] of centred yc [m, T] on centred xc [m, n], and λ_t [T] (GCV if l2 is None)."""
    m = xc.shape[0]
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    keep = s > s[0] * 1e-10
    u, s, vt = u[:, keep], s[keep], vt[keep]
    z = u.T @ yc  # [k, T]
    if l2 is not None:
        lam = np.full(yc.shape[1], float(l2))
    else:
        candidates = s[0] ** 2 * np.logspace(-6, 1, grid)  # [L]
        shrink = candidates[:, None] / (s[None, :] ** 2 + candidates[:, None])  # [L, k]
        outside = (yc * yc).sum(axis=0) - (z * z).sum(axis=0)  # residual outside span(U), [T]
        rss = outside[None, :] + (shrink ** 2) @ (z * z)  # [L, T]
        dof = (1 - shrink).sum(axis=1)  # [L]
        gcv = m * rss / np.maximum(m - 1 - dof, 1e-12)[:, None] ** 2
        lam = candidates[gcv.argmin(axis=0)]
    factor = s[:, None] / (s[:, None] ** 2 + lam[None, :])  # [k, T]
    return vt.T @ (factor * z), lam


def _fista(gram: np.ndarray, b: np.ndarray, lam: np.ndarray, theta: np.ndarray, step: float,
           max_iter: int, tol: float) -> np.ndarray:
    """FISTA for min_Θ ½ tr(Θᵀ G Θ) - tr(Bᵀ Θ) + Σ_t lam_t ‖θ_t‖₁ from ``theta``."""
    momentum, previous, point = 1.0, theta, theta
    threshold = step * lam[None, :]
    for _ in range(max_iter):
        v = point - step * (gram @ point - b)
        current = np.sign(v) * np.maximum(np.abs(v) - threshold, 0.0)
        next_momentum = (1 + np.sqrt(1 + 4 * momentum ** 2)) / 2
        point = current + ((momentum - 1) / next_momentum) * (current - previous)
        change = np.abs(current - previous).max()
        previous, momentum = current, next_momentum
        if change <= tol * max(np.abs(current).max(), 1e-12):
            break
    return previous


def lasso(xc: np.ndarray, yc: np.ndarray, l1: Optional[float] = None, path: int = 8,
          max_iter: int = 300, tol: float = 1e-5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ℓ1 weights [n, T] of centred yc on centred xc, and the λ fractions [T] (holdout if l1 is None)."""
    m = xc.shape[0]

    def solve(x, y, fractions, theta=None):
        gram, b = x.T @ x / x.shape[0], x.T @ y / x.shape[0]
        step = 1.0 / max(np.linalg.eigvalsh(gram)[-1], 1e-12)
        lam = fractions * np.abs(b).max(axis=0)
        start = np.zeros_like(b) if theta is None else theta
        return _fista(gram, b, lam, start, step, max_iter, tol)

    if l1 is not None:
        fractions = np.full(yc.shape[1], float(l1))
        return solve(xc, yc, fractions), fractions
    order = np.random.default_rng(seed).permutation(m)
    held, kept = order[: max(1, m // 5)], order[max(1, m // 5):]
    x_fit, y_fit = xc[kept] - xc[kept].mean(axis=0), yc[kept] - yc[kept].mean(axis=0)
    grid = np.logspace(-1, -4, path)
    theta, errors, thetas = None, [], []
    for fraction in grid:
        theta = solve(x_fit, y_fit, np.full(yc.shape[1], fraction), theta)
        prediction = (xc[held] - xc[kept].mean(axis=0)) @ theta + yc[kept].mean(axis=0)
        errors.append(((prediction - yc[held]) ** 2).mean(axis=0))
        thetas.append(theta)
    best = np.argmin(np.stack(errors), axis=0)  # [T]
    fractions = grid[best]
    warm = np.stack(thetas)[best, :, np.arange(yc.shape[1])].T  # [n, T]
    return solve(xc, yc, fractions, warm), fractions
