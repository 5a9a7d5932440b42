"""transformers' ``Conv1D`` (GPT-2's attention and MLP projections): a linear layer whose weight
is stored transposed, W [d_in, d_out], y = x W + b.

Per example b with inputs A_b [T, d_in] and output-gradients D_b [T, d_out] (T positions):
grad W_b = A_b^T D_b, stored [d_in, d_out] like the weight (the featurizer's blocks follow that
layout, so the flattened gradient matches ``named_parameters()`` without a transposed copy);
EK-FAC / K-FAC factor it as Linear does, G_b = D_b^T A_b [d_out, d_in] (scores are inner
products, so the factor space need not match the storage layout).

Registered by class name (``transformers.pytorch_utils.Conv1D``): attrkernels does not import
transformers.
"""
from __future__ import annotations

import torch

from .base import Block, outer_blocks
from .linear import LinearHandler

CLASS_NAME = "transformers.pytorch_utils.Conv1D"


class Conv1DHandler(LinearHandler):
    @classmethod
    def dims(cls, module, bias: bool) -> tuple[int, int]:
        d_in, d_out = module.weight.shape
        return d_in + bias, d_out

    @classmethod
    def from_storage(cls, U, V):
        return U, V  # stored [d_in, d_out]: U on d_in

    @classmethod
    def to_storage(cls, G):
        return G.transpose(-1, -2)

    def storage_pairs(self, examples=slice(None)):
        return self.kron(examples)

    def blocks(self, tracked, budget):
        A, D = self.kron()
        m = self.module
        if m.weight in tracked:
            # outer_blocks(param, X, Y) yields rows of Y_b^T X_b: with X = D, Y = A these are
            # rows of A_b^T D_b, i.e. of grad W_b in its [d_in, d_out] storage order.
            yield from outer_blocks(m.weight, D, A, budget, self.workspace)
        if m.bias is not None and m.bias in tracked:
            yield Block(m.bias, 0, D.to(torch.float32).sum(1))
