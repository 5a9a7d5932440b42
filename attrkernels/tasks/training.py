"""A seeded minibatch training loop shared by the built-in tasks.

A ``Recipe`` fixes everything about optimisation (optimiser, learning-rate schedule, epochs,
batch size, weight decay); ``train_classifier`` runs it on a subset of a training set and
returns intermediate checkpoints (``methods.checkpoints.Checkpoint``) with the learning rate in
effect at each, as TracIn needs, and the sum of the learning rates since the previous one, as
SOURCE needs.

Randomness. A training run is a pure function of its integer ``seed``: ``split_seed(seed)``
derives two independent 63-bit seeds (NumPy ``SeedSequence(seed)``), one for the weight
initialisation (``seeded_module``) and one for a local ``torch.Generator`` that draws the data
order and any augmentation. The global RNG state of the caller is left untouched. On one
backend with a fixed number of threads the result is bit-for-bit reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..methods.checkpoints import Checkpoint  # what train_classifier returns; lives beside the methods

SCHEDULES = ("constant", "linear", "triangle")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    """Optimisation hyper-parameters of a training run.

    The learning rate of step t (0-based) out of T = epochs * ceil(n / batch_size) steps is
    f(t + 1/2) for the piecewise-linear f of ``schedule``:

    - ``constant``: f = lr;
    - ``linear``: f(s) = lr * (1 - s / T), decaying to zero at the end;
    - ``triangle``: f rises from 0 to lr at step ``peak_epoch * steps_per_epoch`` and falls back
      to 0 at T (the one-cycle schedule of the fast CIFAR ResNet-9 recipes).

    Weight decay is the optimiser's (coupled, L2 added to the gradient) and applies to every
    parameter. The training loss is the mean over the batch of the task's per-example ``loss``.
    """

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "linear"
    peak_epoch: float = 0.0

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"Recipe.epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"Recipe.batch_size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"Recipe.lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Recipe.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Recipe.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "triangle" and not 0 < self.peak_epoch < self.epochs:
            raise ValueError(
                f"Recipe.peak_epoch must lie in (0, epochs={self.epochs}) for the triangle "
                f"schedule, got {self.peak_epoch}"
            )

    def learning_rate(self, step: int, steps_per_epoch: int) -> float:
        """Learning rate of 0-based ``step`` when an epoch has ``steps_per_epoch`` steps."""
        total = self.epochs * steps_per_epoch
        s = step + 0.5
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "linear":
            return self.lr * (1.0 - s / total)
        peak = self.peak_epoch * steps_per_epoch
        return float(np.interp(s, [0.0, peak, total], [0.0, self.lr, 0.0]))


# The recipe of the small built-in tasks (digits-mlp, mnist1d-cnn): 40 epochs of SGD with
# momentum, learning rate decayed linearly to zero, weight decay for a well-conditioned Hessian.
SMALL_TASK_RECIPE = Recipe(epochs=40, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9,
                           weight_decay=5e-3, schedule="linear")


def split_seed(seed: int) -> tuple[int, int]:
    """(init seed, data-order seed): two independent 63-bit seeds derived from ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    words = np.random.SeedSequence(int(seed)).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1)), int(words[1] >> np.uint64(1))


def seeded_module(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """``build()`` with torch's global RNG seeded by ``seed``, restoring the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def checkpoint_epochs(epochs: int, count: int) -> list[int]:
    """``count`` evenly spaced epochs in [1, epochs], the last one = ``epochs``."""
    if not 0 <= count <= epochs:
        raise ValueError(f"checkpoints must be in [0, epochs={epochs}], got {count}")
    return [round(epochs * (i + 1) / count) for i in range(count)]


def train_classifier(
    model: torch.nn.Module,
    task,
    tensors: tuple[torch.Tensor, ...],
    indices: Optional[np.ndarray],
    recipe: Recipe,
    generator: torch.Generator,
    *,
    checkpoints: int = 0,
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
    device: str | torch.device = "cpu",
) -> list[Checkpoint]:
    """Train ``model`` in place with ``recipe`` on ``tensors`` restricted to ``indices``.

    ``tensors`` = (inputs [N, ...], labels [N], ...) form the batches handed to ``task.loss``;
    ``indices`` (None = all N) selects the training subset; each epoch visits it in an order drawn
    from ``generator``. ``augment(inputs, generator)`` transforms each training batch. Returns
    ``checkpoints`` checkpoints (state dicts copied to the CPU) at evenly spaced epochs.
    """
    n_total = int(tensors[0].shape[0])
    subset = torch.arange(n_total) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
    if subset.ndim != 1 or subset.numel() == 0:
        raise ValueError(f"indices must be a non-empty 1-D array of training indices, got shape {tuple(subset.shape)}")
    if int(subset.min()) < 0 or int(subset.max()) >= n_total:
        raise ValueError(f"indices must lie in [0, {n_total}), got range [{int(subset.min())}, {int(subset.max())}]")
    n = subset.numel()
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    save_at = set(checkpoint_epochs(recipe.epochs, checkpoints))

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                              nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)

    model.to(device).train()
    saved, step, lr = [], 0, recipe.lr
    lr_sum, steps_since = 0.0, 0  # since the last saved checkpoint
    for epoch in range(1, recipe.epochs + 1):
        order = subset[torch.randperm(n, generator=generator)]
        for start in range(0, n, recipe.batch_size):
            rows = order[start:start + recipe.batch_size]
            batch = [t[rows] for t in tensors]
            if augment is not None:
                batch[0] = augment(batch[0], generator)
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            lr = recipe.learning_rate(step, steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = task.loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lr_sum += lr
            steps_since += 1
        if epoch in save_at:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            saved.append(Checkpoint(state_dict=state, epoch=epoch, lr=lr, lr_sum=lr_sum, steps=steps_since))
            lr_sum, steps_since = 0.0, 0
    model.eval()
    return saved
