"""TracIn (Pruthi et al., 2020): learning-rate-weighted gradient dot products over checkpoints.

A gradient step of size eta_c on training example i at weights theta_c changes the measurement
f_j of test example j by about -eta_c grad f_j(theta_c)^T grad l_i(theta_c). Summed over the
saved checkpoints (TracIn-CP), with the orientation and sign of ``methods.base``:

    score[i, j] = - sum_c eta_c  grad l_i(theta_c)^T grad f_j(theta_c)             [n_train, n_test]

l = ``task.loss``, f = ``task.measure``, eta_c the learning rate in effect at checkpoint c
(``ak.tasks.Checkpoint.lr``, or ``learning_rates=``; required). Gradients come from the hooks of
``attrkernels.capture``: exact dot products of the materialised per-example gradients
(``k=None``), or of their sketches phi = P^T g (``k`` columns, ``Featurizer`` with ``mode``
"dense" or "factored"), with E[phi_i^T phi_j] = g_i^T g_j. Each checkpoint c uses the projection
seed ``derive_seed(seed, c)``.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..capture import Featurizer, make_plan
from ..kernels.philox import derive_seed
from ..tasks.training import Checkpoint
from .base import AttributionMethod, as_checkpoints, iterate, load_checkpoint, preserved_weights


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
    for i, lr in enumerate(rates):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"learning rate of checkpoint {i} must be a finite number > 0, got {lr!r}")
    return [float(lr) for lr in rates]


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
        if k is not None:
            Featurizer(model, task.loss, k, seed=seed, kind=kind, mode=mode, params=self.plan.names)
        self.k, self.seed, self.kind, self.mode = k, seed, kind, mode
        self.checkpoints = self.learning_rates = self.train = None

    def fit(self, train, checkpoints=None, learning_rates=None):
        """Record the train loader, the checkpoints and their learning rates (required)."""
        rates = learning_rates_of(checkpoints, learning_rates)
        self.checkpoints = as_checkpoints(self.model, checkpoints)
        self.learning_rates, self.train = rates, train
        with preserved_weights(self.model):
            for index, ckpt in enumerate(self.checkpoints):
                load_checkpoint(self.model, ckpt, index)
        return self

    def _features(self, loader, fn, what: str, index: int):
        """Yield per-example gradients [B, p] (k=None) or sketches [B, k] of ``fn``, batch by batch."""
        if self.k is None:
            featurizer = Featurizer(self.model, fn, 1, params=self.plan.names)
            compute = featurizer.gradients
        else:
            featurizer = Featurizer(self.model, fn, self.k, seed=derive_seed(self.seed, index),
                                    kind=self.kind, mode=self.mode, params=self.plan.names)
            compute = featurizer
        for _, batch, _ in iterate(loader, self.task, what):
            yield compute(batch)

    def score(self, test) -> torch.Tensor:
        """Scores [n_train, n_test] (float32); positive = including the training example raises f."""
        if self.checkpoints is None:
            raise RuntimeError("call TracIn.fit(train, checkpoints, learning_rates) before score()")
        scores = None
        with preserved_weights(self.model):
            for index, ckpt in enumerate(tqdm(self.checkpoints, desc="TracIn", unit="checkpoint",
                                              disable=not self.verbose)):
                load_checkpoint(self.model, ckpt, index)
                test_side = torch.cat(list(self._features(test, self.task.measure, "test", index)))
                test_side = test_side.T.contiguous() * -self.learning_rates[index]
                rows = [(f @ test_side).to(torch.float64).cpu()
                        for f in self._features(self.train, self.task.loss, "train", index)]
                part = torch.cat(rows)
                scores = part if scores is None else scores + part
        return scores.to(torch.float32)


__all__ = ["TracIn", "learning_rates_of"]
