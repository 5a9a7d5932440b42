"""nn.Linear (any leading dimensions): a [B, *, d_in], delta [B, *, d_out],
W_b = sum_t delta_bt a_bt^T, b_b = sum_t delta_bt (t over the leading dimensions after the batch)."""
from __future__ import annotations

from .base import cat, positions
from .kron import KroneckerHandler


class LinearHandler(KroneckerHandler):
    def kron(self, examples: slice = slice(None)):
        A = cat([r.inputs[examples].reshape(-1, positions(r.inputs), r.inputs.shape[-1]) for r in self.records], 1)
        D = cat([r.grad_out[examples].reshape(-1, positions(r.grad_out), r.grad_out.shape[-1])
                 for r in self.records], 1)
        return A, D
