"""The linear datamodeling score (LDS) with a bootstrap confidence interval over test examples.

Orientation and sign (used throughout attrkernels): ``scores`` is [n_train, n_test] and
scores[i, t] > 0 means that including training example i raises the measurement of test example
t. For subset masks M [m, n_train] and measured outputs Y [m, n_test] (averaged over the r seeds
of each subset),

    prediction  P = M @ scores                      [m, n_test]   (P[j, t] = Σ_{i ∈ S_j} τ_i(t))
    LDS_t       = Spearman(P[:, t], Y[:, t])        over the m subsets
    LDS         = mean_t LDS_t

Spearman = Pearson correlation of the ranks (ties get their average rank), as
``scipy.stats.spearmanr``. Degenerate columns: if P[:, t] is constant the method ranks no subset
above another and LDS_t = 0; if Y[:, t] is constant the ground truth cannot rank the subsets, so
LDS_t is NaN, left out of the mean, counted in ``n_undefined`` and warned about. ``centre=True``
first removes each subset's mean over the test examples from P and Y (centred LDS).

The confidence interval is the percentile bootstrap over test examples: resample the defined
LDS_t with replacement ``n_bootstrap`` times (seeded) and take the (1 ± confidence)/2 quantiles
of the resampled means.

dattri's form ``lds(scores, (gt, indices))`` is accepted too: gt [m, n_test] are the targets
and indices [m, subset_size] the training indices of each subset; dattri's ``scores`` are
[n_train, n_test] like ours, and a repeated index counts twice as in dattri's sum.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from .subsets import indices_to_counts


@dataclass(frozen=True)
class LDSResult:
    """Mean LDS, its bootstrap confidence interval and the per-test-example values."""

    mean: float
    ci_low: float
    ci_high: float
    per_example: np.ndarray  # [n_test], NaN where the ground truth is constant
    n_subsets: int
    n_undefined: int
    confidence: float

    def __str__(self) -> str:
        return (f"LDS {self.mean:.4f} [{100 * self.confidence:g}% CI {self.ci_low:.4f}, "
                f"{self.ci_high:.4f}] over {self.per_example.size - self.n_undefined} test examples, "
                f"{self.n_subsets} subsets")


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of a[:, t] and b[:, t] for every column t; NaN where a column is constant."""
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    denominator = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(axis=0) / denominator, np.nan)


def bootstrap_ci(values: np.ndarray, n_bootstrap: int = 1000, confidence: float = 0.95,
                 seed: int = 0, chunk: int = 100) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_bootstrap)
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        means[start:start + rows] = values[rng.integers(0, values.size, (rows, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def lds(scores, masks, outputs=None, *, n_bootstrap: int = 1000, confidence: float = 0.95,
        seed: int = 0, centre: bool = False) -> LDSResult:
    """LDS of attribution ``scores`` against retraining ground truth.

    scores:  [n_train, n_test] (numpy or torch); positive = including the example raises the output.
    masks:   bool (or 0/1) [m, n_train]: the training subsets; or dattri's tuple (gt, indices) with
             gt [m, n_test] and indices [m, subset_size], in which case ``outputs`` must be None.
    outputs: [m, n_test] seed-averaged measurements, or [m, r, n_test] (averaged here over r).
    n_bootstrap, confidence, seed: the bootstrap confidence interval over test examples.
    centre:  remove from each subset's outputs, and from its predictions, their mean over the test
             examples before ranking: the LDS of how a subset moves test examples relative to
             each other, without the overall shift of every output that a subset causes (for
             language models, a subset's effect on the loss of all text), which per-pair
             attribution does not aim to predict.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    scores = _array(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_train, n_test], got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
        raise TypeError(f"scores must be numeric, got dtype {scores.dtype}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores contain {int((~np.isfinite(scores)).sum())} NaN or infinite values")
    n_train, n_test = scores.shape
    if isinstance(masks, tuple):
        if outputs is not None:
            raise TypeError("pass either lds(scores, masks, outputs) or dattri's lds(scores, (gt, indices)), not both")
        if len(masks) != 2:
            raise ValueError(f"dattri's ground truth is a pair (gt, indices), got a tuple of {len(masks)}")
        outputs, indices = _array(masks[0]), _array(masks[1])
        weights = indices_to_counts(indices, n_train)
        names = ("indices", "gt")
    else:
        if outputs is None:
            raise TypeError("outputs is required (or pass dattri's (gt, indices) tuple as masks)")
        weights, outputs = _array(masks), _array(outputs)
        names = ("masks", "outputs")
        if weights.dtype != bool and not np.isin(weights, (0, 1)).all():
            raise ValueError("masks must be boolean (or 0/1) [m, n_train]")
    if weights.ndim != 2:
        raise ValueError(f"{names[0]} must be 2-D [m, ...], got shape {weights.shape}")
    m = weights.shape[0]
    if weights.shape[1] != n_train:
        hint = (" (scores look transposed: pass scores.T, shape [n_train, n_test])"
                if scores.shape[1] == weights.shape[1] else "")
        raise ValueError(f"scores has {n_train} rows (training examples) but {names[0]} describes "
                         f"subsets of {weights.shape[1]} training examples{hint}")
    if outputs.ndim == 3:
        outputs = outputs.mean(axis=1)
    if outputs.ndim != 2 or outputs.shape[0] != m:
        raise ValueError(f"{names[1]} must be [m={m}, n_test] or [m, r, n_test], got shape {outputs.shape}")
    if outputs.shape[1] != n_test:
        raise ValueError(f"scores has {n_test} columns (test examples) but {names[1]} has "
                         f"{outputs.shape[1]}; scores must be [n_train, n_test]")
    if not np.isfinite(outputs).all():
        raise ValueError(f"{names[1]} contain NaN or infinite values (an incomplete ground truth?)")
    if m < 3:
        raise ValueError(f"LDS needs at least 3 subsets to rank, got {m}")

    dtype = np.float32 if scores.dtype == np.float32 else np.float64
    predictions = weights.astype(dtype) @ scores.astype(dtype, copy=False)
    if centre:
        predictions = predictions - predictions.mean(axis=1, keepdims=True)
        outputs = outputs - outputs.mean(axis=1, keepdims=True)
    per_example = spearman_columns(predictions, outputs)
    flat_prediction = np.ptp(predictions, axis=0) == 0
    flat_truth = np.ptp(outputs, axis=0) == 0
    per_example[flat_prediction] = 0.0
    per_example[flat_truth] = np.nan
    n_undefined = int(flat_truth.sum())
    if n_undefined:
        warnings.warn(f"{n_undefined} of {n_test} test examples have a constant ground truth over the "
                      "subsets; they are left out of the LDS", RuntimeWarning, stacklevel=2)
    defined = per_example[~np.isnan(per_example)]
    mean = float(defined.mean()) if defined.size else float("nan")
    low, high = bootstrap_ci(defined, n_bootstrap, confidence, seed)
    return LDSResult(mean, low, high, per_example, m, n_undefined, confidence)
