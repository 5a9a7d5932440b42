"""Training subsets of the LDS protocol, as boolean masks, and the seeds of retrained models.

A protocol (``Protocol``) draws ``m`` subsets S_1..S_m of size round(alpha * n_train) uniformly
without replacement and trains ``r`` models on each; LDS compares Σ_{i ∈ S_j} τ_i with the
seed-averaged measurement of the models trained on S_j.

Seeding. Row j of the mask matrix is the j-th draw ``rng.choice(n, size, replace=False)`` of
``rng = np.random.default_rng(seed)``, so the first m' rows of a protocol with m > m' subsets
are the subsets of the protocol with m'. Model k on subset j trains with seed
``model_seed(seed, j, k)`` (NumPy ``SeedSequence([seed, j, k])``, 63 bits). Two protocols with
different seeds thus share neither subsets nor model seeds: that is how the models that fit a
datamodel are kept apart from the models of an LDS evaluation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Protocol:
    """m subsets of alpha * n_train examples, r models (seeds) per subset, drawn from ``seed``."""

    m: int
    r: int
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self):
        for name in ("m", "r", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"Protocol.{name} must be an int, got {value!r}")
        if self.m < 1 or self.r < 1:
            raise ValueError(f"Protocol.m and Protocol.r must be >= 1, got m={self.m}, r={self.r}")
        if self.seed < 0:
            raise ValueError(f"Protocol.seed must be >= 0, got {self.seed}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"Protocol.alpha must be in (0, 1], got {self.alpha}")

    def subset_size(self, n_train: int) -> int:
        """round(alpha * n_train), at least 1."""
        return max(1, int(round(self.alpha * n_train)))

    def to_dict(self) -> dict:
        return {k: (float(v) if k == "alpha" else int(v)) for k, v in asdict(self).items()}


def resolve_protocol(benchmark, protocol="default", **overrides) -> Protocol:
    """A ``Protocol`` from a name in ``benchmark.lds_protocols``, a dict, or a Protocol.

    ``overrides`` (e.g. ``seed=1``) replace fields of the named or given protocol.
    """
    if isinstance(protocol, str):
        presets = getattr(benchmark, "lds_protocols", {})
        if protocol not in presets:
            raise KeyError(f"protocol {protocol!r} is not defined for task "
                           f"{getattr(benchmark, 'name', benchmark)!r}; known: {sorted(presets)}")
        fields = dict(presets[protocol])
    elif isinstance(protocol, Protocol):
        fields = asdict(protocol)
    elif isinstance(protocol, dict):
        fields = dict(protocol)
    else:
        raise TypeError(f"protocol must be a name, a dict or a Protocol, got {type(protocol).__name__}")
    fields.update(overrides)
    return Protocol(**fields)


def sample_masks(n_train: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean masks [m, n_train]; row j marks a uniform subset of round(alpha * n_train) examples."""
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    size = Protocol(m=m, r=1, alpha=alpha, seed=seed).subset_size(n_train)
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n_train), dtype=bool)
    for j in range(m):
        masks[j, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def model_seed(seed: int, subset: int, run: int) -> int:
    """Training seed of model ``run`` on subset ``subset`` of the protocol seeded ``seed``."""
    word = np.random.SeedSequence([int(seed), int(subset), int(run)]).generate_state(1, np.uint64)[0]
    return int(word >> np.uint64(1))


def indices_to_counts(indices, n_train: int) -> np.ndarray:
    """Counts [m, n_train] of subset index lists [m, k] (dattri's form); repeats count twice."""
    idx = np.asarray(indices)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be an integer array [m, subset_size], got dtype {idx.dtype} "
                         f"shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n_train):
        raise ValueError(f"indices must lie in [0, n_train={n_train}), got range [{idx.min()}, {idx.max()}]")
    counts = np.zeros((idx.shape[0], n_train), dtype=np.int64)
    np.add.at(counts, (np.arange(idx.shape[0])[:, None], idx), 1)
    return counts
