"""The passes over data: batches on the model's device, hooked forward/backward passes, and the
two factor passes (covariances; EK-FAC's eigenvalue correction) with the Fisher's loss.

Each layer's statistics come from its handler (``attrkernels.capture.handlers``); nothing here
knows a layer type.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...capture import Capture, make_plan
from ...capture.handlers import CovarianceSums
from ...capture.hooks import unbatched_modules
from ...kernels.philox import derive_seed
from ...utils.batches import to_device
from ..base import call_task, iterate
from .factors import LayerFactors
from .selection import tracked_names


def fisher_loss(task, fisher: str, seed: int, stage: int, checkpoint: int, start: int):
    """The loss whose gradients define the Fisher: labels sampled by the task (``sampled_loss``),
    fresh for each stage (0 covariances, 1 Lambda), checkpoint and batch (its first example
    ``start``); or the dataset's labels (``fisher="empirical"``: ``task.loss``)."""
    if fisher == "empirical":
        return task.loss
    seed = derive_seed(derive_seed(derive_seed(seed, stage), checkpoint), start)

    def sampled_loss(model, batch):
        device = next(model.parameters()).device
        return task.sampled_loss(model, batch, torch.Generator(device=device).manual_seed(seed))

    sampled_loss.__name__ = "sampled_loss"
    return sampled_loss


class Passes:
    """Passes over data for one model, task and layer selection (``selection.Layer`` list)."""

    def __init__(self, model, task, layers: list, memory_budget: int, verbose: bool):
        self.model, self.task, self.layers = model, task, layers
        self.memory_budget, self.verbose = memory_budget, verbose
        self.plan = make_plan(model, tracked_names(layers))
        self.params = list(self.plan.params)

    def first_batch(self, loader):
        """The loader's first batch (as it yields it)."""
        for _, batch, _ in iterate(loader, self.task, "train"):
            return batch

    def batches(self, loader, what, desc):
        """(first example, batch on the model's device, size) over a loader, with a progress bar."""
        device = next(self.model.parameters()).device
        total = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(iterate(loader, self.task, what), total=total, desc=desc, unit="batch",
                   disable=not self.verbose, leave=False)
        for start, batch, size in bar:
            yield start, to_device(batch, device), size

    def record(self, batch, size, fn, what) -> dict:
        """Run ``fn(model, batch)`` under capture and backpropagate its sum; returns the handlers.

        The backward pass asks autograd for the gradients of the tracked layers' outputs, not of
        their parameters, so no weight gradient is computed (a third of a backward pass). When an
        output was modified in place afterwards its tensor no longer holds the layer's output, and
        the parameters are asked for instead (the capture's hooks see the right gradient either way).
        """
        outputs = []

        def keep(module, args, output):
            outputs.append((output, output._version))

        hooks = [layer.module.register_forward_hook(keep) for layer in self.layers]
        try:
            with Capture(self.plan) as cap, torch.enable_grad():
                out = call_task(fn, self.model, batch, size, what)
        finally:
            for h in hooks:
                h.remove()
        unbatched = unbatched_modules(cap.handlers, size)
        if unbatched:
            raise ValueError(f"modules {unbatched} are called without the batch dimension, so their "
                             "per-example statistics cannot be captured; leave their parameters out "
                             "with params=")
        bad = ~torch.isfinite(out.detach())
        if bad.any():
            raise ValueError(f"the {what} loss or measurement is NaN or Inf for examples "
                             f"{torch.nonzero(bad).flatten().tolist()[:10]} of a batch")
        if not out.requires_grad:
            raise ValueError(f"the task's output on the {what} loader does not depend on any tracked parameter")
        intact = all(o.requires_grad and o._version == v for o, v in outputs)
        torch.autograd.grad(out.sum(), [o for o, _ in outputs] if intact else self.params, allow_unused=True)
        for layer in self.layers:
            records = cap.handlers[layer.name].records
            if not records or any(r.grad_out is None for r in records):
                raise ValueError(f"layer {layer.name!r} received no gradient from the task on the {what} "
                                 "loader; leave its parameters out of params=")
        return cap.handlers

    def covariances(self, train, k: int, fisher: str, seed: int) -> tuple[dict, int]:
        """Stage "covariance" of checkpoint k: {layer: LayerFactors(A, S)} and the number of examples."""
        sums = {layer.name: CovarianceSums() for layer in self.layers}
        n = 0
        for start, batch, size in self.batches(train, "train", f"covariances (checkpoint {k})"):
            handlers = self.record(batch, size, fisher_loss(self.task, fisher, seed, 0, k, start), "train")
            for layer in self.layers:
                handlers[layer.name].covariances(sums[layer.name], layer.bias, self.memory_budget)
            n += size
        factors = {}
        for layer in self.layers:
            s = sums[layer.name]
            factors[layer.name] = LayerFactors(A=s.A.to(torch.float64) / max(s.positions, 1),
                                               S=s.S.to(torch.float64) / n)
        return factors, n

    def correction(self, train, k: int, factors: dict, fisher: str, seed: int) -> None:
        """Stage "lambda" of checkpoint k: EK-FAC's Lambda = E_b[(Q_S^T G_b Q_A)^2] into ``factors``."""
        device = next(self.model.parameters()).device
        sums = {layer.name: torch.zeros(layer.d_out, layer.d_in, device=device) for layer in self.layers}
        n = 0
        for start, batch, size in self.batches(train, "train", f"eigenvalue correction (checkpoint {k})"):
            handlers = self.record(batch, size, fisher_loss(self.task, fisher, seed, 1, k, start), "train")
            for layer in self.layers:
                handlers[layer.name].correction(sums[layer.name], factors[layer.name].bases32(), layer.bias,
                                                self.memory_budget)
            n += size
        for layer in self.layers:
            factors[layer.name].lam = sums[layer.name] / n
