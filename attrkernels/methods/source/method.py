"""The SOURCE class: arguments, fit (segments of checkpoints), score and self-influence."""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn as nn

from ...kernels.kfac import DEFAULT_MEMORY
from ...utils.checks import check_damping, check_eigh_dtype, check_memory_budget, check_positive_int, check_seed
from ...utils.loaders import check_loader
from ..base import AttributionMethod
from ..checkpoints import (Checkpoint, checked_checkpoints, fingerprint, load_checkpoint, preserved_weights,
                           read_checkpoint)
from ..ekfac import precondition
from ..ekfac.method import probe
from ..ekfac.passes import Passes, Recorded, check_fisher
from ..ekfac.selection import select_layers
from ..ekfac.storage import FactorStore, dataset_len, store_meta
from ..scores import ScoreOutput
from .functions import check_momentum, lr_sums_of, segment_groups, segment_times
from .queries import backwards, final_queries, rotated_parts, spectra
from .segments import fit_segment



class SOURCE(AttributionMethod):
    """SOURCE: approximate unrolled differentiation over segments of training; see the
    ``attrkernels.methods.source`` docstring.

    SOURCE(model, task, *, segments=3, momentum=0.0, weight_decay=0.0, fisher="true", params=None,
           block_width=None, store=None, seed=0, memory_budget=24 MiB, eigh_dtype=torch.float64, verbose=True)

    segments: L, the number of segments (consecutive equal groups of the fitted checkpoints).
    momentum: the heavy-ball coefficient beta of the SGD run (segment times s_l / (1 - beta)).
    weight_decay: the coupled L2 coefficient of the optimiser (added to every eigenvalue).
    fisher, params, block_width, seed, memory_budget, eigh_dtype: as for ``ak.EKFAC``.
    store: directory for the per-checkpoint and per-segment factors (None: in memory only).
    """

    strategy = "source"

    def __init__(self, model: nn.Module, task, *, segments: int = 3, momentum: float = 0.0,
                 weight_decay: float = 0.0, fisher: str = "true", params=None, block_width: int | None = None,
                 store=None, seed: int = 0, memory_budget: int = DEFAULT_MEMORY,
                 eigh_dtype: torch.dtype = torch.float64, verbose: bool = True):
        super().__init__(model, task, verbose=verbose)
        self.segments = check_positive_int("segments", segments)
        self.momentum = check_momentum(momentum)
        self.weight_decay = check_damping(weight_decay, name="weight_decay")
        check_fisher(task, fisher)
        self.fisher, self.block_width = fisher, check_positive_int("block_width", block_width, optional=True)
        self.eigh_dtype = check_eigh_dtype(eigh_dtype)
        self.seed, self.memory_budget, self.store_path = check_seed(seed), check_memory_budget(memory_budget), store
        self.layers, self.skipped = select_layers(model, params)
        self._leave_out, self._probed = params is None, False  # the first batch settles the layers (``probe``)
        self.passes = Passes(model, task, self.layers, self.memory_budget, verbose)
        self.plan = self.passes.plan
        self.fitted: list = []  # the checkpoints (snapshotted), in training order
        self.fingerprints: list = []
        self.lr_sums: list = []  # per checkpoint, as given to fit
        self.fitted_segments: list = []  # segments.Segment, in training order
        self.train = None
        self.data = Recorded()
        self.query_modes: list = []  # per segment and layer, where the last score() scored its queries

    def fit(self, train, checkpoints, lr_sums=None) -> "SOURCE":
        """Fit every segment's factors on the training loader (loaded from the store where there).

        ``checkpoints``: C >= segments state dicts, paths or ``ak.tasks.Checkpoint`` objects of one
        training run, in training order, the last one the final model; split into ``segments``
        consecutive groups of C / segments (C must be divisible). ``lr_sums[c]``: the sum of the
        learning rates of the optimiser steps between checkpoint c - 1 and c (c = 0: since
        initialisation); None takes ``Checkpoint.lr_sum``. The sums refer to the checkpoints
        passed: when passing only some of a run's checkpoints, add up the sums of the ones left
        out since the previous one passed (``Checkpoint.lr_sum`` counts from the previous checkpoint
        saved, so e.g. the final checkpoint alone needs ``lr_sums=[sum of all]``).
        """
        check_loader(train, "train")
        if checkpoints is None or isinstance(checkpoints, (Mapping, str, Path, Checkpoint)) \
                or not hasattr(checkpoints, "__len__"):
            raise ValueError("checkpoints must be a list of C >= segments checkpoints of one training run "
                             "(state dicts, paths or ak.tasks.Checkpoint objects), the last one the final model")
        checkpoints = list(checkpoints)
        groups = segment_groups(len(checkpoints), self.segments)
        sums = lr_sums_of(checkpoints, lr_sums)
        try:
            snapshots = checked_checkpoints(self.model, checkpoints)
        except ValueError as err:
            raise ValueError(f"checkpoints: {err}") from None
        times = segment_times(sums, groups, self.momentum)
        probe(self, train)
        store = None if self.store_path is None else FactorStore(self.store_path, store_meta(self))
        data = Recorded(store)
        self.passes.check_first_batch(train, data)
        fps = [fingerprint(c) for c in snapshots]
        self.fitted_segments = [fit_segment(self, train, snapshots, fps, g, t, store, data)
                                for g, t in zip(groups, times)]
        self.fitted, self.fingerprints, self.lr_sums = snapshots, fps, sums
        self.train, self.data = train, data
        return self

    def score(self, test, *, train=None, out=None) -> torch.Tensor:
        """scores [n_train, n_test] (float32); ``train`` and ``out`` as for ``EKFAC.score``.

        One pass over ``test`` (at the final checkpoint) and one over ``train`` per checkpoint."""
        train = self._train_loader(train)
        segments = self._ready()
        check_loader(train, "train")
        n_train_hint = dataset_len(train)
        last = len(self.fitted) - 1
        values = spectra(segments, self.weight_decay)
        rows, first = 0, True
        with ExitStack() as stack:
            stack.enter_context(preserved_weights(self.model))
            self._load(last)
            R, n_test, back = final_queries(self.passes, test, segments, n_train_hint, last)
            self.query_modes = [{name: "parameters" if b else "eigenbasis" for name, b in seg.items()} for seg in back]
            dest = stack.enter_context(ScoreOutput(out, n_test, n_train=None if out is None else n_train_hint))
            for l, W in backwards(self.layers, segments, values, R, back):
                seg = segments[l]
                for c in seg.checkpoints:
                    self._load(c)
                    with self.passes.over(train, "train", f"scores (checkpoint {c})", f"checkpoint {c}",
                                          self.data) as batches:
                        for start, batch, size in batches:
                            handlers = self.passes.record(batch, size, self.task.loss, "train")
                            tile = precondition.tile(self.passes, handlers, seg.factors, W, size, n_test)
                            dest.write(start, tile.mul_(-1.0 / len(seg.checkpoints)), first=first)
                            rows = start + size
                    first = False
            return dest.finish(rows=rows)

    def self_influence(self, train=None) -> torch.Tensor:
        """[n_train]: scores[i, i] with test example i = training example i and measurement -loss_i,
        i.e. sum_l mean_{c in l} <F_seg,l(F_back ... g_i(theta_C)), g_i(theta_c)>: how much including
        example i lowers its own final loss (large: unusual, e.g. mislabeled).

        One pass over ``train``; each batch's gradients are taken at every checkpoint (the
        checkpoints' weights are held in memory and loaded batch by batch)."""
        train = self._train_loader(train)
        segments = self._ready()
        check_loader(train, "train")
        values = spectra(segments, self.weight_decay)
        states = [read_checkpoint(c, k) for k, c in enumerate(self.fitted)]
        last = len(states) - 1
        bases = {layer.name: segments[-1].factors[layer.name].bases32() for layer in self.layers}
        parts = []
        with preserved_weights(self.model), self.passes.over(train, "train", "self-influence", "checkpoints",
                                                              self.data) as batches:
            for _, batch, size in batches:
                self._load(last, states[last])
                handlers = self.passes.record(batch, size, self.task.loss, "train")
                rotated = rotated_parts(self.passes, handlers, bases)
                R = {layer.name: layer.handler.query(rotated[layer.name], size, False) for layer in self.layers}
                total = torch.zeros(size)
                for l, W in backwards(self.layers, segments, values, R):
                    seg = segments[l]
                    for c in seg.checkpoints:
                        self._load(c, states[c])
                        handlers = self.passes.record(batch, size, self.task.loss, "train")
                        for layer in self.layers:
                            inner = handlers[layer.name].paired_inner(W[layer.name], seg.factors[layer.name].bases32(),
                                                                      layer.bias, self.memory_budget)
                            total += inner.cpu() / len(seg.checkpoints)
                self.passes.check_finite(handlers, {"the self-influence": total}, "train", rows=total)
                parts.append(total)
        return torch.cat(parts)

    # -----------------------------------------------------------------------------------------

    def _load(self, k: int, state=None) -> None:
        if state is None:
            load_checkpoint(self.model, self.fitted[k], k)
        else:
            self.model.load_state_dict(state)
        self.model.eval()

    def _device(self):
        return next(self.model.parameters()).device

    def _train_loader(self, train):
        if train is not None:
            return train
        if self.train is None:
            raise RuntimeError("pass train= (the training loader) or call SOURCE.fit(train, checkpoints, lr_sums) "
                               "first")
        return self.train

    def _ready(self) -> list:
        if not self.fitted_segments:
            raise RuntimeError("call SOURCE.fit(train, checkpoints, lr_sums) before scoring (with store=, a fit "
                               "with the same checkpoints loads the stored factors instead of recomputing them)")
        return self.fitted_segments
