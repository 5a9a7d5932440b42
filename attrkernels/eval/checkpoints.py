"""Checkpoints of a benchmark trained once, cached on disk with the seconds their training took.

Layout under the cache folder ``runs``::

    runs/ckpt/<benchmark>/model-seed<s>.pt       state dict of a model trained on all training data
    runs/ckpt/<benchmark>/model-seed<s>.json     {"seconds": training time, "config": config hash}
    runs/ckpt/<benchmark>/trajectory-C<C>.pt     C evenly spaced checkpoints of one run (seed 0), each
                                                 with its epoch, learning rate, learning-rate sum and
                                                 step count (``methods.checkpoints.Checkpoint``)
    runs/ckpt/<benchmark>/trajectory-C<C>.json   {"seconds", "config", "format": 2}

A cached file whose recorded config hash differs from the benchmark's is retrained. A trajectory
is read only from a file of ``TRAJECTORY_FORMAT`` holding C checkpoints that each carry a positive
``lr_sum`` and ``steps``; anything else (e.g. the former ``trajectory-<C>.pt``, which had only the
last learning rate of each checkpoint, never read here) is retrained, never misread. The frontier
and the attribution benchmarks share this cache, so each model is trained once.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..methods.checkpoints import Checkpoint
from ..store import atomic_write, read_json, write_json

TRAJECTORY_FORMAT = 2
_FIELDS = ("epoch", "lr", "lr_sum", "steps")


class CheckpointCache:
    """Checkpoints of ``benchmark`` trained once and cached under ``<runs>/ckpt/<name>/``.

    Each training is timed after an untimed warm-up run, so the first one does not also pay the
    process's one-time start-up (lazy imports, allocator warm-up)."""

    def __init__(self, benchmark, runs):
        self.benchmark, self.folder, self._warm = benchmark, Path(runs) / "ckpt" / benchmark.name, False

    def _train_timed(self, make):
        """(make(), seconds), after the one warm-up run of this cache."""
        if not self._warm:
            self.benchmark.train(np.arange(min(64, len(self.benchmark.train_data()))), 0)
            self._warm = True
        t0 = time.perf_counter()
        result = make()
        return result, time.perf_counter() - t0

    def _cached(self, name: str, make):
        """(state_dicts, learning rates, seconds) trained by ``make`` once and cached."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path, info = self.folder / f"{name}.pt", self.folder / f"{name}.json"
        config = self.benchmark.config_hash()
        if not (path.exists() and info.exists() and read_json(info).get("config") == config):
            (states, rates), seconds = self._train_timed(make)
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

    def trajectory(self, count: int) -> tuple[list, float]:
        """(checkpoints, seconds): ``count`` evenly spaced ``Checkpoint``s of one training run
        (seed 0), the last one the final model, each with its epoch, the learning rate of its
        last step, and the sum of the learning rates (``lr_sum``) of the ``steps`` optimiser steps
        since the previous one (since initialisation for the first); seconds: the run's training
        time. ``count`` must lie in [1, recipe epochs] (checkpoints are taken at epoch ends)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        path, info = self.folder / f"trajectory-C{count}.pt", self.folder / f"trajectory-C{count}.json"
        config = self.benchmark.config_hash()
        saved = _read_trajectory(path, info, config, count)
        if saved is None:
            ckpts, seconds = self._train_timed(lambda: self.benchmark.train(None, 0, checkpoints=count)[1])
            records = [{"state_dict": c.state_dict, **{k: getattr(c, k) for k in _FIELDS}} for c in ckpts]
            if _invalid(records, count):
                raise ValueError(f"{self.benchmark.name}: train(..., checkpoints={count}) returned "
                                 f"{_invalid(records, count)}; a trajectory needs {count} Checkpoints with "
                                 "positive lr_sum and steps (tasks.training.train_classifier fills them)")
            atomic_write(path, lambda f: torch.save({"format": TRAJECTORY_FORMAT, "checkpoints": records}, f))
            write_json(info, {"seconds": seconds, "config": config, "format": TRAJECTORY_FORMAT})
            saved = _read_trajectory(path, info, config, count)
        records, seconds = saved
        return [Checkpoint(**r) for r in records], seconds


def _invalid(records, count: int) -> str | None:
    """What is wrong with trajectory ``records`` (None when they are ``count`` complete checkpoints)."""
    if not isinstance(records, list) or len(records) != count:
        return f"{len(records) if isinstance(records, list) else type(records).__name__} checkpoints"
    for i, r in enumerate(records):
        if not isinstance(r, dict) or set(r) != {"state_dict", *_FIELDS}:
            return f"checkpoint {i} without the fields state_dict, {', '.join(_FIELDS)}"
        if r["lr_sum"] is None or not (math.isfinite(r["lr_sum"]) and r["lr_sum"] > 0):
            return f"checkpoint {i} with lr_sum {r['lr_sum']!r}"
        if r["steps"] is None or r["steps"] < 1:
            return f"checkpoint {i} with steps {r['steps']!r}"
    return None


def _read_trajectory(path: Path, info: Path, config: str, count: int):
    """(records, seconds) of a cached trajectory of this format and config, else None (retrain)."""
    if not (path.exists() and info.exists()):
        return None
    meta = read_json(info)
    if meta.get("config") != config or meta.get("format") != TRAJECTORY_FORMAT:
        return None
    saved = torch.load(path, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != TRAJECTORY_FORMAT or _invalid(saved.get("checkpoints"), count):
        return None
    return saved["checkpoints"], meta["seconds"]
