"""nn.Linear (any leading dimensions): a [B, *, d_in], delta [B, *, d_out],
W_b = sum_t delta_bt a_bt^T, b_b = sum_t delta_bt (t over the leading dimensions after the batch).
The task's token mask [B, T] applies to the calls on [B, T, d_in] inputs."""
from __future__ import annotations

import torch

from .base import cat, positions
from .kron import KroneckerHandler


class LinearHandler(KroneckerHandler):
    def kron(self, examples: slice = slice(None)):
        A = cat([r.inputs[examples].reshape(-1, positions(r.inputs), r.inputs.shape[-1]) for r in self.records], 1)
        D = cat([r.grad_out[examples].reshape(-1, positions(r.grad_out), r.grad_out.shape[-1])
                 for r in self.records], 1)
        return A, D

    def token_weights(self, examples: slice = slice(None)):
        mask = self.mask
        if mask is None or not any(r.inputs.shape[:-1] == mask.shape for r in self.records):
            return None
        return cat([mask[examples].to(torch.float32) if r.inputs.shape[:-1] == mask.shape
                    else r.inputs.new_ones(r.inputs[examples].shape[0], positions(r.inputs), dtype=torch.float32)
                    for r in self.records], 1)
