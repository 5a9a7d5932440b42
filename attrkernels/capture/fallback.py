"""Per-example gradients of parameters no hook captures, with torch.func.

For the fallback parameters theta_F only (all others held fixed), returns
g_b = d f_b / d theta_F for every example b, through ``vmap(grad(...))`` over examples; if the
model cannot be vmapped (some attention kernels, data-dependent control flow) it falls back to
one backward pass per example.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def one_example(batch, b):
    """Example b of a batch (tuple/list/dict of tensors, leading dim B) keeping a batch dim of 1."""
    if torch.is_tensor(batch):
        return batch[b:b + 1]
    if isinstance(batch, (tuple, list)):
        return type(batch)(one_example(v, b) for v in batch)
    if isinstance(batch, dict):
        return {k: one_example(v, b) for k, v in batch.items()}
    return batch


def _unsqueeze(batch):
    if torch.is_tensor(batch):
        return batch.unsqueeze(0)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_unsqueeze(v) for v in batch)
    if isinstance(batch, dict):
        return {k: _unsqueeze(v) for k, v in batch.items()}
    return batch


def _in_dims(batch):
    if torch.is_tensor(batch):
        return 0
    if isinstance(batch, (tuple, list)):
        return type(batch)(_in_dims(v) for v in batch)
    if isinstance(batch, dict):
        return {k: _in_dims(v) for k, v in batch.items()}
    return None


class ModelCall(nn.Module):
    """``forward(batch) = fn(model, batch)`` as a module, so torch.func.functional_call can swap
    the model's parameters (named ``model.<name>``) in any task function."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


def fallback_gradients(model, output_fn, batch, named_params, batch_size):
    """{name: [B, numel]} per-example gradients of ``named_params`` (float32)."""
    if not named_params:
        return {}
    wrapper = ModelCall(model, output_fn)
    values = {n: p.detach() for n, p in named_params}

    def f(vals, example):
        out = torch.func.functional_call(wrapper, {f"model.{n}": v for n, v in vals.items()},
                                         (_unsqueeze(example),), strict=False)
        return out.sum()

    try:
        grads = torch.func.vmap(torch.func.grad(f), in_dims=(None, _in_dims(batch)))(values, batch)
    except Exception:  # noqa: BLE001  (anything vmap cannot trace: use one backward per example)
        grads = {n: [] for n in values}
        params = [p for _, p in named_params]
        for b in range(batch_size):
            out = output_fn(model, one_example(batch, b)).sum()
            gs = torch.autograd.grad(out, params, allow_unused=True)
            for (n, p), g in zip(named_params, gs):
                grads[n].append(torch.zeros_like(p) if g is None else g)
        grads = {n: torch.stack(v) for n, v in grads.items()}
    return {n: g.reshape(batch_size, -1).to(torch.float32) for n, g in grads.items()}
