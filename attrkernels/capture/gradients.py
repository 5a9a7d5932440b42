"""Per-example gradients without a sketch: g [B, p], the materialised reference and the input of
methods that need exact gradients of small models (influence functions, TracIn without k).

    grads = Gradients(model, task.loss, params=None)
    g = grads(batch)            # [B, p] float32, p = grads.num_params, named_parameters() order

The same capture core as the Featurizer (``core.PerExample``): hooks and handlers for the layers
they capture, torch.func for other parameters, the batch-gradient consistency check.
"""
from __future__ import annotations

import torch

from .core import DEFAULT_MEMORY_BUDGET, PerExample


class Gradients(PerExample):
    """g = Gradients(model, output_fn, params=None, fallback=(), memory_budget=32 MiB)(batch) -> [B, p]."""

    def __init__(self, model, output_fn, *, params=None, fallback=(), memory_budget=DEFAULT_MEMORY_BUDGET):
        super().__init__(model, output_fn, params=params, fallback=fallback, memory_budget=memory_budget)

    def __call__(self, batch) -> torch.Tensor:
        return self.gradients(batch)
