"""Attribution methods: each a small class over kernels + capture + store.

Gradient-based, built from ``(model, task)`` with ``fit(train, checkpoints)`` and
``score(test) -> [n_train, n_test]`` (``methods.base`` describes the interface):

- ``TRAK``: sketched gradients and a per-checkpoint kernel, resumable store (``methods.trak``);
- ``TracIn``: learning-rate-weighted gradient dot products over checkpoints (``methods.tracin``);
- ``InfluenceExplicit``, ``InfluenceCG``, ``InfluenceLiSSA``: influence functions with the exact,
  conjugate-gradient or LiSSA inverse of the damped Hessian / Gauss-Newton matrix
  (``methods.influence``);
- ``EKFAC``, ``KFAC``: influence functions with a Kronecker-factored (eigenvalue-corrected)
  curvature, resumable store (``methods.ekfac``);
- ``SOURCE``: approximate unrolled differentiation over segments of training checkpoints, on
  EK-FAC's factors, ``fit(train, checkpoints, lr_sums)`` (``methods.source``).

``Datamodels`` (``methods.datamodels``) instead regresses the outputs of retrained models on their
training subsets: ``Datamodels(task, directory, ...)``, ``fit(ground_truth)``, ``score(test_indices)``.

Shared pieces: ``methods.checkpoints`` (``Checkpoint``, snapshotted checkpoints, the
per-checkpoint loop), ``methods.passes`` (``DataPasses``: checked passes over a loader, errors
located to the example and checkpoint; ``checked`` task functions), ``methods.scores`` (what
``score(..., out=)`` accepts).
"""
from .checkpoints import Checkpoint
from .datamodels import Datamodels
from .ekfac import EKFAC, KFAC
from .influence import InfluenceCG, InfluenceExplicit, InfluenceLiSSA
from .source import SOURCE
from .tracin import TracIn
from .trak import TRAK

__all__ = ["TRAK", "TracIn", "InfluenceExplicit", "InfluenceCG", "InfluenceLiSSA", "EKFAC", "KFAC", "SOURCE",
           "Datamodels", "Checkpoint"]
