"""The interface every attribution method follows, and the helpers they share.

    m = ak.TRAK(model, task, k=2048, store="runs/trak")     # model: any nn.Module
    m.fit(train_loader, checkpoints=[sd0, sd1, ...])         # state_dicts or paths
    scores = m.score(test_loader)                            # torch.Tensor [n_train, n_test]

Orientation and sign, everywhere: ``scores[i, j]`` > 0 means that including training example i
raises the measurement (``task.measure``, e.g. the correct-class margin) of test example j.
Loaders must yield batches in a fixed order; example i of the training set is the i-th example
the train loader yields.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..tasks.base import Task
from ..tasks.training import Checkpoint


class AttributionMethod:
    """Base of the methods: validates the model and task; subclasses implement fit and score."""

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


def as_checkpoints(model: nn.Module, checkpoints) -> list:
    """The checkpoints to use: the model's current weights when None, else a non-empty list of
    state dicts or paths (``ak.tasks.Checkpoint`` objects unwrapped)."""
    if checkpoints is None:
        return [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    if isinstance(checkpoints, (Mapping, str, Path, Checkpoint)):
        checkpoints = [checkpoints]
    checkpoints = [c.state_dict if isinstance(c, Checkpoint) else c for c in checkpoints]
    if not checkpoints:
        raise ValueError("checkpoints is empty; pass state_dicts or paths, or None for the model's weights")
    return checkpoints


def read_checkpoint(ckpt, index: int = 0) -> Mapping:
    """A state_dict from a state_dict or a path saved with torch.save."""
    if isinstance(ckpt, (str, Path)):
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {index}: no file {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"checkpoint {index} must be a state_dict or a path, got {type(ckpt).__name__}")
    return ckpt


def load_checkpoint(model: nn.Module, ckpt, index: int = 0) -> None:
    """Load a checkpoint into ``model`` (in place), with an error naming what does not match."""
    state = read_checkpoint(ckpt, index)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes[:5]))
        raise ValueError(f"checkpoint {index} does not match the model: " + ", ".join(parts))
    model.load_state_dict(state, strict=True)


@contextmanager
def preserved_weights(model: nn.Module):
    """Restore the model's parameters and buffers (and train/eval mode) on exit."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    training = model.training
    try:
        yield model
    finally:
        model.load_state_dict(saved)
        model.train(training)


def fingerprint(ckpt) -> str:
    """A short stable id of a checkpoint's contents (keys, shapes, values)."""
    state = read_checkpoint(ckpt)
    h = hashlib.sha1()
    for key in sorted(state):
        t = state[key]
        if not torch.is_tensor(t):
            h.update(f"{key}={t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)
        if flat.numel() > (16 << 20):  # large tensors: a strided sample of their bytes
            flat = flat[:: flat.numel() // (4 << 20)]
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


def iterate(loader, task: Task, what: str):
    """Yield (start, batch, size) over a loader; clear errors for empty loaders or bad batches."""
    start = 0
    for batch in loader:
        try:
            size = task.batch_size(batch)
        except Exception as err:  # noqa: BLE001  (the task decides what a batch is)
            raise TypeError(f"the task cannot read batches of the {what} loader: {err}") from err
        yield start, batch, size
        start += size
    if start == 0:
        raise ValueError(f"the {what} loader yielded no examples")


def call_task(fn, model, batch, size: int, what: str) -> torch.Tensor:
    """task.loss / task.measure on a batch, checked to return one value per example."""
    try:
        out = fn(model, batch)
    except Exception as err:  # noqa: BLE001
        raise TypeError(f"the task cannot read batches of the {what} loader: "
                        f"{type(err).__name__}: {err}") from err
    if not torch.is_tensor(out) or out.shape != (size,):
        raise ValueError(f"{getattr(fn, '__name__', 'task function')} must return a tensor of shape "
                         f"[{size}] (one value per example), got "
                         f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    return out
