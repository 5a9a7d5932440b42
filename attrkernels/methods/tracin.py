"""TracIn (Pruthi et al., 2020): learning-rate-weighted gradient dot products over checkpoints.

A gradient step of size eta_c on training example i at weights theta_c changes the measurement
f_j of test example j by about -eta_c grad f_j(theta_c)^T grad l_i(theta_c). Summed over the
saved checkpoints (TracIn-CP), with the orientation and sign of ``methods.base``:

    score[i, j] = - sum_c eta_c  grad l_i(theta_c)^T grad f_j(theta_c)             [n_train, n_test]

l = ``task.loss``, f = ``task.measure``, eta_c the learning rate in effect at checkpoint c
(``Checkpoint.lr``, or ``learning_rates=``; required). Gradients come from the hooks of
``attrkernels.capture``: exact dot products of the materialised per-example gradients
(``k=None``, ``capture.Gradients``), or of their sketches phi = P^T g (``k`` columns, ``Featurizer`` with ``mode``
"dense" or "factored"), with E[phi_i^T phi_j] = g_i^T g_j. Each checkpoint c uses the projection
seed ``derive_seed(seed, c)``.

Under a ``torch.distributed`` process group, each rank passes over its shard of the training set
(``distributed.rank_shard``; the test side is computed by every rank) and writes its rows of the
scores into ``score(..., out=path)``, a file every rank sees (``methods.scores.ScoreOutput``): no
collective but the file's barriers, and no rank holds more than its rows.
"""
from __future__ import annotations

import torch

from ..capture import Featurizer, Gradients, make_plan
from ..capture.featurizer import MODES
from ..distributed import check_world, process_group, rank_shard, shard_loader, together
from ..kernels.philox import derive_seed
from ..kernels.projection import check_k, check_kind
from ..utils.checks import check_number, check_seed
from .base import AttributionMethod
from .checkpoints import Checkpoint, checked_checkpoints, checkpoint_loop
from .passes import checked
from .scores import shard_scores


def learning_rates_of(checkpoints, learning_rates) -> list[float]:
    """One positive finite learning rate per checkpoint, from ``learning_rates`` or Checkpoint.lr."""
    items = list(checkpoints) if isinstance(checkpoints, (list, tuple)) else [checkpoints]
    if learning_rates is None:
        missing = [i for i, c in enumerate(items) if not isinstance(c, Checkpoint)]
        if missing or checkpoints is None:
            raise ValueError(
                "TracIn needs the learning rate of every checkpoint: pass ak.tasks.Checkpoint objects "
                "(e.g. from task.train(..., checkpoints=n)) or learning_rates=[...], one per checkpoint"
                + (f"; checkpoints {missing[:10]} carry none" if missing and checkpoints is not None else ""))
        rates = [c.lr for c in items]
    else:
        rates = [learning_rates] if isinstance(learning_rates, (int, float)) else list(learning_rates)
        count = 1 if checkpoints is None else len(items)
        if len(rates) != count:
            raise ValueError(f"learning_rates must hold one rate per checkpoint: got {len(rates)} for {count}")
    return [check_number(f"learning rate of checkpoint {i}", lr, positive=True) for i, lr in enumerate(rates)]


class TracIn(AttributionMethod):
    """TracIn-CP over checkpoints with their learning rates.

    TracIn(model, task, *, k=None, seed=0, kind="rademacher", mode="dense", params=None, verbose=True)

    k: None for exact gradient dot products, else the sketch dimension of the featurizer (kind,
    mode: its projection); params: names of the tracked parameters (default all trainable).
    ``fit(train, checkpoints, learning_rates=None)``; ``score(test)`` -> [n_train, n_test].
    """

    def __init__(self, model, task, *, k=None, seed: int = 0, kind: str = "rademacher", mode: str = "dense",
                 params=None, verbose: bool = True):
        super().__init__(model, task, verbose=verbose)
        self.plan = make_plan(model, params)
        if k is not None:  # the sketch's arguments, checked now rather than in score
            check_k(k), check_kind(kind), check_seed(seed)
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.k, self.seed, self.kind, self.mode = k, seed, kind, mode
        self.checkpoints = self.learning_rates = self.train = self.shard = None

    def fit(self, train, checkpoints=None, learning_rates=None):
        """Record the train loader (checked: ``methods.passes.DataPasses``), the checkpoints
        (snapshotted, checked against the model) and their learning rates (required)."""
        rates = learning_rates_of(checkpoints, learning_rates)
        self.checkpoints = checked_checkpoints(self.model, checkpoints)
        self.learning_rates, self.train = rates, train
        self.shard, self._world = rank_shard(train), process_group().size
        self._train_passes = self._passes(train if self.shard is None else shard_loader(train, self.shard), "train")
        return self

    def _compute(self, fn, name: str, index: int):
        """Gradients (k=None) or the featurizer of checkpoint ``index`` for task function ``fn``,
        whose non-finite values raise ExampleError."""
        fn = checked(fn, name)
        if self.k is None:
            return Gradients(self.model, fn, params=self.plan.names)
        return Featurizer(self.model, fn, self.k, seed=derive_seed(self.seed, index),
                          kind=self.kind, mode=self.mode, params=self.plan.names)

    def _features(self, passes, fn, name: str, index: int) -> list:
        """Per-example gradients [B, p] (k=None) or sketches [B, k] of ``fn``, batch by batch,
        over one checked pass (non-finite values name the example and the checkpoint)."""
        compute = self._compute(fn, name, index)
        with passes.over(f"checkpoint {index}") as batches:
            return [compute(batch) for _, batch, _ in batches]

    def score(self, test, *, out=None) -> torch.Tensor:
        """Scores [n_train, n_test] (float32); positive = including the training example raises f.

        ``out``: None (a new tensor), a path (a float32 .npy file) or an array to fill
        (``methods.scores.ScoreOutput``); under a process group a path every rank sees (see the
        module docstring)."""
        if self.checkpoints is None:
            raise RuntimeError("call TracIn.fit(train, checkpoints, learning_rates) before score()")
        check_world(self._world, "TracIn")
        scores = None
        test_passes = self._passes(test, "test")
        with checkpoint_loop(self.model, self.checkpoints, desc="TracIn", verbose=self.verbose) as loop:
            for index, _ in loop:
                test_side = torch.cat(self._features(test_passes, self.task.measure, "measure", index))
                test_side = test_side.T.contiguous() * -self.learning_rates[index]
                rows = self._train_rows(test_side, index)
                part = torch.cat(rows) if rows else torch.zeros(0, test_side.shape[1], dtype=torch.float64)
                scores = part if scores is None else scores + part
        scores = scores.to(torch.float32)
        return shard_scores(scores, out, self.shard)

    def _train_rows(self, test_side, index: int) -> list:
        """-eta grad l_i^T grad f over one checked pass of the train loader (this rank's shard),
        [B, n_test] float64 rows."""
        rows = []
        with together(f"the TracIn pass of checkpoint {index}", self.shard):
            if self.shard is None or len(self.shard):
                compute = self._compute(self.task.loss, "loss", index)
                context = f"checkpoint {index}" + ("" if self.shard is None else
                                                   f", shard [{self.shard.start}, {self.shard.stop})")
                with self._train_passes.over(context) as batches:
                    rows = [(compute(batch) @ test_side).to(torch.float64).cpu() for _, batch, _ in batches]
        return rows


__all__ = ["TracIn", "learning_rates_of"]
