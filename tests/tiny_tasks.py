"""Tiny built-in-protocol tasks for the evaluator tests (importable by worker processes)."""
from __future__ import annotations

import os
import time
from dataclasses import asdict

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from attrkernels.tasks import Benchmark, Classification, Recipe


def blobs(n: int, seed: int):
    """Two overlapping 2-D Gaussian blobs: inputs [n, 2] float32, labels [n] int64."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 2)) + 0.8 * (2 * y[:, None] - 1)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


class TinyLogReg(Benchmark):
    """Logistic regression (Linear(2, 2)) on 60 training and 20 test points.

    ``log``: a file that gets one line per trained model (seed); ``sleep``: seconds added to each
    training run. Neither changes the ground truth, so neither is in ``config()``.
    """

    name = "tiny-logreg"
    lds_protocols = {"default": {"m": 6, "r": 2, "alpha": 0.5}}

    def __init__(self, lr: float = 0.3, log: str | None = None, sleep: float = 0.0):
        self.recipe = Recipe(epochs=5, batch_size=20, lr=lr, momentum=0.0, schedule="constant")
        self.log, self.sleep = log, sleep

    def train_data(self):
        return TensorDataset(*blobs(60, 0))

    def test_data(self):
        return TensorDataset(*blobs(20, 1))

    def build_model(self):
        return nn.Linear(2, 2)

    def train(self, indices=None, seed=0, *, checkpoints=0):
        result = super().train(indices, seed, checkpoints=checkpoints)
        time.sleep(self.sleep)
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{seed}\n")
                f.flush()
                os.fsync(f.fileno())
        return result

    def config(self):
        return {"name": self.name, "recipe": asdict(self.recipe), "data": "blobs(60, 0) / blobs(20, 1)"}


class ColumnMeasure(Classification):
    """A broken measurement: returns [B, 1] instead of [B]."""

    def measure(self, model, batch):
        return super().measure(model, batch)[:, None]


class BadMeasureTask(TinyLogReg):
    name = "tiny-bad-measure"
    task = ColumnMeasure()
