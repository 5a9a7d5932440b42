"""The interface the attribution methods follow, and the helpers they share.

Gradient-based methods (``TRAK``, ``TracIn``, ``InfluenceExplicit``, ``InfluenceCG``,
``InfluenceLiSSA``, ``EKFAC``, ``KFAC``) are built from a model and a task and fitted on a train
loader at one or more checkpoints:

    m = ak.TRAK(model, task, k=2048, store="runs/trak")     # model: any nn.Module
    m.fit(train_loader, checkpoints=[sd0, sd1, ...])         # state_dicts, paths or Checkpoints
    scores = m.score(test_loader)                            # torch.Tensor [n_train, n_test]

- ``task`` (``ak.tasks.Task``) owns the batch format and every loss: ``loss`` (per-example
  training loss), ``measure`` (what attribution predicts), and where a method needs them
  ``out_to_loss`` (TRAK), ``sampled_loss`` (EK-FAC / K-FAC true Fisher), ``logits`` and
  ``logit_loss`` (influence with the Gauss-Newton curvature). Methods never index a batch.
- ``checkpoints`` (``methods.checkpoints``): None (the model's current weights), a state dict,
  a path or a ``Checkpoint``, or a list of them. TRAK, EK-FAC / K-FAC and the influence methods
  average over checkpoints; TracIn sums learning-rate-weighted terms and takes
  ``fit(train, checkpoints, learning_rates=None)`` (the rates default to ``Checkpoint.lr``).
  Every call restores the model's own weights and train/eval mode; the model runs in eval mode
  inside, and batches are moved to the model's device.
- ``score`` variants: TRAK ``score(test, *, out=None, tile=4096)``, EK-FAC / K-FAC
  ``score(test, *, train=None, out=None)`` (and ``self_influence``); ``out`` means the same
  everywhere (``methods.scores.ScoreOutput``): a path written as a float32 .npy memory map, or
  an existing [n_train, n_test] tensor or array filled in place.
- ``store=`` (TRAK, EK-FAC / K-FAC): a resumable on-disk store of features or factors.

``Datamodels`` is the exception: it needs no gradients and no model at score time. It is built
from a built-in task and a ground-truth directory, ``Datamodels(task=None, directory=None, *,
m, r, alpha, seed, estimator, ...)``, fits linear models of the outputs of models retrained on
subsets of the training set, ``fit(ground_truth=None, *, exclude=None)`` (it trains the missing
models itself, or takes a ``GroundTruth`` or ``(masks, outputs)``), and ``score(test_indices=None)``
returns the weights for test examples of that ground truth, not for a test loader.

Orientation and sign, everywhere: ``scores[i, j]`` > 0 means that including training example i
raises the measurement (``task.measure``, e.g. the correct-class margin) of test example j.
Loaders must yield batches in a fixed order; example i of the training set is the i-th example
the train loader yields. Every pass over a loader goes through ``methods.passes.DataPasses``,
which refuses loaders that shuffle, drop their last batch or can be iterated only once, and
compares the examples of every pass with the first (``store.DataMismatch`` otherwise).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..tasks.base import Task
from ..utils.errors import ExampleError
from .checkpoints import model_device
from .passes import DataPasses, check_finite


class AttributionMethod:
    """Base of the gradient-based methods: validates the model and task; subclasses implement
    fit and score."""

    def __init__(self, model: nn.Module, task: Task, *, verbose: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no trainable parameters (none has requires_grad=True)")
        for attr in ("loss", "measure"):
            if not callable(getattr(task, attr, None)):
                raise TypeError(f"task must have a {attr}(model, batch) method (see ak.tasks.Task)")
        self.model, self.task, self.verbose = model, task, verbose

    def fit(self, train, checkpoints=None):
        raise NotImplementedError

    def score(self, test, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def _passes(self, loader, what: str = "train") -> DataPasses:
        """Checked passes over a loader (``methods.passes``), batches on the model's device."""
        return DataPasses(loader, self.task, what, device=model_device(self.model))


def call_task(fn, model, batch, size: int, what: str) -> torch.Tensor:
    """task.loss / task.measure on a batch, checked to return one finite value per example
    (non-finite values raise ``ExampleError`` naming the examples within the batch, which a
    ``DataPasses`` pass re-raises with their global indices)."""
    try:
        out = fn(model, batch)
    except ExampleError:
        raise
    except Exception as err:  # noqa: BLE001
        raise TypeError(f"the task cannot read batches of the {what} loader: "
                        f"{type(err).__name__}: {err}") from err
    if not torch.is_tensor(out) or out.shape != (size,):
        raise ValueError(f"{getattr(fn, '__name__', 'task function')} must return a tensor of shape "
                         f"[{size}] (one value per example), got "
                         f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    check_finite(out, getattr(fn, "__name__", "output"))
    return out
