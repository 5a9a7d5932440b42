"""Per-example gradients of parameters no hook captures, with torch.func.

For the fallback parameters theta_F only (all others held fixed), returns
g_b = d f_b / d theta_F for every example b, through ``vmap(grad(...))`` over examples; if the
model cannot be vmapped (some attention kernels, data-dependent control flow) it falls back to
one backward pass per example.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..utils.batches import in_dims, one_example, unsqueeze


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
                                         (unsqueeze(example),), strict=False)
        return out.sum()

    try:
        grads = torch.func.vmap(torch.func.grad(f), in_dims=(None, in_dims(batch)))(values, batch)
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
