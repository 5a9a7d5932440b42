"""``mnist1d-cnn``: the MNIST-1D generator (4,000 train / 1,000 test signals) and a small 1-D CNN.

Data. ``mnist1d.data.make_dataset(get_dataset_args())`` with the package defaults (5,000
signals of length 40 from 10 digit templates, generator seed 42, train split 0.8): the first
4,000 signals are the training set, the last 1,000 the test set, exactly as the package splits
them. Nothing is downloaded (``make_dataset`` generates; only ``get_dataset`` downloads). The
generator seeds NumPy's and Python's global RNGs; we restore both afterwards. Inputs have shape
[N, 1, 40].

Model. Conv1d(1, c, 5, padding 2) - ReLU - Conv1d(c, c, 3, stride 2, padding 1) - ReLU -
Conv1d(c, c, 3, stride 2, padding 1) - ReLU - Flatten - Linear(10 c, 10), c = 32 channels.

Recipe. See ``Mnist1dCNN.recipe``: SGD with momentum, weight decay and a linearly decaying
learning rate, 40 epochs; 2 to 8 s per model on one core for a 2,000-example subset (7.5 s measured
on the 2-core Xeon of this repository at load 0.5), so the quick protocol is ~750 core-seconds.
"""
from __future__ import annotations

import random
from dataclasses import asdict
from importlib.metadata import version as package_version

import numpy as np
import torch
from torch import nn

from .benchmark import InMemoryBenchmark, register
from .training import SMALL_TASK_RECIPE, Recipe


def generate_mnist1d():
    """(x_train [4000, 1, 40], y_train, x_test [1000, 1, 40], y_test) as tensors."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("the mnist1d-cnn task needs the mnist1d package: pip install mnist1d") from e
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def x(a):
        return torch.tensor(a, dtype=torch.float32)[:, None, :]

    def y(a):
        return torch.tensor(a, dtype=torch.long)

    return x(data["x"]), y(data["y"]), x(data["x_test"]), y(data["y_test"])


class ConvNet1d(nn.Module):
    """Three Conv1d layers (the last two stride 2) and a linear classifier, for length-40 signals."""

    def __init__(self, channels: int = 32, length: int = 40, classes: int = 10):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv1d(1, c, 5, padding=2), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c * ((length + 3) // 4), classes)

    def forward(self, x):
        return self.classifier(self.features(x))


@register
class Mnist1dCNN(InMemoryBenchmark):
    """MNIST-1D (package defaults: 4,000 train / 1,000 test), a 3-layer 1-D CNN, margin measurement."""

    name = "mnist1d-cnn"
    recipe = SMALL_TASK_RECIPE
    # Seeds matter more here than on digits: the quick protocol's split-half correlation is 0.39
    # (1 vs 1 seed, measured); Spearman-Brown predicts 0.72 for the default's 4 vs 4 seeds.
    lds_protocols = {"default": {"m": 100, "r": 8, "alpha": 0.5},
                     "quick": {"m": 50, "r": 2, "alpha": 0.5}}

    def __init__(self, channels: int = 32, recipe: Recipe | None = None):
        self.channels = channels
        if recipe is not None:
            self.recipe = recipe

    def arrays(self):
        return generate_mnist1d()

    def build_model(self) -> nn.Module:
        return ConvNet1d(self.channels)

    def config(self) -> dict:
        return {
            "name": self.name,
            "data": {"source": "mnist1d.data.make_dataset(get_dataset_args())",
                     "mnist1d_version": package_version("mnist1d"), "n_train": 4000, "n_test": 1000},
            "model": {"arch": "ConvNet1d", "channels": self.channels},
            "recipe": asdict(self.recipe),
            "measure": type(self.task).__name__ + ".measure",
        }
