"""Checkpoints of a benchmark trained once, cached on disk with the seconds their training took.

Layout under the cache folder ``runs``::

    runs/ckpt/<benchmark>/model-seed<s>.pt     state dict of a model trained on all training data
    runs/ckpt/<benchmark>/model-seed<s>.json   {"seconds": training time, "config": config hash}
    runs/ckpt/<benchmark>/trajectory-<C>.pt    C evenly spaced checkpoints of one run (seed 0)

A cached file whose recorded config hash differs from the benchmark's is retrained. The frontier
and the attribution benchmarks share this cache, so each model is trained once.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..store import read_json, write_json


class CheckpointCache:
    """Checkpoints of ``benchmark`` trained once and cached under ``<runs>/ckpt/<name>/``.

    Each training is timed after an untimed warm-up run, so the first one does not also pay the
    process's one-time start-up (lazy imports, allocator warm-up)."""

    def __init__(self, benchmark, runs):
        self.benchmark, self.folder, self._warm = benchmark, Path(runs) / "ckpt" / benchmark.name, False

    def _cached(self, name: str, make):
        """(state_dicts, learning rates, seconds) trained by ``make`` once and cached."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path, info = self.folder / f"{name}.pt", self.folder / f"{name}.json"
        config = self.benchmark.config_hash()
        if not (path.exists() and info.exists() and read_json(info).get("config") == config):
            if not self._warm:
                self.benchmark.train(np.arange(min(64, len(self.benchmark.train_data()))), 0)
                self._warm = True
            t0 = time.perf_counter()
            states, rates = make()
            seconds = time.perf_counter() - t0
            torch.save({"states": states, "rates": rates}, path)
            write_json(info, {"seconds": seconds, "config": config})
        saved = torch.load(path, weights_only=True)
        return saved["states"], saved["rates"], read_json(info)["seconds"]

    def models(self, count: int) -> tuple[list, list]:
        """(state_dicts, training seconds each) of ``count`` models trained on all training data
        with seeds 0..count-1."""
        states, seconds = [], []
        for seed in range(count):
            state, _, s = self._cached(f"model-seed{seed}", lambda seed=seed: (
                [self.benchmark.train(None, seed)[0].state_dict()], [0.0]))
            states += state
            seconds.append(s)
        return states, seconds

    def trajectory(self, count: int) -> tuple[list, list, float]:
        """(state_dicts, learning rates, seconds) of ``count`` evenly spaced checkpoints of one
        training run (seed 0); the last one is the final model."""
        def make():
            _, ckpts = self.benchmark.train(None, 0, checkpoints=count)
            return [c.state_dict for c in ckpts], [float(c.lr) for c in ckpts]
        return self._cached(f"trajectory-{count}", make)
