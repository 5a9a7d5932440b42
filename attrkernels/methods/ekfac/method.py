"""The EKFAC and KFAC classes: arguments, the per-checkpoint loops of fit / score /
self_influence, and which stage of the factors is computed or loaded (see the package docstring)."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...kernels.kfac import DEFAULT_MEMORY
from ...tasks.base import implements
from ...utils.checks import check_damping, check_memory_budget, check_positive_int, check_seed
from ...utils.loaders import check_loader
from ..base import AttributionMethod
from ..checkpoints import as_checkpoints, checkpoint_loop, fingerprint
from ..scores import ScoreOutput
from . import precondition
from .factors import STAGES, LayerFactors, eigen
from .passes import Passes, Recorded
from .selection import probe_layers, select_layers
from .storage import FactorStore, dataset_len, store_meta

FISHERS = ("true", "empirical")


@dataclass
class _Fitted:
    checkpoint: object  # a state_dict or a path
    fingerprint: str
    factors: dict  # layer name -> LayerFactors


class EKFAC(AttributionMethod):
    """EK-FAC influence functions; see the ``attrkernels.methods.ekfac`` docstring.

    EKFAC(model, task, *, damping=None, store=None, fisher="true", params=None, block_width=None,
          seed=0, memory_budget=24 MiB, verbose=True)

    damping: None (0.1 x mean eigenvalue per layer) or a float >= 0 added to every eigenvalue.
    store: directory for the factors (None: kept in memory only).
    fisher: "true" (sampled labels, default) or "empirical" (dataset labels).
    params: names of the parameters to attribute over (default: all supported, see ``skipped``).
    block_width: factors wider than this are eigendecomposed as block-diagonal (``kron_eigh``).
    seed: seeds the sampled labels of the true Fisher.
    memory_budget: bytes of per-example tensors (unfolded inputs, gradients) held at once; the
        default 24 MiB stays under glibc's mmap threshold (see ``kernels.kfac.DEFAULT_MEMORY``).
    """

    strategy = "ekfac"
    stages = STAGES

    def __init__(self, model: nn.Module, task, *, damping: float | None = None, store=None,
                 fisher: str = "true", params=None, block_width: int | None = None, seed: int = 0,
                 memory_budget: int = DEFAULT_MEMORY, verbose: bool = True):
        super().__init__(model, task, verbose=verbose)
        damping = check_damping(damping, optional=True)
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if fisher == "true" and not implements(task, "sampled_loss"):
            raise TypeError("fisher='true' samples labels from the model: the task must define "
                            "sampled_loss(model, batch, generator) -> [B] (ak.tasks.Classification does); "
                            "or pass fisher='empirical'")
        check_positive_int("block_width", block_width, optional=True)
        self.damping, self.fisher, self.block_width = damping, fisher, block_width
        self.seed, self.memory_budget, self.store_path = check_seed(seed), check_memory_budget(memory_budget), store
        self.layers, self.skipped = select_layers(model, params)
        self.passes = Passes(model, task, self.layers, self.memory_budget, verbose)
        self.plan = self.passes.plan
        self._leave_out = params is None  # the first batch settles the layers (``_probe``)
        self._probed = False
        self.fitted: list[_Fitted] = []
        self.train = None  # the loader given to fit
        self.data = Recorded()  # the examples of the training data the factors were fitted on
        self.query_modes: dict = {}  # per layer, where the last score() preconditioned the queries

    @property
    def factors(self) -> list:
        """Per fitted checkpoint, {layer name: LayerFactors}."""
        return [f.factors for f in self.fitted]

    def fit(self, train, checkpoints=None) -> "EKFAC":
        """Fit (or load from the store) the factors of every checkpoint on the training loader.

        ``checkpoints``: state dicts, paths or ``ak.tasks.Checkpoint`` objects (None: the model's
        current weights), snapshotted now. The loader is kept as the default training set of
        ``score``; every later pass over training data must yield the same examples in the same
        order (checked example by example).
        """
        check_loader(train, "train")
        checkpoints = as_checkpoints(self.model, checkpoints)
        self._probe(train)
        store = self._open_store()
        data = Recorded(store)
        # Factors loaded from the store: a quick look at the first batch now, every example at
        # the next pass over the training data (score or self_influence) rather than an extra pass.
        self.passes.check_first_batch(train, data)
        fitted = []
        with checkpoint_loop(self.model, checkpoints) as loop:
            for k, ckpt in loop:
                fp = fingerprint(ckpt)
                fitted.append(_Fitted(ckpt, fp, self._factors_of(train, k, fp, store, data)))
        self.fitted, self.train, self.data = fitted, train, data
        return self

    def score(self, test, *, train=None, out=None) -> torch.Tensor:
        """scores [n_train, n_test] (float32), averaged over the fitted checkpoints.

        ``train``: the training loader (default: the one given to ``fit``; needed when the
        factors come from the store without a ``fit``); it must yield the examples the factors
        were fitted on, in the same order. ``out``: as for every method
        (``methods.scores.ScoreOutput``): None (a new tensor), a path (a float32 .npy memory
        map) or an existing [n_train, n_test] tensor or array, filled tile by tile.
        """
        train = self._train_loader(train)
        fitted = self._ready(train)
        check_loader(train, "train")
        if len(fitted) > 1:  # the queries are recomputed at every checkpoint
            check_loader(test, "test")
        n_train_hint = dataset_len(train)
        test_data, rows = (Recorded() if len(fitted) > 1 else None), 0  # one checkpoint: one pass over test
        with ExitStack() as stack:
            loop = stack.enter_context(checkpoint_loop(self.model, [f.checkpoint for f in fitted]))
            dest = None
            for k, _ in loop:
                factors = fitted[k].factors
                inverse = self._inverses(factors)
                queries, n_test = precondition.queries(self.passes, test, factors, inverse, n_train_hint, k, test_data)
                self.query_modes = {name: "eigenbasis" if q.rotated else "parameters" for name, q in queries.items()}
                if dest is None:
                    dest = stack.enter_context(ScoreOutput(out, n_test, n_train=None if out is None else n_train_hint))
                with self.passes.over(train, "train", f"scores (checkpoint {k})", f"checkpoint {k}",
                                      self.data) as batches:
                    for start, batch, size in batches:
                        handlers = self.passes.record(batch, size, self.task.loss, "train")
                        tile = precondition.tile(self.passes, handlers, factors, queries, size, n_test)
                        tile.div_(-len(fitted))
                        dest.write(start, tile, first=k == 0)
                        rows = start + size
            return dest.finish(rows=rows)

    def self_influence(self, train=None) -> torch.Tensor:
        """[n_train] g_i^T (F + damping)^{-1} g_i with g_i = grad loss_i, averaged over checkpoints.

        In the sign convention of ``score`` with measurement -loss_i: how much including example i
        lowers its own loss. Large values flag examples the rest of the data does not explain,
        e.g. mislabeled ones. ``train`` defaults to the loader given to ``fit``.
        """
        train = self._train_loader(train)
        fitted = self._ready(train)
        check_loader(train, "train")
        total = None
        with checkpoint_loop(self.model, [f.checkpoint for f in fitted]) as loop:
            for k, _ in loop:
                factors = fitted[k].factors
                inverse = self._inverses(factors)
                parts = []
                with self.passes.over(train, "train", f"self-influence (checkpoint {k})", f"checkpoint {k}",
                                      self.data) as batches:
                    for _, batch, size in batches:
                        handlers = self.passes.record(batch, size, self.task.loss, "train")
                        parts.append(precondition.self_inner(self.passes, handlers, factors, inverse, size))
                values = torch.cat(parts) / len(fitted)
                total = values if total is None else total + values
        return total

    # -----------------------------------------------------------------------------------------

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
        """Once, on the first training batch (``selection.probe_layers``): params=None leaves out
        the layers called without the batch dimension (into ``skipped``); a weight also used
        where no hook sees it raises."""
        if self._probed:
            return
        layers, self.skipped = probe_layers(self.model, self.layers, self.skipped, self.task, train,
                                            leave_out=self._leave_out)
        self._probed = True
        if len(layers) != len(self.layers):
            if not layers:
                raise ValueError("every layer EK-FAC/K-FAC can factor is called without the batch dimension; "
                                 "feed the model batch-first inputs [B, ..., d]")
            self.layers = layers
            self.passes = Passes(self.model, self.task, layers, self.memory_budget, self.passes.verbose)
            self.plan = self.passes.plan

    def _open_store(self) -> FactorStore | None:
        if self.store_path is None:
            return None
        return FactorStore(self.store_path, store_meta(self))

    def _device(self):
        return next(self.model.parameters()).device

    def _factors_of(self, train, k: int, fp: str, store: FactorStore | None, data: Recorded) -> dict:
        """The factors of checkpoint k (loaded): each stage loaded from the store when there,
        else computed (and saved)."""
        if store is not None and store.exists("covariance", fp):
            store.check_data(fp, data.digests)
        if store is not None and store.has(self.stages, fp):
            return store.load(self.stages, fp, self.layers, self._device())
        factors = None
        if store is not None and store.exists("covariance", fp):
            factors = store.load(("covariance",), fp, self.layers, self._device())
        if factors is None:
            factors, n = self.passes.covariances(train, k, self.fisher, self.seed, data)
            if store is not None:
                store.save("covariance", fp, factors, n, data.digests)
        if store is not None and store.exists("eigen", fp):
            store.load(("eigen",), fp, self.layers, self._device(), factors)
        else:
            eigen(self.layers, factors, self.block_width)
            if store is not None:
                store.save("eigen", fp, factors)
        if "lambda" in self.stages:
            self.passes.correction(train, k, factors, self.fisher, self.seed, data)
            if store is not None:
                store.save("lambda", fp, factors)
        return factors

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


class KFAC(EKFAC):
    """K-FAC influence functions: EKFAC without the eigenvalue correction (eigenvalues e_S e_A^T).

    Same arguments and methods as ``EKFAC``; ``fit`` makes one pass over the training data.
    """

    strategy = "kfac"
    stages = STAGES[:2]

    def _eigenvalues(self, f: LayerFactors) -> torch.Tensor:
        return torch.outer(f.eig_s.clamp_min(0), f.eig_a.clamp_min(0))
