"""Quality of a retraining ground truth: split-half correlation between seeds.

For outputs Y [m, r, n_test] (r seeds per subset), split the seeds into halves A = seeds
0..h-1 and B = seeds h..2h-1 (h = r // 2; with odd r the last seed is unused) and average each
half: Y_A, Y_B [m, n_test]. The split-half correlation is

    ρ = mean_t Pearson(Y_A[:, t], Y_B[:, t])     (correlation over the m subsets)

i.e. how reproducible the subset-to-subset differences of an h-seed average are. The
Spearman–Brown prediction 2ρ / (1 + ρ) estimates the reliability of the 2h-seed average that
LDS uses: the correlation that two independent 2h-seed ground truths would have. An LDS can
hardly exceed the square root of that reliability, so it bounds what a perfect method scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitHalf:
    """Split-half correlation ρ, its Spearman–Brown correction and per-test-example values."""

    correlation: float
    spearman_brown: float
    per_example: np.ndarray  # [n_test], NaN where a half is constant over the subsets
    seeds_per_half: int

    def __str__(self) -> str:
        return (f"split-half correlation {self.correlation:.4f} ({self.seeds_per_half} vs "
                f"{self.seeds_per_half} seeds), Spearman-Brown {self.spearman_brown:.4f}")


def split_half(outputs) -> SplitHalf:
    """Split-half correlation of ``outputs`` [m, r, n_test] (r >= 2 seeds, m >= 3 subsets)."""
    y = np.asarray(outputs, dtype=np.float64)
    if y.ndim != 3:
        raise ValueError(f"outputs must be [m, r, n_test], got shape {y.shape}")
    m, r, _ = y.shape
    if r < 2 or m < 3:
        raise ValueError(f"split-half needs r >= 2 seeds and m >= 3 subsets, got r={r}, m={m}")
    if not np.isfinite(y).all():
        raise ValueError("outputs contain NaN or infinite values (an incomplete ground truth?)")
    h = r // 2
    a = y[:, :h].mean(axis=1)
    b = y[:, h:2 * h].mean(axis=1)
    a -= a.mean(axis=0)
    b -= b.mean(axis=0)
    denominator = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_example = np.where(denominator > 0, (a * b).sum(axis=0) / denominator, np.nan)
    rho = float(np.nanmean(per_example))
    return SplitHalf(rho, 2 * rho / (1 + rho), per_example, h)
