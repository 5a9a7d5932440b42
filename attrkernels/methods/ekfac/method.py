"""The EKFAC and KFAC classes: arguments, the per-checkpoint loops of fit / score /
self_influence, and which stage of the factors is computed or loaded (see the package docstring)."""
from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...distributed import all_reduce_sum, together
from ...kernels.kfac import DEFAULT_MEMORY
from ...utils.checks import check_damping, check_eigh_dtype, check_memory_budget, check_positive_int, check_seed
from ...utils.loaders import check_loader
from ..base import AttributionMethod
from ..checkpoints import as_checkpoints, checkpoint_loop, fingerprint
from ..scores import ScoreOutput
from . import precondition
from .factors import STAGES, LayerFactors
from .fitting import factors_of
from .passes import Passes, Recorded, check_fisher
from .replay import available_memory, return_freed_memory
from .selection import probe_layers, select_layers
from .sharding import split_of
from .storage import FactorStore, dataset_len, store_meta



@dataclass
class _Fitted:
    checkpoint: object  # a state_dict or a path
    fingerprint: str
    factors: dict  # layer name -> LayerFactors


class EKFAC(AttributionMethod):
    """EK-FAC influence functions; see the ``attrkernels.methods.ekfac`` docstring.

    EKFAC(model, task, *, damping=None, store=None, fisher="true", params=None, block_width=None,
          seed=0, memory_budget=24 MiB, replay_budget=None, spill_dir=None, eigh_dtype=torch.float64,
          verbose=True)

    damping: None (0.1 x mean eigenvalue per layer) or a float >= 0 added to every eigenvalue.
    store: directory for the factors (None: kept in memory only).
    fisher: "true" (sampled labels, default) or "empirical" (dataset labels).
    params: names of the parameters to attribute over (default: all supported, see ``skipped``).
    block_width: factors wider than this are eigendecomposed as block-diagonal (``kron_eigh``).
    eigh_dtype: precision of the eigendecompositions, torch.float64 (default) or torch.float32
        (2-2.5x faster on wide factors, backward stable to the factors' own float32 rounding;
        see ``kernels.kfac.kron_eigh``). Stored factors record it.
    seed: seeds the sampled labels of the true Fisher.
    memory_budget: bytes of per-example tensors (unfolded inputs, gradients) held at once; the
        default 24 MiB stays under glibc's mmap threshold (see ``kernels.kfac.DEFAULT_MEMORY``).
    replay_budget: bytes of the covariance pass's captured inputs and output-gradients kept for
        the eigenvalue correction, which then runs no model on the batches kept (``replay``; the
        batches are kept in order while they fit), and, without a store, of the training loss's
        output-gradients kept for ``score`` / ``self_influence`` (held until the next ``fit`` or
        until the method is deleted); None: a quarter of the memory available at each covariance
        pass; 0: none kept in memory. The factors and scores do not depend on it.
    spill_dir: a directory where the batches kept beyond ``replay_budget`` are written instead
        of being recomputed by the model (``spill``: an unlinked file, freed when the fit's
        kept batches are released or the process ends; up to 5% of the disk, at least 1 GiB, is
        left free). None (default): not kept. The captures of a GPT-2-small sequence (128
        positions) are 75 MB; writing and reading them back costs far less than the forward +
        backward pass that recomputes them (``benchmarks/lm.py``). Use a local disk, not a
        RAM-backed tmpfs.
    """

    strategy = "ekfac"
    stages = STAGES

    def __init__(self, model: nn.Module, task, *, damping: float | None = None, store=None,
                 fisher: str = "true", params=None, block_width: int | None = None, seed: int = 0,
                 memory_budget: int = DEFAULT_MEMORY, replay_budget: int | None = None, spill_dir=None,
                 eigh_dtype: torch.dtype = torch.float64, verbose: bool = True):
        super().__init__(model, task, verbose=verbose)
        damping = check_damping(damping, optional=True)
        if replay_budget is not None and (isinstance(replay_budget, bool) or not isinstance(replay_budget, int)
                                          or replay_budget < 0):
            raise ValueError(f"replay_budget must be None or an int >= 0 (bytes), got {replay_budget!r}")
        check_fisher(task, fisher)
        check_positive_int("block_width", block_width, optional=True)
        self.damping, self.fisher, self.block_width = damping, fisher, block_width
        self.eigh_dtype = check_eigh_dtype(eigh_dtype)
        self.seed, self.memory_budget, self.store_path = check_seed(seed), check_memory_budget(memory_budget), store
        self.layers, self.skipped = select_layers(model, params)
        if spill_dir is not None and not os.path.isdir(spill_dir):
            raise ValueError(f"spill_dir must be an existing directory, got {spill_dir!r}")
        self.passes = Passes(model, task, self.layers, self.memory_budget, verbose, replay_budget, spill_dir)
        self.plan = self.passes.plan
        self._leave_out = params is None  # the first batch settles the layers (``_probe``)
        self._probed = False
        self.fitted: list[_Fitted] = []
        self.train = None  # the loader given to fit
        self.data = Recorded()  # the examples of the training data the factors were fitted on
        self.complete = False  # whether fit() produced the factors of every checkpoint (see fit's shard)
        self.query_modes: dict = {}  # per layer, where the last score() preconditioned the queries

    @property
    def factors(self) -> list:
        """Per fitted checkpoint, {layer name: LayerFactors}."""
        return [f.factors for f in self.fitted]

    def fit(self, train, checkpoints=None, *, shard=None) -> "EKFAC":
        """Fit (or load from the store) the factors of every checkpoint on the training loader.

        ``checkpoints``: state dicts, paths or ``ak.tasks.Checkpoint`` objects (None: the model's
        current weights), snapshotted now. The loader is kept as the default training set of
        ``score``; every later pass over training data must yield the same examples in the same
        order (checked example by example).

        ``shard``: None (the whole loader; under a process group, this rank's shard, with the
        sums all-reduced), or ``(index, count)`` / a ``distributed.Shard``: pass over that shard
        only and write its partial sums to the store (see ``sharding``); ``complete`` then says
        whether every stage could be merged (True once every shard's sums are on file).
        """
        check_loader(train, "train")
        split = split_of(train, shard, self.fisher)
        if split.offline and self.store_path is None:
            raise ValueError("fit(train, shard=...) writes the shard's partial sums to the store: pass store= (a "
                             "directory every shard's process sees)")
        checkpoints = as_checkpoints(self.model, checkpoints)
        self._probe(train)
        store = self._open_store()
        data = Recorded(store, write=split.writer)
        # Factors loaded from the store: a quick look at the first batch now, every example at
        # the next pass over the training data (score or self_influence) rather than an extra pass.
        with together("the check of the training data's first batch", split.shard, split.group):
            self.passes.check_first_batch(train, data, shard=split.shard)
        fitted = []
        self.passes.held, self.passes.rotated = {}, {}  # what an earlier fit kept for its scores
        try:
            with checkpoint_loop(self.model, checkpoints) as loop:
                for k, ckpt in loop:
                    fp = fingerprint(ckpt)
                    factors = factors_of(self, train, k, fp, store, data, split)
                    if factors is not None:
                        fitted.append(_Fitted(ckpt, fp, factors))
        finally:
            self.passes.replay = None  # captures a shard's pass kept for a correction it did not run
        self.complete = len(fitted) == len(checkpoints)
        self.fitted, self.train, self.data = (fitted if self.complete else []), train, data
        return self

    def score(self, test, *, train=None, out=None) -> torch.Tensor:
        """scores [n_train, n_test] (float32), averaged over the fitted checkpoints.

        ``train``: the training loader (default: the one given to ``fit``; needed when the
        factors come from the store without a ``fit``); it must yield the examples the factors
        were fitted on, in the same order. ``out``: as for every method
        (``methods.scores.ScoreOutput``): None (a new tensor), a path (a float32 .npy memory
        map) or an existing [n_train, n_test] tensor or array, filled tile by tile. Under a
        process group each rank scores its shard of the training set into ``out``, which must
        be a path every rank sees (``methods.scores.ScoreOutput``); the world size need not be
        the one of ``fit``.
        """
        train = self._train_loader(train)
        fitted = self._ready(train)
        check_loader(train, "train")
        if len(fitted) > 1:  # the queries are recomputed at every checkpoint
            check_loader(test, "test")
        split = split_of(train, None, self.fisher)
        n_train_hint = dataset_len(train)
        test_data, rows = (Recorded() if len(fitted) > 1 else None), 0  # one checkpoint: one pass over test
        with ExitStack() as stack:
            loop = stack.enter_context(checkpoint_loop(self.model, [f.checkpoint for f in fitted]))
            dest = None
            for k, _ in loop:
                factors = fitted[k].factors
                inverse = self._inverses(factors)
                self._room_for_queries(k, dataset_len(test))
                rotated = self._rotated(k, split)
                queries, n_test = precondition.queries(self.passes, test, factors, inverse, n_train_hint, k, test_data,
                                                       eigenbasis=rotated is not None)
                self.query_modes = {name: "eigenbasis" if q.rotated else "parameters" for name, q in queries.items()}
                columns = None if rotated is None else precondition.query_columns(queries)
                if dest is None:
                    dest = stack.enter_context(ScoreOutput(out, n_test, group=split.group,
                                                           n_train=None if out is None else n_train_hint))
                offset = 0 if split.shard is None else split.shard.start
                held = self._held(k, split)
                with together(f"the score pass of checkpoint {k}", split.shard, split.group), ExitStack() as inner:
                    for start, batch, size in self._train_batches(train, f"scores (checkpoint {k})", k, split, inner):
                        parts, handlers = self._train_gradients(held, rotated, start, batch, size)
                        if parts is not None:
                            tile = precondition.rotated_tile(self.passes, parts, columns, size, n_test)
                        else:
                            tile = precondition.tile(self.passes, handlers, factors, queries, size, n_test)
                        tile.div_(-len(fitted))
                        dest.write(offset + start, tile, first=k == 0)
                        rows = start + size
            return dest.finish(rows=rows if split.shard is None else n_train_hint)

    def self_influence(self, train=None) -> torch.Tensor:
        """[n_train] g_i^T (F + damping)^{-1} g_i with g_i = grad loss_i, averaged over checkpoints.

        In the sign convention of ``score`` with measurement -loss_i: how much including example i
        lowers its own loss. Large values flag examples the rest of the data does not explain,
        e.g. mislabeled ones. ``train`` defaults to the loader given to ``fit``. Under a process
        group each rank computes its shard's values and one ``all_reduce_sum`` of the [n_train]
        vector shares them.
        """
        train = self._train_loader(train)
        fitted = self._ready(train)
        check_loader(train, "train")
        split = split_of(train, None, self.fisher)
        total = None
        with checkpoint_loop(self.model, [f.checkpoint for f in fitted]) as loop:
            for k, _ in loop:
                factors = fitted[k].factors
                inverse = self._inverses(factors)
                parts, what = [], f"self-influence (checkpoint {k})"
                held, rotated = self._held(k, split), self._rotated(k, split)
                with together(f"the {what} pass", split.shard, split.group), ExitStack() as inner:
                    for start, batch, size in self._train_batches(train, what, k, split, inner):
                        kept, handlers = self._train_gradients(held, rotated, start, batch, size)
                        if kept is not None:
                            parts.append(precondition.rotated_self_inner(self.passes, kept, inverse, size))
                        else:
                            parts.append(precondition.self_inner(self.passes, handlers, factors, inverse, size))
                values = (torch.cat(parts) if parts else torch.zeros(0)) / len(fitted)
                total = values if total is None else total + values
        if split.shard is None:
            return total
        every = torch.zeros(dataset_len(train))
        every[split.shard.start:split.shard.stop] = total
        all_reduce_sum([every], what="EK-FAC self-influence")
        return every

    # -----------------------------------------------------------------------------------------

    def _train_batches(self, train, desc: str, k: int, split, stack: ExitStack):
        """The batches of this process's part of the train loader (``split.shard``), checked."""
        if split.shard is not None and not len(split.shard):
            return []
        return stack.enter_context(self.passes.over(train, "train", desc, f"checkpoint {k}", self.data, split.shard))

    def _held(self, k: int, split):
        """The training loss's captures the covariance pass of checkpoint k kept (``replay``),
        served batch by batch while the pass's batches line up with them, or None."""
        held = self.passes.held.get(k)
        return None if held is None or split.shard is not None else _HeldBatches(held)

    def _room_for_queries(self, k: int, n_test: int | None) -> None:
        """Move what the fit of checkpoint k kept in memory for the scores (``held`` captures,
        rotated gradients) to its spill file, or release it without one, when the queries'
        preconditioned gradients, n_test x (sum of d_out d_in over the layers) floats, and a
        scoring pass's working memory (taken as three kept batches: one used, one read ahead,
        one formed) would not fit beside it in the memory available now: the scores then read it
        from disk or run the model over the training data instead of the process running out of
        memory (GPT-2-small at 200 x 24 sequences on a 24 GiB machine: 8.2 GB of queries beside
        6.2 GB of kept captures and 6.5 GB of factors was killed), and the freed pages go back
        to the OS (``replay.return_freed_memory``)."""
        return_freed_memory()  # what the fit released (e.g. its kept captures) is not available otherwise
        kept = {name: r for name, r in (("held", self.passes.held.get(k)), ("rotated", self.passes.rotated.get(k)))
                if r is not None}
        if n_test is None or not kept:
            return
        need = 4 * n_test * sum(layer.d_out * layer.d_in for layer in self.layers)
        need += 3 * max(r.largest for r in kept.values())
        if need > available_memory(self._device()):
            for name, r in kept.items():
                if not r.to_disk_all():
                    getattr(self.passes, name).pop(k, None)
            del kept
            return_freed_memory()

    def _rotated(self, k: int, split):
        """The rotated training gradients the correction of checkpoint k kept (``replay.Rotations``),
        served as ``_held`` serves captures, or None."""
        kept = self.passes.rotated.get(k)
        return None if kept is None or split.shard is not None else _HeldBatches(kept)

    def _train_gradients(self, held, rotated, start: int, batch, size: int) -> tuple:
        """A batch's training gradients: (the correction's rotated gradients ``_rotated`` kept, None),
        else (None, the handlers with the training loss's captures: kept ``_held``, or recorded)."""
        parts = rotated.get(start, size) if rotated is not None else None
        if parts is not None:
            return parts, None
        handlers = held.get(start, size) if held is not None else None
        return None, handlers if handlers is not None else self.passes.record(batch, size, self.task.loss, "train")

    def _train_loader(self, train):
        if train is not None:
            return train
        if self.train is None:
            raise RuntimeError(f"pass train= (the training loader) or call {type(self).__name__}.fit(train) first")
        return self.train

    def _eigenvalues(self, f: LayerFactors) -> torch.Tensor:
        return f.lam.to(torch.float64)

    def _inverses(self, factors: dict) -> dict:
        return precondition.inverses(self.layers, factors, self.damping, self._eigenvalues)

    def _probe(self, train) -> None:
        probe(self, train)

    def _open_store(self) -> FactorStore | None:
        if self.store_path is None:
            return None
        return FactorStore(self.store_path, store_meta(self))

    def _device(self):
        return next(self.model.parameters()).device

    def _ready(self, train) -> list:
        """The fitted checkpoints; loads the store's factors for the model's current weights if needed."""
        if self.fitted:
            return self.fitted
        if self.store_path is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(train, checkpoints) before scoring")
        self._probe(train)
        store = self._open_store()
        state = as_checkpoints(self.model, None)[0]
        fp = fingerprint(state)
        if not store.has(self.stages, fp):
            have = store.fingerprints(self.stages[-1])
            raise ValueError(f"the model's weights (fingerprint {fp}) differ from every checkpoint whose factors "
                             f"the store {store.path} holds ({have or 'none'}); call fit(train, checkpoints) "
                             "with the checkpoints to score")
        data = Recorded(store)
        store.check_data(fp, data.digests)
        self.fitted = [_Fitted(state, fp, store.load(self.stages, fp, self.layers, self._device()))]
        self.data = data
        return self.fitted


class _HeldBatches:
    """What the fit kept per batch (captures, or rotated gradients) handed out in order:
    ``get(start, size)`` gives the batch kept at that first example and size, or None (for that
    batch and every later one) once the batches stop lining up (a loader with another batch size)."""

    def __init__(self, held):
        self.keys = [(start, size) for start, (size, _) in zip(held.starts, held.batches)]
        self.items = held.items()  # read from disk one batch ahead
        self.i = 0

    def get(self, start: int, size: int):
        if self.i >= len(self.keys):
            return None
        if self.keys[self.i] != (start, size):
            self.keys = []
            self.items.close()
            return None
        self.i += 1
        return next(self.items)[2]


def probe(method, train) -> None:
    """Once per method, on the first training batch (``selection.probe_layers``): params=None
    leaves out the layers called without the batch dimension (into ``method.skipped``); a weight
    also used where no hook sees it raises. Shared by EKFAC / KFAC and SOURCE."""
    if method._probed:
        return
    layers, method.skipped = probe_layers(method.model, method.layers, method.skipped, method.task, train,
                                          leave_out=method._leave_out)
    method._probed = True
    if len(layers) != len(method.layers):
        if not layers:
            raise ValueError("every layer EK-FAC/K-FAC can factor is called without the batch dimension; "
                             "feed the model batch-first inputs [B, ..., d]")
        method.layers = layers
        method.passes = Passes(method.model, method.task, layers, method.memory_budget, method.passes.verbose,
                               method.passes.replay_budget, method.passes.spill_dir)
        method.plan = method.passes.plan


class KFAC(EKFAC):
    """K-FAC influence functions: EKFAC without the eigenvalue correction (eigenvalues e_S e_A^T).

    Same arguments and methods as ``EKFAC``; ``fit`` makes one pass over the training data.
    """

    strategy = "kfac"
    stages = STAGES[:2]

    def _eigenvalues(self, f: LayerFactors) -> torch.Tensor:
        return torch.outer(f.eig_s.clamp_min(0), f.eig_a.clamp_min(0))
