"""Per-example gradients without a sketch: g [B, p], the materialised reference and the input of
methods that need exact gradients of small models (influence functions, TracIn without k).

    grads = Gradients(model, task.loss, params=None)
    g = grads(batch)            # [B, p] float32, p = grads.num_params, named_parameters() order
"""
from __future__ import annotations

from .featurizer import DEFAULT_MEMORY_BUDGET, Featurizer


class Gradients:
    """g = Gradients(model, output_fn, params=None, fallback=(), memory_budget=32 MiB)(batch) -> [B, p]."""

    def __init__(self, model, output_fn, *, params=None, fallback=(), memory_budget=DEFAULT_MEMORY_BUDGET):
        self._featurizer = Featurizer(model, output_fn, 1, params=params, fallback=fallback,
                                      memory_budget=memory_budget)

    @property
    def plan(self):
        return self._featurizer.plan

    @property
    def num_params(self) -> int:
        return self._featurizer.num_params

    def __call__(self, batch):
        return self._featurizer.gradients(batch)
