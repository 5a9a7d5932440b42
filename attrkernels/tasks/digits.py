"""``digits-mlp``: scikit-learn's 8x8 digits and a 64-128-128-10 MLP (the CPU default task).

Data. ``sklearn.datasets.load_digits`` (1,797 images of 8x8 pixels, values 0..16, 10 classes;
shipped with scikit-learn, no download). A permutation drawn from
``np.random.default_rng(split_seed)`` (split_seed = 0) puts its first 1,000 images in the
training set and the next 300 in the test set; the remaining 497 are unused. Pixels are
standardised per feature with the training set's mean and standard deviation (features with
zero training variance are only centred).

Model. Linear(64, 128) - ReLU - Linear(128, 128) - ReLU - Linear(128, 10): 26,122 parameters.

Recipe. See ``DigitsMLP.recipe``: minibatch SGD with momentum, weight decay and a linearly
decaying learning rate, 40 epochs of batches of 128; about 0.12 s per model on one core for a
500-example subset; 97% test accuracy when trained on all 1,000 examples, 95% on half.

``digits-mlp-short``: the same data and model trained for 6 epochs instead of 40 (the same
schedule, compressed): a non-converged model (training loss 0.17 against 0.03 after 40 epochs,
92% test accuracy), where methods that follow the training trajectory (SOURCE) should gain most
over those that assume an optimum.
"""
from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import torch
from torch import nn

from .benchmark import InMemoryBenchmark, register
from .training import SMALL_TASK_RECIPE, Recipe


def load_digits_split(n_train: int = 1000, n_test: int = 300, split_seed: int = 0):
    """Standardised (x_train [n_train, 64], y_train, x_test [n_test, 64], y_test) as tensors."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits-mlp task needs scikit-learn: pip install scikit-learn") from e
    x, y = load_digits(return_X_y=True)
    if n_train + n_test > len(y):
        raise ValueError(f"n_train + n_test must be at most {len(y)}, got {n_train} + {n_test}")
    order = np.random.default_rng(split_seed).permutation(len(y))
    train, test = order[:n_train], order[n_train:n_train + n_test]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std

    def as_tensors(rows):
        return torch.tensor(x[rows], dtype=torch.float32), torch.tensor(y[rows], dtype=torch.long)

    return (*as_tensors(train), *as_tensors(test))


@register
class DigitsMLP(InMemoryBenchmark):
    """scikit-learn digits (1,000 train / 300 test), MLP 64-128-128-10, margin measurement."""

    name = "digits-mlp"
    recipe = SMALL_TASK_RECIPE
    # Split-half correlation between seeds (eval.split_half) on this machine: 0.90 for the
    # default protocol (4 vs 4 seeds), 0.82 for the quick one (2 vs 2 seeds).
    lds_protocols = {"default": {"m": 200, "r": 8, "alpha": 0.5},
                     "quick": {"m": 100, "r": 4, "alpha": 0.5}}

    def __init__(self, n_train: int = 1000, n_test: int = 300, split_seed: int = 0,
                 hidden: int = 128, recipe: Recipe | None = None):
        self.n_train, self.n_test, self.split_seed, self.hidden = n_train, n_test, split_seed, hidden
        if recipe is not None:
            self.recipe = recipe

    def arrays(self):
        return load_digits_split(self.n_train, self.n_test, self.split_seed)

    def build_model(self) -> nn.Module:
        h = self.hidden
        return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))

    def config(self) -> dict:
        return {
            "name": self.name,
            "data": {"source": "sklearn.datasets.load_digits", "n_train": self.n_train,
                     "n_test": self.n_test, "split_seed": self.split_seed,
                     "preprocess": "standardise with training mean/std"},
            "model": {"arch": "mlp", "sizes": [64, self.hidden, self.hidden, 10], "activation": "relu"},
            "recipe": asdict(self.recipe),
            "measure": type(self.task).__name__ + ".measure",
        }


@register
class DigitsMLPShort(DigitsMLP):
    """digits-mlp stopped early: 6 epochs of the same recipe (learning rate decayed linearly to
    zero over the 6 epochs), so checkpoints of up to 6 epochs of trajectory exist."""

    name = "digits-mlp-short"
    recipe = replace(SMALL_TASK_RECIPE, epochs=6)
