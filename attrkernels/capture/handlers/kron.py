"""Handlers of layers whose per-example weight gradient is a sum of outer products.

Such a layer (weight W [d_out, d_in] after flattening, an optional bias folded in as the
homogeneous last input column) gives, per example b, inputs A_b [T, d_in] and output-gradients
D_b [T, d_out] with G_b = D_b^T A_b (``kron``). From those this class provides everything
EK-FAC / K-FAC (``attrkernels.methods.ekfac``) need of a layer, calling the kernels of
``kernels.kfac`` and ``kernels.kron_score`` (notation there):

* ``covariances``: the sums of a a^T over positions and of delta delta^T (the factors A and S);
* ``correction``: sum_b (Q_S^T G_b Q_A)^2, EK-FAC's eigenvalue correction;
* ``preconditioned`` / ``query``: preconditioned query gradients, either in the eigenbasis or
  rotated back to parameter space (``precondition_back`` decides which is cheaper);
* ``inner`` / ``self_inner``: inner products of the batch's gradients with the queries, and
  their weighted squared norms;
* ``scaled`` / ``rebased`` / ``paired_inner`` (SOURCE, ``methods.source``): a function of the
  eigenvalues applied to queries in an eigenbasis, queries moved from one basis to another,
  and each example's inner product with its own query.

Tied weights (one Parameter used by several modules, e.g. GPT-2's lm_head = wte): the layer is
the use whose handler forms dense factors (``tie_primary``), and every other use joins it as
more positions of the same weight (K-FAC-expand over uses, Eschenhagen et al., 2023): a use with
grad W_b = sum_t U_bt V_bt^T in the weight's storage order (``storage_pairs``; an Embedding's U
is the one-hot index, V its output-gradient) adds positions (a, d) = ``from_storage(U, V)``. So
G_b = D_b^T A_b is the whole per-example gradient of the parameter, counted once, and A, S sum
the positions of every use.

Padding: the task's token mask (``Handler.mask``) leaves the positions it marks 0 out of both
factors and out of A's count of positions; the gradients (and so Lambda and the scores) need no
mask, as a padded position receives no output-gradient.

Per-example tensors exist only in chunks of examples under ``budget`` bytes. A subclass
implements ``kron`` (and ``dims`` when its weight is not [d_out, d_in, ...]); it may override
``formed_chunks`` to form the (rotated) per-example gradients itself when that is cheaper than
the product of the factors (the convolution does), and any operation with a faster path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...kernels.columns import gather_columns
from ...kernels.kfac import (add_squares, covariance, ekfac_correction, example_chunk, homogeneous,
                             rotated_gradients, rotation_cost)
from ...kernels.kron_score import gradient_inner, gradient_self_inner, kron_inner, kron_self_inner
from .base import Block, Handler, cat, outer_blocks


@dataclass
class CovarianceSums:
    """Running sums of one layer's factors: A (sum of a a^T, or token counts), S (sum of
    delta delta^T), and the number of positions A summed over."""

    A: torch.Tensor | None = None
    S: torch.Tensor | None = None
    positions: int = 0


@dataclass
class Query:
    """Preconditioned query gradients of one layer: W [n, d_out, d_in] in the eigenbasis
    (``rotated``) or in parameter space; for sparse rows (Embedding) W [n, U, d] on ``rows``."""

    rotated: bool
    W: torch.Tensor
    rows: torch.Tensor | None = None


@dataclass
class Rotated:
    """A chunk of a batch's rotated per-example gradients R_b = Q_S^T D_b^T A_b Q_A, as the
    correction keeps them for the scores (``KroneckerHandler.correction(keep=...)``): formed, R
    [c, d_out, d_in], or as the rotated positions that form them, a = A Q_A [c, T, d_in] and
    d = D Q_S [c, T, d_out], R_b = d_b^T a_b (T (d_in + d_out) floats per example instead of
    d_out d_in: the smaller for few positions, e.g. GPT-2-small's T = 128 against widths
    768-3072, or a Linear on [B, d] inputs)."""

    R: torch.Tensor | None = None
    a: torch.Tensor | None = None
    d: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.R, self.a, self.d) if t is not None)

    def inner(self, columns: torch.Tensor, budget: int) -> torch.Tensor:
        """[c, n] inner products <R_b, W_j> with queries in the eigenbasis as contiguous columns
        ``columns`` [d_out d_in, n]. From positions, R is formed for all c examples a block of
        output rows at a time ([c, rows, d_in] within ``budget`` bytes), each block multiplied
        with its contiguous rows of ``columns``: each query entry is read once per chunk, not once
        per few examples (GPT-2-small's c_fc: 0.17 -> 0.09 s a batch of 8 against 24 queries)."""
        if self.R is not None:
            return self.R.reshape(self.R.shape[0], -1) @ columns
        c, d_in, d_out = self.a.shape[0], self.a.shape[2], self.d.shape[2]
        out = torch.zeros(c, columns.shape[1], dtype=columns.dtype, device=columns.device)
        rows = max(1, budget // (4 * c * d_in))
        for o0 in range(0, d_out, rows):
            o1 = min(o0 + rows, d_out)
            block = torch.bmm(self.d[:, :, o0:o1].transpose(1, 2), self.a)
            out.addmm_(block.reshape(c, -1), columns[o0 * d_in:o1 * d_in])
        return out

    def formed(self, budget: int):
        """R in chunks of examples whose [chunk, d_out, d_in] fit in ``budget`` bytes."""
        if self.R is not None:
            yield self.R
            return
        step = example_chunk(self.a.shape[0], 4 * self.a.shape[2] * self.d.shape[2], budget)
        for b0 in range(0, self.a.shape[0], step):
            yield torch.bmm(self.d[b0:b0 + step].transpose(1, 2), self.a[b0:b0 + step])


def stacked(parts: list, n: int, columns: bool = False) -> torch.Tensor:
    """The chunks ``parts`` ([c, ...] each, n rows in all) as one [n, ...] tensor; the list is
    emptied. Each chunk is copied in and released in turn: at most one chunk more than the result
    in memory, where ``torch.cat`` holds every chunk beside it (GPT-2-small's 24 queries: 8.2 GB
    twice). With ``columns``, [n, ...] is a view of contiguous [prod(...), n] columns
    (``kernels.columns.gather_columns``; the chunks are released after it: one layer's result
    more than the chunks in memory)."""
    if columns:
        out = gather_columns(parts, n)
        shape = parts[0].shape[1:]
        parts.clear()
        return out.T.reshape(n, *shape)
    if len(parts) == 1 and parts[0].shape[0] == n:
        return parts.pop()
    out = torch.empty(n, *parts[0].shape[1:], dtype=parts[0].dtype, device=parts[0].device)
    j = 0
    while parts:
        chunk = parts.pop(0)
        out[j:j + chunk.shape[0]] = chunk
        j += chunk.shape[0]
        del chunk
    return out


class KroneckerHandler(Handler):
    """Base of the handlers whose weight EK-FAC / K-FAC factor; see the module docstring."""

    kronecker = True
    # Whether the layer of a tied weight may be this use (its factors dense; see the docstring).
    tie_primary = True
    diagonal_activation = False  # the activation factor A is a [d_in] diagonal (Embedding), not [d_in, d_in]
    # Whether ``correction`` can keep the dense rotated gradients [B, d_out, d_in] it forms
    # (a subclass whose ``correction`` takes no ``keep`` sets it False).
    keeps_rotated = True

    @classmethod
    def why_not_kronecker(cls, module: nn.Module) -> str | None:
        return None

    @classmethod
    def projectable(cls, module: nn.Module) -> bool:
        return cls.why_not_kronecker(module) is None

    @classmethod
    def dims(cls, module: nn.Module, bias: bool) -> tuple[int, int]:
        """(d_in, d_out) of the factored weight, d_in including the bias column when ``bias``."""
        weight = cls.weight_of(module)
        return weight[0].numel() + bias, weight.shape[0]

    def kron(self, examples: slice = slice(None)):
        raise NotImplementedError

    @classmethod
    def from_storage(cls, U: torch.Tensor, V: torch.Tensor) -> tuple:
        """(A, D) positions of this layer's factors from a use's ``storage_pairs`` (U on the
        weight's first dimension): the weight is stored [d_out, d_in], so A = V, D = U."""
        return V, U

    @classmethod
    def to_storage(cls, G: torch.Tensor) -> torch.Tensor:
        """G [..., d_out, d_in] (factor layout, no bias column) in the weight's storage order."""
        return G

    def storage_pairs(self, examples: slice = slice(None)):
        pairs = self.kron(examples)
        return None if pairs is None else (pairs[1], pairs[0])

    # ----------------------------------------------------------------------------- featurizer
    def blocks(self, tracked, budget):
        A, D = self.kron()
        weight, bias = self.weight_of(self.module), self.bias_of(self.module)
        if weight in tracked:
            yield from outer_blocks(weight, A, D, budget, self.workspace)
        if bias is not None and bias in tracked:
            yield Block(bias, 0, D.to(torch.float32).sum(1))

    # ----------------------------------------------------------------------------- chunks
    def batch(self) -> int:
        return self.records[0].grad_out.shape[0]

    def positions(self) -> int:
        """T: output positions per example, over all calls of the layer and the other uses of a
        tied weight."""
        return self.own_positions() + sum(h.own_positions() for h in self.tied)

    def own_positions(self) -> int:
        return sum(r.grad_out[0].numel() for r in self.records) // self.dims(self.module, False)[1]

    def kron_chunks(self, bias: bool, budget: int, weights: bool = False):
        """(first example, A, D) for chunks of the batch whose factors fit in ``budget`` bytes
        (A homogeneous when ``bias``; the positions of a tied weight's other uses follow this
        module's, with bias input 0); with ``weights``, (first example, A, D, w) with the token
        weights w [chunk, T] or None. The kernels bound the per-example gradients they form."""
        size = self.batch()
        d_in, d_out = self.dims(self.module, bias)
        step = example_chunk(size, 4 * self.positions() * (d_in + d_out), budget)
        for b0 in range(0, size, step):
            rows = slice(b0, b0 + step)
            A, D = self.kron(rows)
            parts = [((homogeneous(A) if bias else A.to(torch.float32)), D.to(torch.float32),
                      self.token_weights(rows) if weights else None)]
            for use in self.tied:
                a, d = self.from_storage(*use.storage_pairs(rows))
                a = a.to(torch.float32)
                parts.append((torch.nn.functional.pad(a, (0, 1)) if bias else a, d.to(torch.float32),
                              use.token_weights(rows) if weights else None))
            A, D = cat([p[0] for p in parts], 1), cat([p[1] for p in parts], 1)
            if not weights:
                yield b0, A, D
                continue
            w = None
            if any(p[2] is not None for p in parts):
                w = cat([p[2] if p[2] is not None else p[0].new_ones(p[0].shape[:2]) for p in parts], 1)
            yield b0, A, D, w

    def formed_chunks(self, bases, bias: bool, budget: int):
        """None, or (first example, Q_S^T G_b Q_A [chunk, d_out, d_in]) chunks (G_b without
        ``bases``) when this handler forms them more cheaply than from ``kron_chunks``."""
        return None

    def rotated_chunks(self, bases, bias: bool, budget: int):
        """Formed (rotated) per-example gradients [chunk, d_out, d_in], chunk by chunk."""
        formed = self.formed_chunks(bases, bias, budget)
        if formed is not None:
            for _, R in formed:
                yield R
            return
        d_in, d_out = self.dims(self.module, bias)
        for _, A, D in self.kron_chunks(bias, budget):
            step = example_chunk(A.shape[0], 4 * d_in * d_out, budget)
            for b0 in range(0, A.shape[0], step):
                yield rotated_gradients(A[b0:b0 + step], D[b0:b0 + step], *bases)

    # ----------------------------------------------------------------------------- factors
    def covariances(self, sums: CovarianceSums, bias: bool, budget: int) -> CovarianceSums:
        """Add the batch's sum_{b,t} w_bt a a^T to ``sums.A`` (w: the token weights, 1 without a
        mask), its sum of w_bt delta delta^T to ``sums.S`` (float32 [d, d]; their block upper
        triangles, ``kernels.kfac.mirror_upper`` completes them after the pass) and its number of
        counted positions to ``sums.positions``. (A padded position has delta = 0 at a layer's
        own positions; at a tied Embedding's, d is the one-hot token, which the mask removes.)"""
        for _, A, D, w in self.kron_chunks(bias, budget, weights=True):
            sums.A = covariance(A if w is None else A * w.unsqueeze(-1), out=sums.A, mirror=False)
            sums.S = covariance(D if w is None else D * w.unsqueeze(-1), out=sums.S, mirror=False)
            sums.positions += A.shape[0] * A.shape[1] if w is None else int(w.sum())
        return sums

    def keeps_positions(self, bases, bias: bool) -> bool:
        """Whether ``correction(keep=...)`` keeps the rotated positions (a = A Q_A, d = D Q_S;
        ``Rotated``) rather than the gradients they form: when they hold fewer floats,
        T (d_in + d_out) < d_in d_out, and this handler forms no gradients itself. (Then T is
        below both widths, so ``rotated_gradients`` rotates both sides as positions too.)"""
        d_in, d_out = self.dims(self.module, bias)
        return (self.positions() * (d_in + d_out) < d_in * d_out
                and self.formed_chunks(bases, bias, 0) is None)

    def correction(self, out: torch.Tensor, bases, bias: bool, budget: int,
                   keep: list | None = None) -> torch.Tensor:
        """out += sum_b (Q_S^T G_b Q_A)^2 over the batch ([d_out, d_in] float32). ``keep`` (a list,
        only where ``keeps_rotated``): append the batch's rotated gradients to it too, as
        ``Rotated`` chunks (``keeps_positions`` says in which form)."""
        if keep is not None and self.keeps_positions(bases, bias):
            basis_a, basis_s = bases
            for _, A, D in self.kron_chunks(bias, budget):
                kept = Rotated(a=basis_a.rotate(A), d=basis_s.rotate(D))
                for R in kept.formed(budget):
                    add_squares(R, out)
                keep.append(kept)
            return out
        if keep is not None:
            for R in self.rotated_chunks(bases, bias, budget):
                add_squares(R, out)
                keep.append(Rotated(R=R.contiguous()))  # read as [chunk, d_out d_in] rows by every score tile
            return out
        formed = self.formed_chunks(bases, bias, budget)
        if formed is not None:
            for _, R in formed:
                add_squares(R, out)
            return out
        for _, A, D in self.kron_chunks(bias, budget):
            ekfac_correction(A, D, *bases, out=out, memory_budget=budget)
        return out

    # ----------------------------------------------------------------------------- queries
    def precondition_back(self, bases, bias: bool, n_queries: int, n_train: int | None) -> bool:
        """Whether scoring is cheaper with the queries rotated back to parameter space (each
        training gradient then multiplies them unrotated) than in the eigenbasis (each training
        gradient rotated), for n_queries queries against n_train training examples."""
        basis_a, basis_s = bases
        d_in, d_out = self.dims(self.module, bias)
        cost = d_out * basis_a.cost() + d_in * basis_s.cost()
        rotation = rotation_cost(self.positions(), basis_a, basis_s)
        return n_queries * cost <= (n_train or n_queries) * rotation

    def preconditioned(self, bases, inverse: torch.Tensor, back: bool, bias: bool, budget: int):
        """Chunks of the batch's gradients rotated, multiplied by ``inverse`` [d_out, d_in] and
        (``back``) rotated back: parts of ``query``."""
        basis_a, basis_s = bases
        for R in self.rotated_chunks(bases, bias, budget):
            W = R.mul_(inverse)
            if back:
                W = basis_s.rotate(basis_a.rotate(W, dim=2, transpose=True), dim=1, transpose=True)
            yield W

    @classmethod
    def query(cls, parts: list, n: int, back: bool) -> Query:
        """The ``Query`` of all ``preconditioned`` parts of the query set (n examples; the list
        is emptied, ``stacked``)."""
        return Query(not back, stacked(parts, n))

    def inner(self, query: Query, bases, bias: bool, budget: int) -> torch.Tensor:
        """[B, n] inner products of the batch's gradients with the query."""
        bases = bases if query.rotated else None
        out = torch.zeros(self.batch(), query.W.shape[0], dtype=torch.float32, device=query.W.device)
        formed = self.formed_chunks(bases, bias, budget)
        if formed is not None:
            for b0, R in formed:
                out[b0:b0 + R.shape[0]] = gradient_inner(R, query.W)
            return out
        for b0, A, D in self.kron_chunks(bias, budget):
            out[b0:b0 + A.shape[0]] = kron_inner(A, D, query.W, *(bases or (None, None)), budget)
        return out

    def self_inner(self, inverse: torch.Tensor, bases, bias: bool, budget: int) -> torch.Tensor:
        """[B] sum_{o,i} (Q_S^T G_b Q_A)[o, i]^2 inverse[o, i]."""
        formed = self.formed_chunks(bases, bias, budget)
        if formed is not None:
            return torch.cat([gradient_self_inner(R, inverse) for _, R in formed])
        return torch.cat([kron_self_inner(A, D, inverse, *bases, budget)
                          for _, A, D in self.kron_chunks(bias, budget)])

    # ----------------------------------------------------------------------------- SOURCE
    @classmethod
    def scaled(cls, query: Query, values: torch.Tensor) -> Query:
        """The query (in an eigenbasis) times ``values`` [d_out, d_in] elementwise: f(curvature)
        applied to it when ``values`` = f(eigenvalues)."""
        return Query(query.rotated, query.W * values, query.rows)

    @classmethod
    def rebased(cls, query: Query, old, new) -> Query:
        """The query moved from the bases ``old`` to ``new`` ((basis_a, basis_s) pairs; None:
        parameter space): W -> Q_S' Q_S W Q_A^T Q_A' with Q' of ``new``."""
        W = query.W
        if old is not None:
            W = old[1].rotate(old[0].rotate(W, dim=2, transpose=True), dim=1, transpose=True)
        if new is not None:
            W = new[1].rotate(new[0].rotate(W, dim=2), dim=1)
        return Query(new is not None, W, query.rows)

    def paired_inner(self, query: Query, bases, bias: bool, budget: int) -> torch.Tensor:
        """[B] <R_b, W_b>: each example's rotated gradient with its own query (``query`` holds
        one matrix per example of the batch, in the eigenbasis ``bases``)."""
        out, b0 = [], 0
        for R in self.rotated_chunks(bases, bias, budget):
            out.append((R * query.W[b0:b0 + R.shape[0]]).sum((1, 2)))
            b0 += R.shape[0]
        return torch.cat(out)
