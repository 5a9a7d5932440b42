"""Sketched per-example gradients, phi_b = P^T g_b, without materialising g_b for the whole model.

g_b = d f_b / d theta for one scalar output f_b per example (``output_fn(model, batch)`` -> [B]),
over the tracked parameters theta in ``model.named_parameters()`` order, flattened row-major
(p entries). Modes:

* ``dense`` (exact): phi_b = sketch(g_b) with the projection P (p x k) of
  ``attrkernels.sketch`` and the same seed, so phi equals projecting the materialised gradient.
  Each layer's gradient is formed from its inputs and output-gradients in blocks of weight rows
  (all examples of the batch at once, at most ``memory_budget`` bytes each) and each block is
  sketched at its row offset in g and accumulated. Peak extra memory: one block.
* ``factored`` (LoGra-style): every Linear / Conv / Conv1D weight (groups = 1) gets its own Kronecker
  projection, phi_l = vec((D P_out)^T (A P_in)) = vec(P_out^T G_l P_in) with P_in [d_in, k_in],
  P_out [d_out, k_out] independent projections (G_l [d_out, d_in] in the layer's factor layout:
  a Conv1D's transposed storage); all other tracked parameters (biases, norms, embeddings,
  grouped convolutions, torch.func parameters, and tied weights, used by several modules: their
  uses are summed in the dense sketch, so counted once) are sketched densely together.
  k is split evenly over the Kronecker layers and that rest group (earlier ones get the
  remainder); a layer with share k_l uses k_in ~ k_out ~ sqrt(k_l) (capped by its widths), keeps
  the first k_l entries of the k_out x k_in product (row-major) and scales them by
  sqrt(k_in k_out / k_l), so E||phi_l||^2 = ||G_l||^2. Seeds: layer l uses
  derive_seed(seed, 2l) for P_in and derive_seed(seed, 2l + 1) for P_out; the rest group
  derive_seed(seed, 2L).

The model runs in eval mode (BatchNorm with running statistics, no dropout); examples must not
interact. Every call checks that the per-example gradients of hooked parameters add up to the
batch gradient autograd computes, so a parameter used outside its module (weight tying,
functional use) raises instead of giving wrong features. Non-finite values raise
``capture.core.NonFiniteExamples`` (an ``ExampleError``) naming the examples of the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.philox import derive_seed, split_seed
from ..kernels.projection import check_k, check_kind
from ..kernels.sketch import sketch
from .core import DEFAULT_MEMORY_BUDGET, NonFiniteExamples, PerExample, nonfinite_rows

MODES = ("dense", "factored")


@dataclass
class _KronLayer:
    module_name: str
    param: torch.nn.Parameter
    handler: type
    k_in: int
    k_out: int
    share: int
    col0: int
    seed_in: int
    seed_out: int


def _factor_dims(share: int, d_in: int, d_out: int) -> tuple[int, int]:
    k_in = max(1, min(d_in, math.ceil(math.sqrt(share))))
    k_out = math.ceil(share / k_in)
    if k_out > d_out:
        k_out = d_out
        k_in = math.ceil(share / k_out)
    return k_in, k_out


class Featurizer(PerExample):
    """phi = featurizer(batch) -> Tensor [B, k] of sketched per-example gradients.

    Args:
        model: any nn.Module.
        output_fn: ``output_fn(model, batch) -> Tensor[B]``, one scalar per example (e.g.
            ``ak.tasks.Classification().measure`` for TRAK's margin, ``.loss`` for the loss).
        k: feature dimension.
        seed, kind: the projection (see ``attrkernels.sketch``).
        mode: "dense" (exact sketch of g) or "factored" (per-layer Kronecker projections).
        params: names of the tracked parameters (default: every parameter with requires_grad).
        backend: sketch backend ("auto", "cpu", "triton", "cuda", "torch").
        memory_budget: bytes of per-example gradient held at once (default 32 MiB: blocks big
            enough for the sketch kernel's peak, small next to what vmap-based featurizers hold).
        fallback: names of parameters to compute with torch.func even if a hook could (each is
            taken away from its module's hook, whose other parameters stay hooked).

    ``gradients(batch)`` materialises g [B, p] instead (a reference for small models; without a
    sketch use ``attrkernels.capture.Gradients``).
    """

    def __init__(self, model, output_fn, k, *, seed=0, kind="rademacher", mode="dense",
                 params=None, backend="auto", memory_budget=DEFAULT_MEMORY_BUDGET, fallback=()):
        if not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        self.k = check_k(k)
        self.kind = check_kind(kind)
        split_seed(seed)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.seed, self.mode, self.backend = seed, mode, backend
        self._setup(model, output_fn, params, fallback, memory_budget)
        self._replanned()

    def _replanned(self):
        if self.mode == "factored":
            self._layout_factored()

    # -----------------------------------------------------------------------------------------
    def _layout_factored(self):
        kron = []
        fallback = {id(p) for _, p in self.plan.fallback}
        users = {}  # id(weight) -> how many hooked modules use it (a tied weight: several)
        for module, cls in self.plan.hooked.values():
            w = cls.weight_of(module)
            if isinstance(w, torch.nn.Parameter):
                users[id(w)] = users.get(id(w), 0) + 1
        for mname, (module, cls) in self.plan.hooked.items():
            w = cls.weight_of(module)
            if (cls.projectable(module) and id(w) in self.plan.offsets and id(w) not in fallback
                    and users[id(w)] == 1):
                kron.append((mname, module, cls))
        kron_ids = {id(cls.weight_of(m)) for _, m, cls in kron}
        self._rest = [(n, p) for n, p in zip(self.plan.names, self.plan.params) if id(p) not in kron_ids]
        groups = len(kron) + (1 if self._rest else 0)
        if self.k < groups:
            raise ValueError(f"k = {self.k} is smaller than the {groups} feature groups of factored "
                             "mode (one per Linear/Conv weight, one for the other parameters)")
        shares = [self.k // groups + (1 if i < self.k % groups else 0) for i in range(groups)]
        self._kron, col = [], 0
        for l, (mname, module, cls) in enumerate(kron):
            w = cls.weight_of(module)
            d_in, d_out = cls.dims(module, False)
            k_in, k_out = _factor_dims(shares[l], d_in, d_out)
            self._kron.append(_KronLayer(mname, w, cls, k_in, k_out, shares[l], col,
                                         derive_seed(self.seed, 2 * l), derive_seed(self.seed, 2 * l + 1)))
            col += shares[l]
        self._rest_col, self._rest_k = col, (shares[-1] if self._rest else 0)
        self._rest_offsets, total = {}, 0
        for _, p in self._rest:
            self._rest_offsets[id(p)] = total
            total += p.numel()
        self._rest_seed = derive_seed(self.seed, 2 * len(kron))

    # -----------------------------------------------------------------------------------------
    def _sketch_block(self, blk, k, seed, offset, out):
        """out += sketch of the block at its rows (and blk.sums += its column sums, for the
        consistency check); a non-finite block names its parameter."""
        try:
            sketch(blk.values, k, seed=seed, kind=self.kind, backend=self.backend,
                   row_offset=offset + blk.start, out=out, accumulate=True, colsum=blk.sums)
        except ValueError as err:
            if "NaN or Inf" not in str(err):
                raise
            self._check_finite(blk)
            raise

    # -----------------------------------------------------------------------------------------
    def __call__(self, batch) -> torch.Tensor:
        self.peak_bytes = 0
        handlers, B, fb, batch_grads = self._capture_planned(batch)
        device = next(iter(self.plan.params)).device
        phi = torch.zeros(B, self.k, dtype=torch.float32, device=device)
        if self.mode == "dense":
            for blk in self._blocks(handlers, fb, batch_grads, check_finite=False, caller_sums=True):
                self._sketch_block(blk, self.k, self.seed, self.plan.offsets[id(blk.param)], phi)
                del blk
            return phi
        self._factored(handlers, fb, batch_grads, phi)
        return phi

    def _factored(self, handlers, fb, batch_grads, phi):
        for layer in self._kron:
            A, D = handlers[layer.module_name].kron()
            B, T = A.shape[0], A.shape[1]
            a = sketch(A.reshape(B * T, -1).to(torch.float32), layer.k_in, seed=layer.seed_in,
                       kind=self.kind, backend=self.backend).reshape(B, T, -1)
            d = sketch(D.reshape(B * T, -1).to(torch.float32), layer.k_out, seed=layer.seed_out,
                       kind=self.kind, backend=self.backend).reshape(B, T, -1)
            F = torch.bmm(d.transpose(1, 2), a).reshape(B, -1)[:, :layer.share]
            phi[:, layer.col0:layer.col0 + layer.share] = F * math.sqrt(layer.k_in * layer.k_out / layer.share)
            self._check_kron_consistency(layer, A, D, batch_grads)
        if self._rest:
            out = phi[:, self._rest_col:self._rest_col + self._rest_k]
            rest_ids = set(self._rest_offsets)
            acc = torch.zeros_like(out)
            for blk in self._blocks(handlers, fb, batch_grads, params_filter=rest_ids, check_finite=False,
                                    caller_sums=True):
                self._sketch_block(blk, self._rest_k, self._rest_seed, self._rest_offsets[id(blk.param)], acc)
            out.copy_(acc)

    def _check_kron_consistency(self, layer, A, D, batch_grads):
        got = layer.handler.to_storage(torch.einsum("bto,bti->oi", D.to(torch.float32), A.to(torch.float32)))
        got = got.reshape(-1)
        if not torch.isfinite(got).all():
            bad = sorted(set(nonfinite_rows(A)) | set(nonfinite_rows(D)))
            raise NonFiniteExamples(f"non-finite gradient of {self.plan.name_of(layer.param)!r}", bad or range(A.shape[0]))
        self._check_sum(id(layer.param), got, batch_grads)


__all__ = ["Featurizer"]
