"""Elementwise affine of LayerNorm, GroupNorm, BatchNorm1d/2d/3d (eval, running statistics).

With the normalised input xh: gamma_b = sum over non-channel positions of delta * xh,
beta_b = sum of delta. Not Kronecker-factored (EK-FAC leaves these parameters out).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Block, Handler

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORMS = (nn.LayerNorm, nn.GroupNorm) + BATCH_NORMS


class NormHandler(Handler):
    @classmethod
    def check(cls, name, module):
        if isinstance(module, BATCH_NORMS) and module.running_mean is None:
            raise ValueError(
                f"{name}: BatchNorm without running statistics normalises with batch statistics, "
                "which mixes examples; use track_running_stats=True"
            )

    def _normalised(self, x):
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean = m.running_mean.reshape(shape)
        var = m.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + m.eps)

    def _reduce_dims(self, x):
        """Dimensions summed per example: positions, never the batch or the channels."""
        if isinstance(self.module, nn.LayerNorm):
            n = len(self.module.normalized_shape)
            return tuple(range(1, x.ndim - n))  # channels are the last n dimensions
        return tuple(range(2, x.ndim))  # channels are dimension 1

    def blocks(self, tracked, budget):
        m = self.module
        gamma = beta = None
        for r in self.records:
            x = r.inputs.to(torch.float32)
            g = r.grad_out.to(torch.float32)
            dims = self._reduce_dims(x)
            gw = (g * self._normalised(x)).sum(dim=dims) if dims else g * self._normalised(x)
            gb = g.sum(dim=dims) if dims else g
            gamma = gw if gamma is None else gamma + gw
            beta = gb if beta is None else beta + gb
        B = gamma.shape[0]
        if m.weight is not None and m.weight in tracked:
            yield Block(m.weight, 0, gamma.reshape(B, -1))
        if m.bias is not None and m.bias in tracked:
            yield Block(m.bias, 0, beta.reshape(B, -1))
