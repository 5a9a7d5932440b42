"""The damped curvature of a mean training loss as an operator on blocks of vectors: the Hessian
or the Gauss-Newton matrix, one pass of ``kernels.hvp`` over the training data per product.

Under a ``torch.distributed`` process group (``shard`` given), each rank passes over its shard of
the training set: the product over the whole set is the sum over examples, so each rank's
shard mean is turned back into its sum, one ``all_reduce_sum`` adds the ranks' sums, and every
rank divides by N and adds the damping: every rank gets the same product, so every rank runs the
same solver arithmetic on it.
"""
from __future__ import annotations

import math

import torch

from ..capture.fallback import ModelCall
from ..distributed import all_reduce_sum, process_group, together
from ..kernels.hvp import hvp
from ..kernels.lanczos import lanczos_extremes
from ..tasks.base import implements
from ..utils.batches import to_device
from ..utils.errors import NotPositiveDefiniteError
from .base import call_task
from .checkpoints import model_device

CURVATURES = ("hessian", "gauss-newton")


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is >= x (> 0)."""
    exponent = math.floor(math.log10(x))
    for mantissa in (1, 2, 5, 10):
        if mantissa * 10 ** exponent >= x * (1 - 1e-12):
            return mantissa * 10.0 ** exponent
    return 10.0 ** (exponent + 1)


class Curvature:
    """The damped curvature of the mean training loss at the model's current weights.

    Parameters are the tracked ones of ``plan`` (flattened in its order, as the capture's
    gradients); ``matvec(P)`` maps a block [p, w] to (H + damping I) P in one pass over ``train``,
    whose batches are moved to the model's device (a loader, or ``DataPasses.batches(...)`` for
    checked passes). The Hessian is that of ``task.loss``; the
    Gauss-Newton matrix that of ``task.logit_loss`` through ``task.logits``.

    ``shard``: under a process group, the ``distributed.Shard`` of the N = ``shard.n`` training
    examples that ``train`` yields on this rank; ``full`` (and ``matvec``) then sum the ranks'
    products (see the module docstring).
    """

    def __init__(self, model, task, plan, train, *, damping: float, curvature: str, chunk=None, shard=None):
        self.model, self.task, self.plan, self.train = model, task, plan, train
        self.damping, self.curvature, self.chunk, self.shard = damping, curvature, chunk, shard
        self.p = plan.total
        self.calls = 0
        if curvature == "hessian":
            self.loss, self.outputs = self._functional(task.loss), None
        else:
            self.loss, self.outputs = task.logit_loss, self._functional(task.logits)

    def _functional(self, fn):
        wrapper = ModelCall(self.model, fn)

        def call(params, batch):
            named = {f"model.{n}": v for n, v in params.items()}
            return torch.func.functional_call(wrapper, named, (batch,), strict=False)

        return call

    def params(self) -> dict:
        return {n: p.detach() for n, p in zip(self.plan.names, self.plan.params)}

    def _split(self, P: torch.Tensor) -> dict:
        w = P.shape[1]
        return {n: P[off:off + p.numel()].T.reshape(w, *p.shape)
                for n, p, off in zip(self.plan.names, self.plan.params,
                                     (self.plan.offsets[id(p)] for p in self.plan.params))}

    def _join(self, out: dict, w: int) -> torch.Tensor:
        return torch.cat([out[n].reshape(w, -1) for n in self.plan.names], 1).T

    def apply(self, P: torch.Tensor, batches, damping: float) -> torch.Tensor:
        """(C + damping I) P over ``batches`` (C the mean curvature over them), P [p, w]."""
        self.calls += 1
        w = P.shape[1]
        dtype = self.plan.params[0].dtype
        was_training = self.model.training
        self.model.eval()
        device = model_device(self.model)
        try:
            # no_grad: the untracked parameters (the model's own, requires_grad) would otherwise
            # tie every product to an autograd graph of its batch, which block CG's running
            # residuals keep alive (+3.7 GiB per solve on text-lm). torch.func's transforms
            # ignore an outer no_grad, so the products are unchanged.
            with torch.no_grad():
                out = hvp(self.loss, self.params(), self._split(P.to(dtype)), (to_device(b, device) for b in batches),
                          damping=damping, outputs=self.outputs, chunk=self.chunk)
        finally:
            self.model.train(was_training)
        return self._join(out, w).to(P.dtype)

    def full(self, P: torch.Tensor, damping: float) -> torch.Tensor:
        """(C + damping I) P with C the mean curvature over the whole training set: this rank's
        shard part, all-reduced, under a process group (one ``all_reduce_sum`` per call)."""
        if self.shard is None or not process_group().distributed:
            return self.apply(P, self.train, damping)
        size = len(self.shard)
        with together("a curvature-vector product", self.shard):
            local = self.apply(P, self.train, 0.0).mul_(size) if size else torch.zeros_like(P)
        all_reduce_sum([local], what="curvature-vector products")
        return local.div_(self.shard.n).add_(P, alpha=damping)

    def matvec(self, P: torch.Tensor) -> torch.Tensor:
        return self.full(P, self.damping)

    def not_positive_definite(self, found: float | None = None) -> NotPositiveDefiniteError:
        """The error to raise, suggesting a damping from Lanczos estimates of the undamped spectrum."""
        device = self.plan.params[0].device
        low, high = lanczos_extremes(lambda v: self.full(v, 0.0), self.p, steps=30,
                                     dtype=self.plan.params[0].dtype, device=device)
        need = max(-low, 0.0)
        suggestion = nice_ceiling(max(2 * need, 1e-3 * abs(high), 1e-8))
        seen = f" (a direction of curvature {found:.3g} was found)" if found is not None else ""
        gauss_newton = self.curvature == "hessian" and all(implements(self.task, n) for n in ("logits", "logit_loss"))
        alternative = " or curvature='gauss-newton' (positive semi-definite)" if gauss_newton else ""
        return NotPositiveDefiniteError(
            f"the damped {self.curvature} H + damping I with damping={self.damping:g} is not positive "
            f"definite{seen}; Lanczos estimates the {self.curvature}'s eigenvalues in "
            f"[{low:.3g}, {high:.3g}]. Pass damping >= {suggestion:g}{alternative}.", found=found)


def check_gauss_newton_task(task) -> None:
    """Gauss-Newton needs the loss as a function of the model's output: task.logits and task.logit_loss."""
    missing = [name for name in ("logits", "logit_loss") if not implements(task, name)]
    if missing:
        raise ValueError("curvature='gauss-newton' needs task.logits(model, batch) and task.logit_loss(logits, "
                         "batch), with loss = logit_loss(logits) convex in the logits (e.g. ak.tasks."
                         f"Classification); {type(task).__name__} does not define {' and '.join(missing)}. "
                         "Use curvature='hessian'.")


def check_gauss_newton(task, model, batches) -> None:
    """Gauss-Newton needs task.loss = task.logit_loss of task.logits; check it on the first batch."""
    for _, batch, size in batches:
        with torch.no_grad():
            want = call_task(task.loss, model, batch, size, "train")
            got = task.logit_loss(task.logits(model, batch), batch)
        if not torch.allclose(want, got, rtol=1e-4, atol=1e-6):
            raise ValueError("curvature='gauss-newton': task.loss is not task.logit_loss of task.logits "
                             "on the first training batch; use curvature='hessian'.")
        return


__all__ = ["Curvature", "CURVATURES", "nice_ceiling", "check_gauss_newton", "check_gauss_newton_task"]
