"""What every attribution benchmark needs for a built-in task: its ground truth, trained
checkpoints (cached, with their training cost) and loaders in the original order.

Caches live under ``runs/`` (not versioned): ``runs/gt/<task>-<protocol>`` is the LDS ground
truth (resumable, see attrkernels.eval), ``runs/ckpt/<task>/model-seed<s>.pt`` a model trained on
the whole training set with seed s, with the seconds it took in ``model-seed<s>.json`` (the
``attrkernels.eval.checkpoints.CheckpointCache``).
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

import attrkernels as ak
from attrkernels.eval import build_ground_truth
from attrkernels.eval.checkpoints import CheckpointCache

RUNS = Path(__file__).resolve().parent.parent / "runs"


def ground_truth(task, protocol="default", verbose=True):
    """The task's LDS ground truth for ``protocol``, trained now where missing."""
    return build_ground_truth(task, RUNS / "gt" / f"{task.name}-{protocol}", protocol, verbose=verbose)


def checkpoints(task, count: int):
    """(state_dicts, training seconds each) of ``count`` models trained on all training data with
    seeds 0..count-1: the frontier's checkpoint cache, shared with it."""
    return CheckpointCache(task, RUNS).models(count)


def loaders(task, batch_size: int = 100):
    """(train loader, test loader): fixed order, as methods and the ground truth index examples."""
    return (DataLoader(task.train_data(), batch_size=batch_size, shuffle=False),
            DataLoader(task.test_data(), batch_size=batch_size, shuffle=False))


def lds_of(scores, gt):
    """LDS result of [n_train, n_test] scores against a ground truth."""
    return ak.lds(scores, gt.masks, gt.mean_outputs())
