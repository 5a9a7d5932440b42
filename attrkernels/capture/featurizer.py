"""Sketched per-example gradients, phi_b = P^T g_b, without materialising g_b for the whole model.

g_b = d f_b / d theta for one scalar output f_b per example (``output_fn(model, batch)`` -> [B]),
over the tracked parameters theta in ``model.named_parameters()`` order, flattened row-major
(p entries). Modes:

* ``dense`` (exact): phi_b = sketch(g_b) with the projection P (p x k) of
  ``attrkernels.sketch`` and the same seed, so phi equals projecting the materialised gradient.
  Each layer's gradient is formed from its inputs and output-gradients in blocks of weight rows
  (all examples of the batch at once, at most ``memory_budget`` bytes each) and each block is
  sketched at its row offset in g and accumulated. Peak extra memory: one block.
* ``factored`` (LoGra-style): every Linear / Conv weight (groups = 1) gets its own Kronecker
  projection, phi_l = vec((D P_out)^T (A P_in)) = vec(P_out^T G_l P_in) with P_in [d_in, k_in],
  P_out [d_out, k_out] independent projections; all other tracked parameters (biases, norms,
  embeddings, grouped convolutions, torch.func parameters) are sketched densely together.
  k is split evenly over the Kronecker layers and that rest group (earlier ones get the
  remainder); a layer with share k_l uses k_in ~ k_out ~ sqrt(k_l) (capped by its widths), keeps
  the first k_l entries of the k_out x k_in product (row-major) and scales them by
  sqrt(k_in k_out / k_l), so E||phi_l||^2 = ||G_l||^2. Seeds: layer l uses
  derive_seed(seed, 2l) for P_in and derive_seed(seed, 2l + 1) for P_out; the rest group
  derive_seed(seed, 2L).

The model runs in eval mode (BatchNorm with running statistics, no dropout); examples must not
interact. Every call checks that the per-example gradients of hooked parameters add up to the
batch gradient autograd computes, so a parameter used outside its module (weight tying,
functional use) raises instead of giving wrong features.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..kernels.philox import derive_seed, split_seed
from ..kernels.projection import check_k, check_kind
from ..kernels.sketch import sketch
from .fallback import fallback_gradients, one_example
from .hooks import Capture, make_plan, unbatched_modules
from .layers import Block, ConvHandler, LinearHandler

MODES = ("dense", "factored")
CONSISTENCY_RTOL = 1e-3


@dataclass
class _KronLayer:
    module_name: str
    param: torch.nn.Parameter
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


DEFAULT_MEMORY_BUDGET = 32 << 20


class _Replan(Exception):
    """The plan changed during a capture; capture again."""


def _batch_size(batch):
    if torch.is_tensor(batch):
        return batch.shape[0] if batch.ndim else None
    if isinstance(batch, (tuple, list)):
        for v in batch:
            n = _batch_size(v)
            if n is not None:
                return n
    if isinstance(batch, dict):
        for v in batch.values():
            n = _batch_size(v)
            if n is not None:
                return n
    return None


class Featurizer:
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
        fallback: names of parameters to compute with torch.func even if a hook could.
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
        if not isinstance(memory_budget, int) or memory_budget < 4096:
            raise ValueError(f"memory_budget must be an int of at least 4096 bytes, got {memory_budget!r}")
        self.model, self.output_fn, self.seed, self.mode = model, output_fn, seed, mode
        self.backend, self.memory_budget = backend, memory_budget
        self.params, self.fallback = params, tuple(fallback)
        self.plan = make_plan(model, params, self.fallback)
        self.peak_bytes = 0  # largest per-example-gradient block of the last call
        self._probed = False
        if mode == "factored":
            self._layout_factored()

    @property
    def num_params(self) -> int:
        """p: length of the flattened per-example gradient."""
        return self.plan.total

    # -----------------------------------------------------------------------------------------
    def _layout_factored(self):
        kron = []
        for mname, (module, cls) in self.plan.hooked.items():
            w = module.weight
            factorable = cls is LinearHandler or (cls is ConvHandler and module.groups == 1)
            if factorable and id(w) in self.plan.offsets:
                kron.append((mname, module))
        kron_ids = {id(m.weight) for _, m in kron}
        self._rest = [(n, p) for n, p in zip(self.plan.names, self.plan.params) if id(p) not in kron_ids]
        groups = len(kron) + (1 if self._rest else 0)
        if self.k < groups:
            raise ValueError(f"k = {self.k} is smaller than the {groups} feature groups of factored "
                             "mode (one per Linear/Conv weight, one for the other parameters)")
        shares = [self.k // groups + (1 if i < self.k % groups else 0) for i in range(groups)]
        self._kron, col = [], 0
        for l, (mname, module) in enumerate(kron):
            w = module.weight
            d_out, d_in = w.shape[0], w[0].numel()
            k_in, k_out = _factor_dims(shares[l], d_in, d_out)
            self._kron.append(_KronLayer(mname, w, k_in, k_out, shares[l], col,
                                         derive_seed(self.seed, 2 * l), derive_seed(self.seed, 2 * l + 1)))
            col += shares[l]
        self._rest_col, self._rest_k = col, (shares[-1] if self._rest else 0)
        self._rest_offsets, total = {}, 0
        for _, p in self._rest:
            self._rest_offsets[id(p)] = total
            total += p.numel()
        self._rest_seed = derive_seed(self.seed, 2 * len(kron))

    # -----------------------------------------------------------------------------------------
    def _capture(self, batch):
        """Run output_fn with hooks; returns (handlers, batch size, fallback gradients)."""
        model, plan = self.model, self.plan
        was_training = model.training
        model.eval()
        try:
            with Capture(plan) as cap, torch.enable_grad():
                out = self.output_fn(model, batch)
            B = _batch_size(batch)
            if not torch.is_tensor(out) or out.ndim != 1 or (B is not None and out.shape[0] != B):
                raise ValueError(
                    "output_fn must return one value per example, a tensor of shape "
                    f"[{B if B is not None else 'B'}]; got "
                    f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}"
                )
            B = out.shape[0]
            self._route_unbatched_to_fallback(cap.handlers, B)
            bad = ~torch.isfinite(out.detach())
            if bad.any():
                raise ValueError(f"output_fn returned NaN or Inf for examples "
                                 f"{torch.nonzero(bad).flatten().tolist()[:10]}")
            hooked = [p for module, _ in plan.hooked.values()
                      for p in module.parameters(recurse=False) if id(p) in plan.offsets]
            hooked = list({id(p): p for p in hooked}.values())
            batch_grads = {}
            if hooked:
                if not out.requires_grad:
                    raise ValueError("output_fn's output does not depend on any tracked parameter")
                grads = torch.autograd.grad(out.sum(), hooked, allow_unused=True)
                for p, g in zip(hooked, grads):
                    if g is None:
                        raise ValueError(f"tracked parameter {plan.name_of(p)!r} received no gradient "
                                         "from output_fn; leave it out of params=")
                    batch_grads[id(p)] = g.reshape(-1)
            for mname, handler in cap.handlers.items():
                if not handler.records or any(r.grad_out is None for r in handler.records):
                    raise ValueError(f"tracked module {mname!r} received no gradient from output_fn; "
                                     "leave its parameters out of params=")
            fb = fallback_gradients(model, self.output_fn, batch, plan.fallback, B)
        finally:
            model.train(was_training)
        return cap.handlers, B, fb, batch_grads

    def _route_unbatched_to_fallback(self, handlers, B):
        """A hooked module called on inputs without the batch dimension (e.g. a positional
        embedding looked up with arange(T) and broadcast over the batch) receives output-gradients
        already summed over examples, so hooks cannot give its per-example gradients: move its
        parameters to the torch.func fallback (once, with a warning) and ask for a retry."""
        unbatched = unbatched_modules(handlers, B)
        if not unbatched:
            return
        names = [n for n, p in zip(self.plan.names, self.plan.params)
                 for m in unbatched if any(p is q for q in handlers[m].module.parameters(recurse=False))]
        warnings.warn(f"modules {unbatched} are called without the batch dimension; the per-example "
                      f"gradients of {names} are computed with torch.func instead of hooks", stacklevel=4)
        self.fallback = tuple(dict.fromkeys(self.fallback + tuple(names)))
        self.plan = make_plan(self.model, self.params, self.fallback)
        if self.mode == "factored":
            self._layout_factored()
        raise _Replan()

    def _capture_planned(self, batch):
        """_capture, after a one-example probe on the first call, and once more after a change
        of plan."""
        if not self._probed:
            self._probed = True
            try:
                self._probe(batch)
            except _Replan:
                pass
        try:
            return self._capture(batch)
        except _Replan:
            return self._capture(batch)

    def _probe(self, batch):
        """Forward one example: a hooked module whose input then still has a leading dimension
        other than 1 does not see the batch (the shapes of a full batch cannot tell when that
        dimension happens to equal B)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with Capture(self.plan) as cap, torch.no_grad():
                self.output_fn(self.model, one_example(batch, 0))
        finally:
            self.model.train(was_training)
        self._route_unbatched_to_fallback(cap.handlers, 1)

    def _blocks(self, handlers, fb, batch_grads, params_filter=None, check_finite=True):
        """All gradient blocks; checks that hooked blocks add up to batch gradients, and (when
        ``check_finite``; the sketch kernel checks the blocks it gets itself) finiteness."""
        tracked = {p for p in self.plan.params if params_filter is None or id(p) in params_filter}
        sums = {}
        for handler in handlers.values():
            for blk in handler.blocks(tracked, self.memory_budget):
                if check_finite:
                    self._check_finite(blk)
                s = sums.setdefault(id(blk.param), torch.zeros(blk.param.numel(), dtype=torch.float32,
                                                                device=blk.values.device))
                s[blk.start:blk.start + blk.values.shape[1]] += blk.values.sum(0)
                self.peak_bytes = max(self.peak_bytes, blk.values.numel() * blk.values.element_size())
                yield blk
                del blk
        by_id = {id(p): p for _, p in self.plan.fallback}
        for name, g in fb.items():
            p = dict(self.plan.fallback)[name]
            if params_filter is not None and id(p) not in params_filter:
                continue
            blk = Block(by_id[id(p)], 0, g)
            if check_finite:
                self._check_finite(blk)
            yield blk
        for pid, s in sums.items():
            want = batch_grads[pid].to(torch.float32)
            err = (s - want).norm().item()
            scale = max(want.norm().item(), s.norm().item(), 1e-30)
            if err > CONSISTENCY_RTOL * scale:
                name = self.plan.names[[id(p) for p in self.plan.params].index(pid)]
                raise RuntimeError(
                    f"per-example gradients of {name!r} do not add up to its batch gradient "
                    f"(relative difference {err / scale:.2e}): the parameter is used outside the "
                    f"module that owns it (weight tying, functional use). Pass fallback=[{name!r}] "
                    "to compute it with torch.func, or leave it out of params="
                )

    def _sketch_block(self, blk, k, seed, offset, out):
        """out += sketch of the block at its rows; a non-finite block names its parameter."""
        try:
            sketch(blk.values, k, seed=seed, kind=self.kind, backend=self.backend,
                   row_offset=offset + blk.start, out=out, accumulate=True)
        except ValueError as err:
            if "NaN or Inf" not in str(err):
                raise
            self._check_finite(blk)
            raise

    def _check_finite(self, blk):
        bad = ~torch.isfinite(blk.values).all(dim=1)
        if bad.any():
            raise ValueError(
                f"non-finite gradient of {self.plan.name_of(blk.param)!r} for examples "
                f"{torch.nonzero(bad).flatten().tolist()[:10]}"
            )

    # -----------------------------------------------------------------------------------------
    def __call__(self, batch) -> torch.Tensor:
        self.peak_bytes = 0
        handlers, B, fb, batch_grads = self._capture_planned(batch)
        device = next(iter(self.plan.params)).device
        phi = torch.zeros(B, self.k, dtype=torch.float32, device=device)
        if self.mode == "dense":
            for blk in self._blocks(handlers, fb, batch_grads, check_finite=False):
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
            for blk in self._blocks(handlers, fb, batch_grads, params_filter=rest_ids, check_finite=False):
                self._sketch_block(blk, self._rest_k, self._rest_seed, self._rest_offsets[id(blk.param)], acc)
            out.copy_(acc)

    def _check_kron_consistency(self, layer, A, D, batch_grads):
        want = batch_grads[id(layer.param)].to(torch.float32)
        got = torch.einsum("bto,bti->oi", D.to(torch.float32), A.to(torch.float32)).reshape(-1)
        if not torch.isfinite(got).all():
            raise ValueError(f"non-finite gradient of {self.plan.name_of(layer.param)!r}")
        scale = max(want.norm().item(), got.norm().item(), 1e-30)
        if (got - want).norm().item() > CONSISTENCY_RTOL * scale:
            raise RuntimeError(
                f"per-example gradients of {self.plan.name_of(layer.param)!r} do not add up to its "
                "batch gradient: the parameter is used outside the module that owns it. Pass "
                f"fallback=[{self.plan.name_of(layer.param)!r}] or leave it out of params="
            )

    # -----------------------------------------------------------------------------------------
    def gradients(self, batch) -> torch.Tensor:
        """The materialised per-example gradients g [B, p] (float32): a reference for small models."""
        handlers, B, fb, batch_grads = self._capture_planned(batch)
        device = next(iter(self.plan.params)).device
        g = torch.zeros(B, self.plan.total, dtype=torch.float32, device=device)
        for blk in self._blocks(handlers, fb, batch_grads):
            off = self.plan.offsets[id(blk.param)] + blk.start
            g[:, off:off + blk.values.shape[1]] += blk.values
        return g


__all__ = ["Featurizer"]
