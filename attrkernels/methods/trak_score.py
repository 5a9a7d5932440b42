"""TRAK's scoring and self-influence in tiles, from features on disk, with memory bounded
independently of n_train and of n_train x n_test.

With M checkpoints, stored features Phi_m [n_train, k] and weights Q_m [n_train], and the solves
X_m = phi_m (K_m + lambda_m I)^{-1} [n_test, k] (float32, held by the caller):

    scores[i, j] = (sum_m Q_m[i] / M^2) sum_m Phi_m[i] . X_m[j]                   [n_train, n_test]
    self[i]      = (sum_m Q_m[i] / M^2) sum_m Phi_m[i] (K_m + lambda_m I)^{-1} Phi_m[i]^T   [n_train]

(the first is the formula of ``methods.trak`` with Qbar = sum_m Q_m / M; the second is its
diagonal with the training examples as the test set). Scores are computed in float32 whatever the
storage dtype of Phi. ``score_rows`` passes over the training rows once per block of ``cols``
test columns: memory = M cols k (the solves' block) + tile k (one tile of features per
checkpoint, read by plain reads) + rows cols (the output tile, rows = ``tile`` or fewer so that
it stays under TILE_BUDGET bytes), 4 bytes each.
"""
from __future__ import annotations

import numpy as np
import torch

from .trak_store import Features, cho_solve

DEFAULT_SOLVE_BUDGET = 1 << 30  # bytes of X_m columns held per block of test columns
TILE_BUDGET = 256 << 20  # bytes of one output tile


def column_block(n_test: int, k: int, num_checkpoints: int, budget: int | None = None) -> int:
    """How many test columns of every X_m fit in ``budget`` bytes (default DEFAULT_SOLVE_BUDGET; at least one)."""
    budget = DEFAULT_SOLVE_BUDGET if budget is None else budget
    return max(1, min(n_test, budget // (4 * k * num_checkpoints)))


def score_rows(features: list[Features], solves: list[np.ndarray], r0: int, r1: int, write, *,
               tile: int, cols: int, progress=None) -> None:
    """Call ``write(row, col, scores_tile)`` for every tile of training rows [r0, r1) x test
    columns (see the module docstring)."""
    M, n_test = len(features), solves[0].shape[0]
    for c0 in range(0, n_test, cols):
        c1 = min(n_test, c0 + cols)
        X = [torch.from_numpy(np.ascontiguousarray(s[c0:c1], dtype=np.float32)) for s in solves]
        step = max(1, min(tile, TILE_BUDGET // (4 * (c1 - c0))))
        for t0 in range(r0, r1, step):
            t1 = min(r1, t0 + step)
            acc, qsum = torch.zeros(t1 - t0, c1 - c0), np.zeros(t1 - t0, np.float64)
            for m in range(M):
                phi, q = features[m].rows(t0, t1)
                acc.addmm_(phi, X[m].T)
                qsum += q
            acc *= torch.from_numpy((qsum / M ** 2).astype(np.float32)).reshape(-1, 1)
            write(t0, c0, acc)
            del acc  # before the next tile is allocated: one output tile at a time
            if progress is not None:
                progress((t1 - t0) * (c1 - c0))


def self_influence_rows(features: list[Features], factors: list[np.ndarray], r0: int, r1: int, *,
                        tile: int) -> np.ndarray:
    """self[i] for training rows [r0, r1) (float64 solves, float32 result), a tile at a time."""
    M = len(features)
    out = np.empty(r1 - r0, np.float32)
    for t0 in range(r0, r1, tile):
        t1 = min(r1, t0 + tile)
        total, qsum = np.zeros(t1 - t0), np.zeros(t1 - t0)
        for m in range(M):
            phi, q = features[m].rows(t0, t1)
            phi = phi.double().numpy()
            total += np.einsum("ik,ki->i", phi, cho_solve(factors[m], phi.T))
            qsum += q
        out[t0 - r0:t1 - r0] = qsum / M ** 2 * total
    return out
