"""Checkpoints: the weights a method attributes at, and the one loop of a method over them.

A checkpoint is a state_dict, a path saved with ``torch.save``, or a ``Checkpoint`` (a state
dict with the epoch and the learning rate of the last step taken: what
``BuiltinTask.train(..., checkpoints=n)`` returns and TracIn needs); ``None`` stands for the
model's current weights. Every method visits its checkpoints with the same loop:

    with checkpoint_loop(model, checkpoints, desc="TracIn", verbose=verbose) as loop:
        for k, ckpt in loop:        # the model holds checkpoint k, in eval mode
            ...

and on leaving the ``with`` block, normally or by an exception, the model has its own weights
(parameters and buffers) and train/eval mode back. Batches reach the model's device through
``methods.base.iterate(..., device=)``.

This module imports nothing from the methods, so the training recipe (``tasks.training``), which
creates ``Checkpoint`` objects, can import it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm


@dataclass
class Checkpoint:
    """Model state after ``epoch`` epochs; ``lr`` is the learning rate of the last step taken."""

    state_dict: dict
    epoch: int
    lr: float


def as_checkpoints(model: nn.Module, checkpoints) -> list:
    """The checkpoints to use: the model's current weights when None, else a non-empty list of
    state dicts or paths (``Checkpoint`` objects unwrapped)."""
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


def check_checkpoint(model: nn.Module, state: Mapping, index: int = 0) -> None:
    """A ValueError naming what of the state dict does not match the model (keys, shapes)."""
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


def load_checkpoint(model: nn.Module, ckpt, index: int = 0) -> None:
    """Load a checkpoint into ``model`` (in place), with an error naming what does not match."""
    state = read_checkpoint(ckpt, index)
    check_checkpoint(model, state, index)
    model.load_state_dict(state, strict=True)


def checked_checkpoints(model: nn.Module, checkpoints) -> list:
    """``as_checkpoints``, each one read and checked against the model (which is left as it is),
    so that a mismatching checkpoint is refused before any work."""
    checkpoints = as_checkpoints(model, checkpoints)
    for index, ckpt in enumerate(checkpoints):
        check_checkpoint(model, read_checkpoint(ckpt, index), index)
    return checkpoints


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


class checkpoint_loop:  # noqa: N801  (used like a function: ``with checkpoint_loop(...) as loop``)
    """The per-checkpoint loop of a method: ``with checkpoint_loop(model, checkpoints) as loop:
    for k, ckpt in loop: ...``.

    Entering saves the model's weights and mode; iterating loads checkpoint k into the model
    (eval mode) before yielding ``(k, ckpt)``, with a progress bar ``desc`` unless ``verbose`` is
    False; leaving restores the weights and mode, also on error. ``checkpoints``: as returned by
    ``as_checkpoints`` (state dicts or paths). ``device``: the model's (that of its first
    parameter), where a method moves its batches.
    """

    def __init__(self, model: nn.Module, checkpoints, *, desc: str | None = None, verbose: bool = True,
                 unit: str = "checkpoint"):
        self.model, self.checkpoints = model, list(checkpoints)
        self.desc, self.verbose, self.unit = desc, verbose, unit
        self._preserved = None

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def __enter__(self) -> "checkpoint_loop":
        self._preserved = preserved_weights(self.model)
        self._preserved.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        preserved, self._preserved = self._preserved, None
        preserved.__exit__(*exc)

    def __iter__(self):
        if self._preserved is None:
            raise RuntimeError("iterate a checkpoint_loop inside its with block (it restores the weights)")
        show = self.verbose and self.desc is not None
        for index, ckpt in enumerate(tqdm(self.checkpoints, desc=self.desc, unit=self.unit, disable=not show)):
            load_checkpoint(self.model, ckpt, index)
            self.model.eval()
            yield index, ckpt


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


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


__all__ = ["Checkpoint", "as_checkpoints", "read_checkpoint", "check_checkpoint", "load_checkpoint",
           "checked_checkpoints", "preserved_weights", "checkpoint_loop", "model_device", "fingerprint"]
