"""The passes over data: checked passes over a loader, hooked forward/backward passes, and the
two factor passes (covariances; EK-FAC's eigenvalue correction) with the Fisher's loss.

Every pass over a loader is checked (``Passes.over``): the examples it yields are compared, one
by one and in order, with the first complete pass over that loader (``Recorded``: the training
data's from the first pass of ``fit`` or from the factor store, the test loader's from the first
checkpoint of ``score``), so a loader that shuffles, augments at random,
drops examples or yields other data raises ``store.DataMismatch`` (``StoredDataMismatch`` when
the factors come from a store) instead of mixing rows; an ``ExampleError`` raised inside the
pass (non-finite values, from the capture or the checks here) is re-raised with the examples'
global indices, the loader and the checkpoint.

Each layer's statistics come from its handler (``attrkernels.capture.handlers``); nothing here
knows a layer type.
"""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch

from ...capture import Capture, make_plan
from ...capture.core import NonFiniteExamples, nonfinite_rows
from ...capture.handlers import CovarianceSums
from ...capture.hooks import release_outputs, unbatched_modules
from ...distributed import shard_loader
from ...kernels.kfac import mirror_upper
from ...kernels.philox import derive_seed
from ...store import DataMismatch, StoreMismatch
from ...tasks.base import implements, token_mask
from ...utils.batches import one_example
from ...utils.errors import ExampleError
from ..base import call_task
from ..passes import CheckedPass
from ..checkpoints import model_device
from .replay import BatchMemo, Budget, Replay, Rotations, copied_handlers, default_budget
from .spill import SpillFile
from .selection import tracked_names
from .storage import FactorStore, stored_data_mismatch


FISHERS = ("true", "empirical")


def check_fisher(task, fisher: str) -> str:
    """``fisher`` if it is one of FISHERS and the task can give it (the true Fisher samples labels
    from the model: the task needs ``sampled_loss``)."""
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if fisher == "true" and not implements(task, "sampled_loss"):
        raise TypeError("fisher='true' samples labels from the model: the task must define "
                        "sampled_loss(model, batch, generator) -> [B] (ak.tasks.Classification does); "
                        "or pass fisher='empirical'")
    return fisher


def fisher_loss(task, fisher: str, seed: int, stage: int, checkpoint: int, start: int):
    """The loss whose gradients define the Fisher: labels sampled by the task (``sampled_loss``),
    fresh for each stage (0 covariances, 1 Lambda), checkpoint and batch (its first example
    ``start``); or the dataset's labels (``fisher="empirical"``: ``task.loss``)."""
    if fisher == "empirical":
        return task.loss
    return FisherDraws(task, seed, (stage,), checkpoint, start)


def gives_loss(task) -> bool:
    """Whether the task's ``sampled_losses`` can add the training loss from the same forward pass
    (its ``with_loss`` argument)."""
    if not implements(task, "sampled_losses"):
        return False
    try:
        return "with_loss" in inspect.signature(task.sampled_losses).parameters
    except (TypeError, ValueError):
        return False


class FisherDraws:
    """The sampled losses of ``stages`` (a stage's labels as ``fisher_loss`` draws them) from one
    forward pass (``task.sampled_losses``; ``task.sampled_loss`` for one stage), then, with
    ``with_loss``, the task's loss from that pass: called as a task function it returns the first
    stage's loss [B] and keeps the others (the loss last) in ``rest``."""

    __name__ = "sampled_loss"

    def __init__(self, task, seed: int, stages: tuple, checkpoint: int, start: int, with_loss: bool = False):
        self.task, self.stages, self.with_loss = task, stages, with_loss
        self.seeds = [derive_seed(derive_seed(derive_seed(seed, s), checkpoint), start) for s in stages]
        self.rest: list = []

    def __call__(self, model, batch):
        device = next(model.parameters()).device
        gens = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        try:
            if self.with_loss:
                first, *self.rest = self.task.sampled_losses(model, batch, gens, with_loss=True)
                return first
            if len(gens) == 1:
                return self.task.sampled_loss(model, batch, gens[0])
            first, *self.rest = self.task.sampled_losses(model, batch, gens)
            return first
        except RuntimeError as err:  # e.g. labels drawn from NaN logits: name the examples
            with torch.no_grad():
                bad = nonfinite_rows(self.task.loss(model, batch).detach())
            if bad:
                raise NonFiniteExamples("the loss is NaN or Inf (labels cannot be sampled from the model's "
                                        "predictions)", bad) from err
            raise


class Recorded:
    """The examples a loader yields, in order (their digests): recorded by the first complete
    pass over the whole loader (for the training data, or read from a factor store, which then
    records them too; a sharded fit records them once its shards' digests are combined),
    compared by every later pass (a shard's pass with its slice). ``seen``: the digests of the
    last pass's examples. ``write``: whether this process writes them to the store (rank 0)."""

    def __init__(self, store: FactorStore | None = None, write: bool = True):
        self.store, self.write = store, write
        self.digests = None if store is None else store.digests()
        self.seen = None

    def expected(self, shard):
        if self.digests is None or shard is None:
            return self.digests
        return self.digests[shard.start:shard.stop]

    def finished(self, shard, digests: np.ndarray) -> None:
        self.seen = digests
        if shard is None:
            self.recorded(digests)

    def recorded(self, digests: np.ndarray) -> None:
        if self.digests is None:
            self.digests = digests
            if self.store is not None and self.write:
                self.store.save_digests(digests)


def _store_mismatch(store: FactorStore, err: DataMismatch) -> Exception:
    """A pass's DataMismatch against data read from a factor store names the store."""
    return err if isinstance(err, StoreMismatch) else stored_data_mismatch(store.path, err)


class Passes:
    """Passes over data for one model, task and layer selection (``selection.Layer`` list)."""

    def __init__(self, model, task, layers: list, memory_budget: int, verbose: bool, replay_budget: int | None = None,
                 spill_dir=None):
        self.model, self.task, self.layers = model, task, layers
        self.memory_budget, self.verbose = memory_budget, verbose
        self.replay_budget = replay_budget  # None: ``replay.default_budget`` at each covariance pass
        self.spill_dir = spill_dir  # where kept batches beyond the replay budget go (None: not kept)
        self.replay: Replay | None = None  # the last covariance pass's captures (``replay``)
        self.held: dict = {}  # checkpoint index -> Replay of the training loss's captures for ``score``
        self.rotated: dict = {}  # checkpoint index -> Rotations: the correction's rotated gradients for ``score``
        self.plan = make_plan(model, tracked_names(layers))
        self.params = list(self.plan.params)
        self._probed = set()  # the loaders ("train", "test") whose first batch was probed

    def over(self, loader, what: str, desc: str | None, context: str, data: Recorded | None,
             shard=None) -> CheckedPass:
        """A checked pass: ``with passes.over(train, "train", desc, f"checkpoint {k}", data) as
        batches: for start, batch, size in batches: ...`` (see the module docstring). ``data``
        None: a loader passed over only once, whose examples are not compared. ``shard``: pass
        over that ``distributed.Shard`` of the loader only (``start`` counts from the shard's
        first example; its examples are compared with their slice of ``data``)."""
        store = None if data is None else data.store
        if shard is not None:
            loader, context = shard_loader(loader, shard, what), f"{context}, shard [{shard.start}, {shard.stop})"
        return CheckedPass(loader, self.task, what, expected=None if data is None else data.expected(shard),
                           compare=data is not None, context=context, device=model_device(self.model), desc=desc,
                           verbose=self.verbose,
                           on_finish=None if data is None else lambda digests: data.finished(shard, digests),
                           on_mismatch=None if store is None else lambda err: _store_mismatch(store, err))

    def check_first_batch(self, loader, data: Recorded, what: str = "train", shard=None) -> None:
        """Compare the loader's (shard's) first batch with the recorded data (a quick check at
        ``fit`` when the factors come from a store; the next full pass checks every example)."""
        if data.digests is None or (shard is not None and not len(shard)):
            return
        with self.over(loader, what, None, "fit", data, shard) as batches:
            for _ in batches:
                break

    def hash(self, loader) -> np.ndarray:
        """The digests of the loader's examples from one pass that only hashes them (no model
        call): what a merge of shards checks them against."""
        data = Recorded()
        with self.over(loader, "train", "hashing the training data", "merge", data) as batches:
            for _ in batches:
                pass
        return data.digests

    def _probe(self, batch, fn, what) -> None:
        """Run one example: a tracked module whose input then has a leading dimension other
        than 1 does not take the batch first (sequence-first [T, B, d] input, or no batch
        dimension); the shapes of a full batch cannot tell when T happens to equal B."""
        with Capture(self.plan) as cap, torch.no_grad():
            fn(self.model, one_example(batch, 0))
        self._refuse_unbatched(cap.handlers, 1)

    @staticmethod
    def _refuse_unbatched(handlers, size) -> None:
        unbatched = unbatched_modules(handlers, size)
        if unbatched:
            raise ValueError(f"modules {unbatched} are called without the batch dimension, or with another "
                             "dimension before it (sequence-first [T, B, d] inputs), so their per-example "
                             "statistics cannot be captured; leave their parameters out with params=, or feed "
                             "them batch-first inputs [B, ..., d]")

    def check_finite(self, handlers: dict, values: dict, what: str, rows: torch.Tensor | None = None) -> None:
        """Refuse non-finite statistics of a batch (``values``: {description: tensor}): an
        ``ExampleError`` naming the examples whose captured inputs or output gradients (of
        ``handlers``, {layer: handler}, possibly empty) are non-finite (or the non-finite rows of
        ``rows``, a per-example result), else a ValueError naming what overflowed."""
        # NaN / Inf propagate through sums: one reduction per tensor (isfinite is ~8x slower on
        # the CPU); a sum that only overflowed is told apart by the full check.
        if bool(torch.isfinite(torch.stack([v.sum() for v in values.values()]).sum())):
            return
        if all(bool(torch.isfinite(v).all()) for v in values.values()):
            return
        for layer in self.layers:
            for r in handlers[layer.name].records if layer.name in handlers else ():
                for kind, t in (("inputs", r.inputs), ("output gradients", r.grad_out)):
                    bad = nonfinite_rows(t)
                    if bad:
                        raise NonFiniteExamples(f"non-finite {kind} of layer {layer.name!r} on the {what} loader", bad)
        bad = [] if rows is None else nonfinite_rows(rows)
        if bad:
            raise NonFiniteExamples(f"non-finite {what} gradients", bad)
        names = [name for name, v in values.items() if not bool(torch.isfinite(v).all())]
        raise ValueError(f"{', '.join(names)} overflowed float32 on a batch of the {what} loader (the inputs and "
                         "output gradients of every layer are finite); rescale the inputs or the model")

    def record(self, batch, size, fn, what, then=()) -> dict:
        """Run ``fn(model, batch)`` under capture and backpropagate its sum; returns the handlers.

        ``then``: (use, second) pairs, in order: after each backward pass ``use(handlers)`` reads
        the captures, then the sum of ``second()`` (another [B] loss of the same forward pass) is
        backpropagated too, so the handlers end with the last one's output-gradients.

        The backward pass asks autograd for the gradients of the tracked layers' outputs, not of
        their parameters, so no weight gradient is computed (a third of a backward pass). When an
        output was modified in place afterwards its tensor no longer holds the layer's output, and
        the parameters are asked for instead (the capture's hooks see the right gradient either way).
        """
        if what not in self._probed:
            self._probed.add(what)
            self._probe(batch, fn, what)
        with Capture(self.plan, mask=token_mask(self.task, batch)) as cap, torch.enable_grad():
            try:
                out = call_task(fn, self.model, batch, size, what)
            except TypeError as err:  # call_task wraps what the task raised; keep ExampleErrors
                if isinstance(err.__cause__, ExampleError):
                    raise err.__cause__ from None
                raise
        self._refuse_unbatched(cap.handlers, size)
        bad = nonfinite_rows(out.detach())
        if bad:
            raise NonFiniteExamples(f"the {what} loss or measurement is NaN or Inf", bad)
        if not out.requires_grad:
            raise ValueError(f"the task's output on the {what} loader does not depend on any tracked parameter")
        # every hooked call's output: the layers' and the other uses of their tied weights'
        outputs = [r for h in cap.handlers.values() for r in h.records]
        intact = all(r.output.requires_grad and r.output._version == r.version for r in outputs)
        targets = [r.output for r in outputs] if intact else self.params
        release_outputs(cap.handlers)
        torch.autograd.grad(out.sum(), targets, allow_unused=True, retain_graph=bool(then))
        for layer in self.layers:
            records = cap.handlers[layer.name].records
            if not records or any(r.grad_out is None for r in records):
                raise ValueError(f"layer {layer.name!r} received no gradient from the task on the {what} "
                                 "loader; leave its parameters out of params=")
        for i, (use, second) in enumerate(then):
            use(cap.handlers)
            again = second()
            bad = nonfinite_rows(again.detach())
            if bad:
                raise NonFiniteExamples(f"the {what} loss is NaN or Inf", bad)
            torch.autograd.grad(again.sum(), targets, allow_unused=True, retain_graph=i + 1 < len(then))
        return cap.handlers

    def covariances(self, train, k: int, fisher: str, seed: int, data: Recorded, shard=None,
                    replay: bool = False, hold: bool = False) -> dict:
        """Stage "covariance" of checkpoint k over the loader (or its ``shard``): the unnormalised
        sums (``factors.covariance_factors`` normalises them), float64 on the model's device:
        ``<layer>/A`` (sum of a a^T over positions, or token counts), ``<layer>/S`` (sum of
        delta delta^T), ``<layer>/positions`` and ``examples`` (int64 [1] counts); zeros for an
        empty shard. ``replay``: keep the pass's captures for the ``correction`` that follows
        (``replay``); ``hold``: keep the captures of the training loss's gradients for ``score``
        (``held[k]``; a whole pass only). Each keeps the prefix of the batches that fits in the
        replay budget."""
        sums = {layer.name: CovarianceSums() for layer in self.layers}
        n = 0
        offset = 0 if shard is None else shard.start
        device = model_device(self.model)
        self.replay = None
        self.held.pop(k, None)
        self.rotated.pop(k, None)
        budget = Budget(default_budget(device) if self.replay_budget is None else self.replay_budget, self._spill())
        hold = hold and shard is None and (fisher == "empirical" or gives_loss(self.task))
        held = Replay(k, None, budget if hold else 0)
        keep = Replay(k, _span(shard), budget if replay else 0, yields=held)  # the correction's come first
        # With the true Fisher the correction draws other labels: kept captures hold the
        # output-gradients of a second backward pass at those labels (``task.sampled_losses``).
        two = fisher == "true" and replay and (budget.total > 0 or budget.spill is not None) and implements(self.task, "sampled_losses")
        if fisher == "true" and not two:
            keep.drop()

        def add(handlers):
            for layer in self.layers:
                handlers[layer.name].covariances(sums[layer.name], layer.bias, self.memory_budget)
            self.check_finite(handlers, {f"the factor {side} of layer {name!r}": t for name, s in sums.items()
                                         for side, t in (("A", s.A), ("S", s.S))}, "train")

        if shard is None or len(shard):
            with self.over(train, "train", f"covariances (checkpoint {k})", f"checkpoint {k}", data, shard) as batches:
                for start, batch, size in batches:
                    first = offset + start
                    correction = None  # the handlers holding the correction's output-gradients
                    if fisher == "empirical":
                        handlers = correction = self.record(batch, size, self.task.loss, "train")
                        add(handlers)
                    else:
                        stages = (0, 1) if two and keep.accepting else (0,)
                        with_loss = held.accepting
                        if len(stages) == 1 and not with_loss:
                            handlers = self.record(batch, size, fisher_loss(self.task, fisher, seed, 0, k, first),
                                                   "train")
                            add(handlers)
                        else:
                            draws = FisherDraws(self.task, seed, stages, k, first, with_loss)
                            steps = [(add, lambda: draws.rest[0])]
                            if len(stages) == 2 and with_loss:  # the correction's captures, then the loss's

                                def snap(h):
                                    nonlocal correction
                                    correction = snapshot(h)

                                steps.append((snap, lambda: draws.rest[1]))
                            handlers = self.record(batch, size, draws, "train", then=steps)
                            if len(stages) == 2 and not with_loss:
                                correction = handlers
                            if with_loss and not held.batches and not self._same_loss(draws.rest[-1], batch, size):
                                held.drop()  # keep nothing the scores could misread
                                with_loss = False
                    memo = BatchMemo()  # storages both keep (the inputs) are counted and written once
                    if correction is not None:
                        keep.add(size, correction, start, memo)
                    if fisher == "empirical" or with_loss:
                        held.add(size, handlers, start, memo)
                    n += size
        self.replay = keep
        if hold and not held.dropped:
            self.held[k] = held
        out = {"examples": torch.tensor([n], device=device)}
        for layer in self.layers:
            s, name = sums[layer.name], layer.name
            a_shape = (layer.d_in,) if layer.handler.diagonal_activation else (layer.d_in, layer.d_in)
            for key, value, shape in (("A", s.A, a_shape), ("S", s.S, (layer.d_out, layer.d_out))):
                out[f"{name}/{key}"] = (torch.zeros(shape, dtype=torch.float64, device=device) if value is None
                                        else mirror_upper(value).to(torch.float64))
            out[f"{name}/positions"] = torch.tensor([s.positions], device=device)
        return out

    def _same_loss(self, given: torch.Tensor, batch, size: int) -> bool:
        """Whether the loss the task's ``sampled_losses(..., with_loss=True)`` gave equals
        ``task.loss`` on the batch (a task that overrides ``loss`` but not ``sampled_losses``
        would otherwise have the scores read the gradients of another loss)."""
        with torch.no_grad():
            want = call_task(self.task.loss, self.model, batch, size, "train")
        return torch.allclose(given.detach(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))

    def correction(self, train, k: int, factors: dict, fisher: str, seed: int, data: Recorded, shard=None) -> dict:
        """Stage "lambda" of checkpoint k over the loader (or its ``shard``): the unnormalised
        sums ``<layer>/lam`` = sum_b (Q_S^T G_b Q_A)^2 (float64) and ``examples`` (int64 [1]);
        from the covariance pass's captures for the batches it kept (``replay``), a pass over
        the rest."""
        device = model_device(self.model)
        sums = {layer.name: torch.zeros(layer.d_out, layer.d_in, device=device) for layer in self.layers}
        n = 0
        offset = 0 if shard is None else shard.start
        desc = f"eigenvalue correction (checkpoint {k})"
        def add(handlers, size, start=None, kept=None):
            parts = {} if kept is not None and kept.accepting else None
            for layer in self.layers:
                keep = {} if parts is None else {"keep": parts.setdefault(layer.name, [])}
                handlers[layer.name].correction(sums[layer.name], factors[layer.name].bases32(), layer.bias,
                                                self.memory_budget, **keep)
            self.check_finite(handlers, {f"the eigenvalue correction of layer {name!r}": t
                                         for name, t in sums.items()}, "train")
            if parts is not None:
                kept.add(size, parts, start)
            return size

        replay, self.replay = self.replay, None
        rest = 0  # the first example the model has to run on
        if replay is not None and replay.serves(k, _span(shard)):
            kept = self._rotations(k, fisher, replay)
            n = sum(add(handlers, size, start, kept) for start, size, handlers in replay.items())
            rest = None if replay.complete else replay.end
            if kept is not None and not kept.dropped:
                self.rotated[k] = kept
                held = self.held.get(k)  # the same batches' captures: the scores read the rotations instead
                if held is not None:
                    held.trim(len(kept.batches))
                    if held.dropped:
                        del self.held[k]
        if rest is not None and (shard is None or len(shard)):
            with self.over(train, "train", desc, f"checkpoint {k}", data, shard) as batches:
                for start, batch, size in batches:
                    if start < rest:
                        if start + size > rest:
                            raise RuntimeError(f"the training loader's batches changed between the covariance and "
                                               f"correction passes of checkpoint {k} (a batch from example "
                                               f"{start} crosses {rest}); pass a loader with a fixed batching")
                        continue
                    loss = fisher_loss(self.task, fisher, seed, 1, k, offset + start)
                    n += add(self.record(batch, size, loss, "train"), size)
        del replay
        out = {f"{name}/lam": t.to(torch.float64) for name, t in sums.items()}
        out["examples"] = torch.tensor([n], device=device)
        return out

    def _rotations(self, k: int, fisher: str, replay: Replay) -> Rotations | None:
        """Where to keep the correction's rotated gradients for ``score``: with the empirical Fisher
        the replayed captures are the training loss's (``held[k]`` holds the same batches), so
        their rotations are the scores' too; kept in the bytes the captures leave of the budget."""
        if fisher != "empirical" or k not in self.held or not all(l.handler.keeps_rotated for l in self.layers):
            return None
        return Rotations(k, Budget(replay.budget.total - replay.budget.used, self._spill()))

    def _spill(self) -> SpillFile | None:
        """A new spill file in ``spill_dir`` (None without one)."""
        return None if self.spill_dir is None else SpillFile(self.spill_dir)


def snapshot(handlers: dict) -> dict:
    """Copies of the handlers whose records keep the current output-gradients (and share the
    inputs) after a later backward pass overwrites the originals' (tied uses relinked)."""
    return copied_handlers(handlers, lambda name, i, r: dataclasses.replace(r, output=None))


def _span(shard) -> tuple | None:
    return None if shard is None else (shard.start, shard.stop)
