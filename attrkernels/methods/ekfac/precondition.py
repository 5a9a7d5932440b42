"""Preconditioning and scores: (eigenvalues + damping)^{-1} per layer, preconditioned queries,
train x test tiles and self-influence, each layer's part computed by its handler."""
from __future__ import annotations

import torch

from ...capture.core import NonFiniteExamples, nonfinite_rows
from ...capture.handlers import Query
from ...capture.handlers.kron import stacked
from ...utils.errors import NotPositiveDefiniteError
from .factors import LayerFactors
from .replay import return_freed_memory
from .storage import dataset_len

HEURISTIC_DAMPING = 0.1
RANK_RTOL = 1e-6  # eigenvalues below this fraction of the largest count as zero (float32 sums)


def inverses(layers: list, factors: dict, damping: float | None, eigenvalues) -> dict:
    """{layer: 1 / (eigenvalues + damping)} as float32 [d_out, d_in]; ``eigenvalues(LayerFactors)``
    gives a layer's (float64) eigenvalues, ``damping=None`` 0.1 x their mean per layer."""
    out = {}
    for layer in layers:
        f = factors[layer.name]
        values = eigenvalues(f)
        d = damping if damping is not None else HEURISTIC_DAMPING * float(values.mean())
        if d == 0:
            check_invertible(layer, f, values)
        out[layer.name] = (1.0 / (values + d)).to(torch.float32)
    return out


def check_invertible(layer, f: LayerFactors, values: torch.Tensor) -> None:
    """NotPositiveDefiniteError (a ValueError) naming the layer when its undamped curvature has
    no inverse."""
    hint = ("pass damping=None (0.1 x the mean eigenvalue of each layer) or a positive damping")
    for label, e in (("activation factor A", f.eig_a), ("gradient factor S", f.eig_s)):
        top = float(e.max())
        if top <= 0 or float(e.min()) <= RANK_RTOL * top:
            raise NotPositiveDefiniteError(
                f"layer {layer.name!r}: the {label} is rank-deficient (smallest / largest eigenvalue "
                f"{float(e.min()) / top if top > 0 else 0:.1e}), so with damping=0 the curvature has no "
                f"inverse; {hint}", found=float(e.min()))
    if float(values.min()) <= 0:
        raise NotPositiveDefiniteError(f"layer {layer.name!r}: some corrected eigenvalues are zero, so with "
                                       f"damping=0 the curvature has no inverse; {hint}", found=float(values.min()))


def queries(passes, test, factors: dict, inverse: dict, n_train_hint: int | None, k: int,
            data, eigenbasis: bool = False) -> tuple[dict, int]:
    """Preconditioned test gradients per layer ({layer: handlers' Query}, n_test), in the
    eigenbasis or rotated back to parameter space, whichever makes scoring cheaper (decided on
    the first batch from the loaders' sizes when they are known, else as if both had the first
    batch's size; ``eigenbasis``: always in the eigenbasis, for training gradients kept rotated).
    ``data``: the test loader's ``passes.Recorded``, shared by the checkpoints (a test loader that
    yields other examples at another checkpoint is refused), or None."""
    layers, budget = passes.layers, passes.memory_budget
    parts = {layer.name: [] for layer in layers}
    back, n_test = {}, 0
    with passes.over(test, "test", "query gradients", f"checkpoint {k}", data) as batches:
        for _, batch, size in batches:
            handlers = passes.record(batch, size, passes.task.measure, "test")
            for layer in layers:
                handler, bases = handlers[layer.name], factors[layer.name].bases32()
                if layer.name not in back:
                    back[layer.name] = not eigenbasis and handler.precondition_back(
                        bases, layer.bias, dataset_len(test) or size, n_train_hint)
                parts[layer.name].extend(handler.preconditioned(bases, inverse[layer.name], back[layer.name],
                                                                layer.bias, budget))
            n_test += size
    return_freed_memory()  # the pass's transients, before the first layer's result is allocated
    out = {}
    for layer in layers:
        out[layer.name] = (Query(True, stacked(parts[layer.name], n_test, columns=True)) if eigenbasis
                           else layer.handler.query(parts[layer.name], n_test, back[layer.name]))
        # The parts just copied were freed into the process's heap, where the next layer's result
        # (a separate mapping) cannot use them: without this, GPT-2-small's 24 queries (8.2 GB)
        # took 12 GB.
        return_freed_memory()
    for name, q in out.items():
        bad = nonfinite_rows(q.W)
        if bad:
            raise NonFiniteExamples(f"non-finite preconditioned query gradients of layer {name!r}",
                                    bad).locate(0, "test", f"checkpoint {k}")
    return out, n_test


def tile(passes, handlers: dict, factors: dict, queries: dict, size: int, n_test: int) -> torch.Tensor:
    """sum over layers of <G_i, preconditioned G_j> for the batch: [size, n_test] (sign not applied)."""
    out = torch.zeros(size, n_test, dtype=torch.float32)
    for layer in passes.layers:
        out += handlers[layer.name].inner(queries[layer.name], factors[layer.name].bases32(), layer.bias,
                                          passes.memory_budget).cpu()
    passes.check_finite(handlers, {"the scores": out}, "train", rows=out)
    return out


def query_columns(queries: dict) -> dict:
    """{layer: [d_out d_in, n] contiguous} of queries in the eigenbasis, for ``rotated_tile``: its
    [B, d_out d_in] x [d_out d_in, n] GEMMs ran ~20% faster than with W [n, d_out, d_in] transposed.
    (``queries(..., eigenbasis=True)`` builds W as a view of these columns, ``stacked``.)"""
    return {name: q.W.reshape(q.W.shape[0], -1).T.contiguous() for name, q in queries.items()}


def _formed(passes, parts: dict, layer):
    """The layer's kept rotated gradients R_b [c, d_out, d_in] of the batch, chunk by chunk."""
    for chunk in parts[layer.name]:
        yield from chunk.formed(passes.memory_budget)


def rotated_tile(passes, parts: dict, columns: dict, size: int, n_test: int) -> torch.Tensor:
    """``tile`` from the batch's kept rotated gradients (``parts``: {layer: [``Rotated`` chunk]},
    ``replay.Rotations``) and the queries in the eigenbasis (``query_columns``): sum over layers
    of <R_b, W_j>."""
    out = torch.zeros(size, n_test, dtype=torch.float32)
    for layer in passes.layers:
        W = columns[layer.name]
        out += torch.cat([chunk.inner(W, passes.memory_budget) for chunk in parts[layer.name]]).cpu()
    passes.check_finite({}, {"the scores": out}, "train", rows=out)
    return out


def rotated_self_inner(passes, parts: dict, inverse: dict, size: int) -> torch.Tensor:
    """``self_inner`` from the batch's kept rotated gradients: sum over layers of sum R_b^2 inverse."""
    out = torch.zeros(size, dtype=torch.float32)
    for layer in passes.layers:
        M = inverse[layer.name]
        out += torch.cat([(R.square() * M).sum((1, 2)) for R in _formed(passes, parts, layer)]).cpu()
    passes.check_finite({}, {"the self-influence": out}, "train", rows=out)
    return out


def self_inner(passes, handlers: dict, factors: dict, inverse: dict, size: int) -> torch.Tensor:
    """[size] sum over layers of g_i^T (preconditioner) g_i for the batch."""
    out = torch.zeros(size, dtype=torch.float32)
    for layer in passes.layers:
        out += handlers[layer.name].self_inner(inverse[layer.name], factors[layer.name].bases32(), layer.bias,
                                               passes.memory_budget).cpu()
    passes.check_finite(handlers, {"the self-influence": out}, "train", rows=out)
    return out
