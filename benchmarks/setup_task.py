"""What every attribution benchmark needs for a built-in task: its ground truth, trained
checkpoints (cached, with their training cost) and loaders in the original order.

Caches live under ``runs/`` (not versioned): ``runs/gt/<task>-<protocol>`` is the LDS ground
truth (resumable, see attrkernels.eval), ``runs/ckpt/<task>/seed<s>.pt`` a model trained on the
whole training set with seed s, with the seconds it took in ``seed<s>.json``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import attrkernels as ak
from attrkernels.eval import build_ground_truth
from attrkernels.store import read_json, write_json

RUNS = Path(__file__).resolve().parent.parent / "runs"


def ground_truth(task, protocol="default", verbose=True):
    """The task's LDS ground truth for ``protocol``, trained now where missing."""
    return build_ground_truth(task, RUNS / "gt" / f"{task.name}-{protocol}", protocol, verbose=verbose)


def checkpoints(task, count: int, first_seed: int = 0):
    """(state_dicts, training seconds each) of ``count`` models trained on all training data."""
    folder = RUNS / "ckpt" / task.name
    folder.mkdir(parents=True, exist_ok=True)
    states, seconds = [], []
    for seed in range(first_seed, first_seed + count):
        path, info = folder / f"seed{seed}.pt", folder / f"seed{seed}.json"
        if not (path.exists() and info.exists() and read_json(info).get("config") == task.config_hash()):
            t0 = time.perf_counter()
            model, _ = task.train(None, seed)
            elapsed = time.perf_counter() - t0
            torch.save(model.state_dict(), path)
            write_json(info, {"seconds": elapsed, "config": task.config_hash()})
        states.append(torch.load(path, weights_only=True))
        seconds.append(read_json(info)["seconds"])
    return states, seconds


def loaders(task, batch_size: int = 100):
    """(train loader, test loader): fixed order, as methods and the ground truth index examples."""
    return (DataLoader(task.train_data(), batch_size=batch_size, shuffle=False),
            DataLoader(task.test_data(), batch_size=batch_size, shuffle=False))


def lds_of(scores, gt):
    """LDS result of [n_train, n_test] scores against a ground truth."""
    return ak.lds(scores, gt.masks, gt.mean_outputs())
