"""Walking nested batches: tensors inside tuples, lists and dicts (any depth), other leaves kept.

A batch is whatever a loader yields; examples are along dimension 0 of every tensor in it that
has one. These helpers are the only code that walks that structure (``torch.utils._pytree``).
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree


def tensors(batch) -> list:
    """The tensors of a batch in a fixed order (dict entries in key order as stored)."""
    return [v for v in pytree.tree_leaves(batch) if torch.is_tensor(v)]


def _map(fn, batch):
    return pytree.tree_map(lambda v: fn(v) if torch.is_tensor(v) else v, batch)


def to_device(batch, device):
    """The batch with every tensor moved to ``device`` (no copy when already there)."""
    return _map(lambda t: t.to(device), batch)


def one_example(batch, b: int):
    """Example ``b`` of the batch, keeping a batch dimension of 1 on every tensor."""
    return _map(lambda t: t[b:b + 1], batch)


def unsqueeze(batch):
    """Add a leading batch dimension of 1 to every tensor (one example -> a batch of one)."""
    return _map(lambda t: t.unsqueeze(0), batch)


def in_dims(batch):
    """``torch.func.vmap`` in_dims for a batch: 0 for tensors, None for other leaves."""
    return pytree.tree_map(lambda v: 0 if torch.is_tensor(v) else None, batch)


def batch_size(batch) -> int | None:
    """The leading dimension of the first tensor with one, or None."""
    for t in tensors(batch):
        if t.ndim:
            return int(t.shape[0])
    return None
