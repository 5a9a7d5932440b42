"""nn.Embedding: idx [B, *], delta [B, *, d]; row v of W_b = sum_{t: idx_bt = v} delta_bt.

Per-example gradients live on the rows of the looked-up indices (``sparse_rows``); the padding
row receives none. For EK-FAC / K-FAC the input is the one-hot vector of the index, so the
activation factor is diagonal (the token counts) with the identity basis: only the d side is
rotated, and every operation works on the looked-up rows. The task's token mask leaves padded
positions out of the counts. As one use of a tied weight (``kron``'s docstring) the positions
are (a, d) = (delta_t, one-hot(idx_t)) in the other use's [V, d] layout; the layer is then the
other use (an Embedding is never ``tie_primary``).
"""
from __future__ import annotations

import torch

from ...kernels.kfac import covariance, token_counts
from ...kernels.kron_score import sparse_rows_inner, sparse_rows_self_inner
from .base import Block, rows_per_block
from .kron import KroneckerHandler, Query


class EmbeddingHandler(KroneckerHandler):
    tie_primary = False
    diagonal_activation = True
    keeps_rotated = False  # its rotated gradient [B, d, vocabulary] would be mostly zeros

    @classmethod
    def check(cls, name, module):
        if module.scale_grad_by_freq:
            raise ValueError(f"{name}: Embedding(scale_grad_by_freq=True) mixes examples in its gradient")

    @classmethod
    def projectable(cls, module):
        return False  # the input factor is one-hot (V wide): sketched with the other parameters

    @classmethod
    def dims(cls, module, bias):
        return module.num_embeddings, module.embedding_dim

    def kron(self, examples: slice = slice(None)):
        return None

    def tokens(self, examples: slice = slice(None)):
        """(indices [B, T], D [B, T, d] float32, zero at padding positions)."""
        m = self.module
        idx = torch.cat([r.inputs[examples].reshape(r.inputs[examples].shape[0], -1) for r in self.records], 1)
        D = torch.cat([r.grad_out[examples].reshape(idx.shape[0], -1, r.grad_out.shape[-1]) for r in self.records],
                      1).to(torch.float32)
        if m.padding_idx is not None:
            D = D * (idx != m.padding_idx).unsqueeze(-1)
        return idx, D

    def storage_pairs(self, examples: slice = slice(None)):
        idx, D = self.tokens(examples)
        return torch.nn.functional.one_hot(idx, self.module.num_embeddings).to(torch.float32), D

    def token_weights(self, examples: slice = slice(None)):
        mask = self.mask
        if mask is None or not any(r.inputs.shape == mask.shape for r in self.records):
            return None
        return torch.cat([(mask[examples] if r.inputs.shape == mask.shape else torch.ones_like(r.inputs[examples]))
                          .reshape(mask[examples].shape[0], -1).to(torch.float32) for r in self.records], 1)

    def sparse_rows(self):
        """(rows [U] sorted unique indices, R [B, U, d]): row rows[u] of W_b is R[b, u]."""
        idx, D = self.tokens()
        rows, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        B, T, d = D.shape
        R = torch.zeros(B, rows.numel(), d, dtype=D.dtype, device=D.device)
        R.scatter_add_(1, inverse.reshape(B, T, 1).expand(B, T, d), D)
        return rows, R

    def blocks(self, tracked, budget):
        m = self.module
        if m.weight not in tracked:
            return
        rows, R = self.sparse_rows()
        d = R.shape[2]
        step = rows_per_block(R.shape[0], d, budget)
        for start_u, v0, n in _runs(rows.tolist()):
            for j in range(0, n, step):
                m_ = min(step, n - j)
                yield Block(m.weight, (v0 + j) * d, R[:, start_u + j:start_u + j + m_].reshape(R.shape[0], -1))

    # ----------------------------------------------------------------------------- EK-FAC
    def covariances(self, sums, bias, budget):
        idx, D = self.tokens()
        w = self.token_weights()
        if w is not None:
            idx = idx[w.bool()]
        pad = self.module.padding_idx
        sums.A = token_counts(idx, self.module.num_embeddings, pad, out=sums.A)
        sums.positions += int(idx.numel() if pad is None else (idx != pad).sum())
        sums.S = covariance(D, out=sums.S)
        return sums

    def correction(self, out, bases, bias, budget, keep=None):  # keep: never asked (keeps_rotated)
        rows, R = self.sparse_rows()
        out[:, rows] += bases[1].rotate(R).square().sum(0).T
        return out

    def precondition_back(self, bases, bias, n_queries, n_train):
        return False

    def preconditioned(self, bases, inverse, back, bias, budget):
        rows, R = self.sparse_rows()
        yield rows, bases[1].rotate(R) * inverse[:, rows].T

    @classmethod
    def query(cls, parts, n, back):
        """Dense [n, U, d] preconditioned rows over the union U of the query batches' rows."""
        rows = torch.unique(torch.cat([r for r, _ in parts]))
        W = torch.zeros(n, rows.numel(), parts[0][1].shape[2], dtype=torch.float32, device=rows.device)
        start = 0
        for r, w in parts:
            W[start:start + w.shape[0], torch.searchsorted(rows, r)] = w
            start += w.shape[0]
        return Query(True, W, rows)

    def inner(self, query, bases, bias, budget):
        rows, R = self.sparse_rows()
        return sparse_rows_inner(rows, R, query.rows, query.W, bases[1])

    def self_inner(self, inverse, bases, bias, budget):
        rows, R = self.sparse_rows()
        return sparse_rows_self_inner(rows, R, inverse, bases[1])

    # ----------------------------------------------------------------------------- SOURCE
    # Queries hold the looked-up rows only, W [n, U, d] on ``query.rows``; the input basis is the identity.
    @classmethod
    def scaled(cls, query, values):
        return Query(query.rotated, query.W * values[:, query.rows].T, query.rows)

    @classmethod
    def rebased(cls, query, old, new):
        W = query.W if old is None else old[1].rotate(query.W, transpose=True)
        return Query(new is not None, W if new is None else new[1].rotate(W), query.rows)

    def paired_inner(self, query, bases, bias, budget):
        rows, R = self.sparse_rows()
        at = torch.searchsorted(query.rows, rows)
        if not torch.equal(query.rows[at.clamp_max(query.rows.numel() - 1)], rows):
            raise ValueError("the query holds other embedding rows than the batch looks up")
        return (bases[1].rotate(R) * query.W[:, at]).sum((1, 2))


def _runs(sorted_rows):
    """Maximal runs of consecutive integers: (position in the list, first value, length)."""
    runs = []
    for pos, v in enumerate(sorted_rows):
        if runs and runs[-1][1] + runs[-1][2] == v:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, v, 1))
    return runs

