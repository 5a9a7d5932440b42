"""The capture core shared by the Featurizer and Gradients: one hooked pass over a batch and the
per-example gradient blocks of every tracked parameter.

``PerExample(model, output_fn, params=, fallback=, memory_budget=)`` runs ``output_fn(model,
batch) -> [B]`` (one scalar f_b per example) in eval mode under the hooks of the plan
(``hooks.make_plan``), backpropagates sum_b f_b once, and turns each hooked module's records into
gradient blocks with its handler (``handlers``); parameters no handler captures come from
torch.func (``fallback``; a parameter named there is taken away from its module's hook). Every
pass checks that the hooked per-example gradients add up to the batch gradient autograd
computes, so a parameter used outside its module (weight tying, functional use) raises instead
of giving wrong gradients; the tolerance is relative to the parameter's gradient, with a floor
relative to the whole batch gradient (a parameter whose gradient is exactly zero, such as the
bias of an attention key projection, only has rounding noise to compare).
``gradients(batch)`` materialises g [B, p] (float32, ``model.named_parameters()`` order,
row-major).

Non-finite values (the output of ``output_fn``, per-example gradients) raise
``NonFiniteExamples``, an ``utils.errors.ExampleError`` carrying the batch-local indices of the
examples; a method's pass over a loader re-raises it with ``locate`` (global index, checkpoint).
"""
from __future__ import annotations

import warnings

import torch

from ..utils.batches import batch_size, one_example
from ..utils.checks import check_memory_budget
from ..utils.errors import ExampleError
from .fallback import fallback_gradients
from .handlers import Block
from .handlers.base import Workspace
from .hooks import Capture, make_plan, release_outputs, unbatched_modules

# Bytes of per-example gradient held at once by default: blocks big enough for the sketch
# kernel to run at full speed, small next to what vmap-based featurizers hold.
DEFAULT_MEMORY_BUDGET = 32 << 20
CONSISTENCY_RTOL = 1e-3
# Floor of the consistency check's scale, relative to the norm of the whole batch gradient: a
# parameter whose gradient is exactly zero (e.g. the bias of an attention key projection) has
# only float32 rounding noise (~1e-9 of the whole gradient) to compare.
CONSISTENCY_FLOOR = 1e-3

NONFINITE_FIX = "check these examples' inputs for NaN / Inf values and the model's weights"


class NonFiniteExamples(ExampleError):
    """Non-finite values for some examples of a batch: ``examples`` are their indices in the batch.
    The message reads "<problem> for examples [...]"; ``locate`` (ExampleError's) names global
    indices, the loader and the checkpoint."""

    def __init__(self, problem: str, examples, *, fix: str = NONFINITE_FIX, where: str = ""):
        super().__init__(problem, examples, fix=fix, where=where)
        shown = self.examples[:10]
        more = f" (and {len(self.examples) - 10} more)" if len(self.examples) > 10 else ""
        self.args = (f"{problem} for examples {shown}{more}{where}{'; ' + fix if fix else ''}",)


def nonfinite_rows(values: torch.Tensor) -> list:
    """Indices b of the rows values[b] (any trailing shape) holding NaN or Inf."""
    if not values.numel() or bool(torch.isfinite(values.sum())):  # NaN / Inf propagate: one reduction
        return []
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    return torch.nonzero(bad).flatten().tolist()


class InconsistentGradients(RuntimeError):
    """The hooks' per-example gradients of a parameter do not add up to its batch gradient: the
    parameter is used outside the module that owns it."""


class _Replan(Exception):
    """The plan changed during a capture; capture again."""


class PerExample:
    """Per-example gradients of ``output_fn`` over the tracked parameters, block by block."""

    def __init__(self, model, output_fn, *, params=None, fallback=(), memory_budget=DEFAULT_MEMORY_BUDGET):
        if not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        self._setup(model, output_fn, params, fallback, memory_budget)

    def _setup(self, model, output_fn, params, fallback, memory_budget):
        self.memory_budget = check_memory_budget(memory_budget)
        self.model, self.output_fn = model, output_fn
        self.params, self.fallback = params, tuple(fallback)
        self.plan = make_plan(model, params, self.fallback)
        self.peak_bytes = 0  # largest per-example-gradient block of the last call
        self._grad_scale = 0.0  # norm of the whole batch gradient of the hooked parameters
        self._workspace = Workspace()  # where handlers form blocks (one alive at a time)
        self._probed = False

    @property
    def num_params(self) -> int:
        """p: length of the flattened per-example gradient."""
        return self.plan.total

    def _replanned(self) -> None:
        """Called after the plan changed (a module moved to the fallback)."""

    # -----------------------------------------------------------------------------------------
    def _capture(self, batch):
        """Run output_fn with hooks; returns (handlers {module name: handler}, batch size B,
        fallback gradients {name: [B, numel]}, batch gradients {id(param): [numel]} of the
        hooked parameters)."""
        model, plan = self.model, self.plan
        was_training = model.training
        model.eval()
        try:
            with Capture(plan) as cap, torch.enable_grad():
                out = self.output_fn(model, batch)
            B = batch_size(batch)
            if not torch.is_tensor(out) or out.ndim != 1 or (B is not None and out.shape[0] != B):
                raise ValueError(
                    "output_fn must return one value per example, a tensor of shape "
                    f"[{B if B is not None else 'B'}]; got "
                    f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}"
                )
            B = out.shape[0]
            self._route_unbatched_to_fallback(cap.handlers, B)
            bad = nonfinite_rows(out.detach())
            if bad:
                raise NonFiniteExamples("output_fn returned NaN or Inf", bad)
            hooked = plan.hooked_params()
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
            self._grad_scale = (torch.stack([g.to(torch.float32).norm() for g in batch_grads.values()]).norm().item()
                                if batch_grads else 0.0)
            release_outputs(cap.handlers)
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
        self._replanned()
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

    def _blocks(self, handlers, fb, batch_grads, params_filter=None, check_finite=True, caller_sums=False):
        """All gradient blocks, each valid until the next is asked for (handlers may form them in
        one reused ``Workspace``, kept between calls); checks that hooked blocks add up to batch gradients, and (when
        ``check_finite``; the sketch kernel checks the blocks it gets itself) finiteness. With
        ``caller_sums`` the consumer adds each hooked block's ``values.sum(0)`` into its
        ``blk.sums`` before asking for the next block (the sketch kernel forms these sums while
        it reads the block, instead of a second pass over it here)."""
        fallback = {id(p) for _, p in self.plan.fallback}
        tracked = {p for p in self.plan.params if id(p) not in fallback
                   and (params_filter is None or id(p) in params_filter)}
        sums = {}
        for handler in handlers.values():
            handler.workspace = self._workspace
            for blk in handler.blocks(tracked, self.memory_budget):
                if check_finite:
                    self._check_finite(blk)
                s = sums.setdefault(id(blk.param), torch.zeros(blk.param.numel(), dtype=torch.float32,
                                                                device=blk.values.device))
                if caller_sums:
                    blk.sums = s[blk.start:blk.start + blk.values.shape[1]]
                else:
                    s[blk.start:blk.start + blk.values.shape[1]] += blk.values.sum(0)
                self.peak_bytes = max(self.peak_bytes, blk.values.numel() * blk.values.element_size())
                yield blk
                del blk
        by_name = dict(self.plan.fallback)
        for name, g in fb.items():
            p = by_name[name]
            if params_filter is not None and id(p) not in params_filter:
                continue
            blk = Block(p, 0, g)
            if check_finite:
                self._check_finite(blk)
            yield blk
        for pid, s in sums.items():
            self._check_sum(pid, s, batch_grads)

    def _check_sum(self, pid, got, batch_grads, what="per-example gradients"):
        """Raise when the per-example gradients of a hooked parameter do not add up to its batch
        gradient (relative to the larger of the two, at least ``CONSISTENCY_FLOOR`` x the norm of
        the whole batch gradient)."""
        want = batch_grads[pid].to(torch.float32)
        err = (got - want).norm().item()
        scale = max(want.norm().item(), got.norm().item(), CONSISTENCY_FLOOR * self._grad_scale, 1e-30)
        if err > CONSISTENCY_RTOL * scale:
            name = self.plan.names[[id(p) for p in self.plan.params].index(pid)]
            raise InconsistentGradients(
                f"{what} of {name!r} do not add up to its batch gradient "
                f"(relative difference {err / scale:.2e}): the parameter is used outside the "
                f"module that owns it (weight tying, functional use). " + self.sum_fix.format(name=name)
            )

    sum_fix = "Pass fallback=[{name!r}] to compute it with torch.func, or leave it out of params="

    def check(self, batch) -> None:
        """Capture ``batch`` and check that the hooks' per-example gradients of every hooked
        parameter add up to autograd's batch gradient (block by block, keeping none): for
        methods that read the hooks without forming every gradient (EK-FAC / K-FAC)."""
        handlers, _, _, batch_grads = self._capture_planned(batch)
        for _ in self._blocks(handlers, {}, batch_grads):
            pass

    def _check_finite(self, blk):
        bad = nonfinite_rows(blk.values)
        if bad:
            raise NonFiniteExamples(f"non-finite gradient of {self.plan.name_of(blk.param)!r}", bad)

    # -----------------------------------------------------------------------------------------
    def gradients(self, batch) -> torch.Tensor:
        """The materialised per-example gradients g [B, p] (float32)."""
        self.peak_bytes = 0
        handlers, B, fb, batch_grads = self._capture_planned(batch)
        device = next(iter(self.plan.params)).device
        g = torch.zeros(B, self.plan.total, dtype=torch.float32, device=device)
        for blk in self._blocks(handlers, fb, batch_grads):
            off = self.plan.offsets[id(blk.param)] + blk.start
            g[:, off:off + blk.values.shape[1]] += blk.values
        return g
