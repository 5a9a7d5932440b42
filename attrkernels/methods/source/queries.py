"""SOURCE's query side: gradients of the measurement at the final weights, carried backwards
through the segments.

Per layer, with R_L = Q_S,L^T G_j Q_A,L the query gradient of test example j rotated into the
last segment's eigenbasis and f(Lambda_l) applied elementwise in segment l's basis
(``KroneckerHandler.scaled``), for l = L, ..., 1:

    W_l     = F_seg,l(Lambda_l + wd) * R_l                    (scored against gradients at theta_c, c in segment l)
    R_{l-1} = rebase_{l -> l-1}(F_back,l(Lambda_l + wd) * R_l)  (rotated to parameter space and into basis l-1)

wd = weight decay. Each W_l is scored in its eigenbasis or rotated back to parameter space,
whichever is cheaper (``KroneckerHandler.precondition_back``, decided per segment on the first
query batch, as EK-FAC decides).
"""
from __future__ import annotations

import torch

from ...capture.core import NonFiniteExamples, nonfinite_rows
from ..checkpoints import model_device
from ..ekfac.storage import dataset_len
from .functions import backward_fn, segment_fn


def spectra(segments: list, weight_decay: float) -> list:
    """Per segment, {layer: (F_seg, F_back)} of its eigenvalues Lambda_l + weight_decay, float32
    [d_out, d_in] (evaluated in float64)."""
    out = []
    for seg in segments:
        values = {}
        for name, f in seg.factors.items():
            sigma = f.lam.to(torch.float64).clamp_min(0) + weight_decay
            values[name] = (segment_fn(sigma, seg.time).to(torch.float32),
                            backward_fn(sigma, seg.time).to(torch.float32))
        out.append(values)
    return out


def rotated_parts(passes, handlers: dict, bases: dict) -> dict:
    """{layer: parts of ``KroneckerHandler.query``}: the batch's gradients rotated into
    ``bases`` ({layer: float32 bases})."""
    device = model_device(passes.model)
    return {layer.name: list(handlers[layer.name].preconditioned(
        bases[layer.name], torch.ones(layer.d_out, layer.d_in, device=device), False, layer.bias,
        passes.memory_budget)) for layer in passes.layers}


def final_queries(passes, test, segments: list, n_train_hint: int | None, k: int) -> tuple[dict, int, list]:
    """(queries rotated into the last segment's basis, n_test, per segment {layer: whether its
    W_l is scored in parameter space}) from one pass over ``test`` at the current weights
    (checkpoint k)."""
    bases = {layer.name: segments[-1].factors[layer.name].bases32() for layer in passes.layers}
    parts = {layer.name: [] for layer in passes.layers}
    back, n_test = None, 0
    with passes.over(test, "test", "query gradients", f"checkpoint {k}", None) as batches:
        for _, batch, size in batches:
            handlers = passes.record(batch, size, passes.task.measure, "test")
            if back is None:
                n_queries = dataset_len(test) or size
                back = [{layer.name: handlers[layer.name].precondition_back(
                    seg.factors[layer.name].bases32(), layer.bias, n_queries, n_train_hint)
                    for layer in passes.layers} for seg in segments]
            for name, p in rotated_parts(passes, handlers, bases).items():
                parts[name].extend(p)
            n_test += size
    out = {layer.name: layer.handler.query(parts[layer.name], n_test, False) for layer in passes.layers}
    for name, q in out.items():
        bad = nonfinite_rows(q.W)
        if bad:
            raise NonFiniteExamples(f"non-finite query gradients of layer {name!r}", bad).locate(0, "test",
                                                                                                 f"checkpoint {k}")
    return out, n_test, back


def backwards(layers: list, segments: list, values: list, R: dict, back: list | None = None):
    """Yield (l, {layer: W_l}) for l = L-1, ..., 0 (see the module docstring); ``R``: the
    queries in the last segment's basis; ``back``: per segment, the layers whose W_l is rotated
    back to parameter space (None: every W_l stays in its eigenbasis)."""
    R = dict(R)
    for l in range(len(segments) - 1, -1, -1):
        seg = segments[l]
        W = {}
        for layer in layers:
            handler = layer.handler
            bases = seg.factors[layer.name].bases32()
            W[layer.name] = handler.scaled(R[layer.name], values[l][layer.name][0])
            if back is not None and back[l][layer.name]:
                W[layer.name] = handler.rebased(W[layer.name], bases, None)
            if l > 0:
                moved = handler.scaled(R[layer.name], values[l][layer.name][1])
                R[layer.name] = handler.rebased(moved, bases, segments[l - 1].factors[layer.name].bases32())
        yield l, W
