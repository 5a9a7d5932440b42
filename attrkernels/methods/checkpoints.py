"""Checkpoints: the weights a method attributes at, and the one loop of a method over them.

A checkpoint is a state_dict, a path saved with ``torch.save``, or a ``Checkpoint`` (a state
dict with the epoch and the learning rate of the last step taken: what
``BuiltinTask.train(..., checkpoints=n)`` returns and TracIn needs); ``None`` stands for the
model's current weights. ``as_checkpoints`` snapshots them when a method's ``fit`` is called:
state dicts are copied (a caller's live ``model.state_dict()`` is not overwritten by loading
another checkpoint, and later changes to the caller's tensors change no result), paths become
``CheckpointFile`` (refused when read again if the file changed); a file that does not hold a
state dict and weights with NaN / Inf are refused naming the checkpoint. Every method visits
its checkpoints with the same loop:

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
import pickle
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm


@dataclass
class Checkpoint:
    """Model state after ``epoch`` epochs; ``lr`` is the learning rate of the last step taken,
    ``lr_sum`` the sum of the learning rates of the ``steps`` optimiser steps taken since the
    previous checkpoint of the run (since initialisation for the first), as SOURCE needs."""

    state_dict: dict
    epoch: int
    lr: float
    lr_sum: float | None = None
    steps: int | None = None


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint file as ``as_checkpoints`` found it: its path, size and modification time.
    Reading it again refuses a file that changed since (another training run wrote over it)."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path, index: int = 0) -> "CheckpointFile":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {index}: no file {path}")
        stat = path.stat()
        return cls(path, stat.st_size, stat.st_mtime_ns)

    def __fspath__(self) -> str:
        return str(self.path)


def _snapshot(state: Mapping) -> dict:
    """A detached copy of a state dict: loading other checkpoints into the model (whose live
    ``state_dict()`` tensors a caller may have passed) or the caller changing its tensors later
    changes no result."""
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def as_checkpoints(model: nn.Module, checkpoints) -> list:
    """The checkpoints to use, snapshotted: the model's current weights when None, else a
    non-empty list of state dicts (copied, so the caller's tensors, e.g. a live
    ``model.state_dict()``, are never read after this call) or paths (``CheckpointFile``: read
    when needed, refused if the file changed since). ``Checkpoint`` objects are unwrapped."""
    if checkpoints is None:
        return [_snapshot(model.state_dict())]
    if isinstance(checkpoints, (Mapping, str, Path, Checkpoint)):
        checkpoints = [checkpoints]
    checkpoints = [c.state_dict if isinstance(c, Checkpoint) else c for c in checkpoints]
    if not checkpoints:
        raise ValueError("checkpoints is empty; pass state_dicts or paths, or None for the model's weights")
    out = []
    for index, c in enumerate(checkpoints):
        if isinstance(c, CheckpointFile):
            out.append(c)
        elif isinstance(c, (str, Path)):
            out.append(CheckpointFile.of(c, index))
        elif isinstance(c, Mapping):
            out.append(_snapshot(c))
        else:
            raise TypeError(f"checkpoint {index} must be a state_dict, a path or a Checkpoint, got "
                            f"{type(c).__name__}" + (" (pass model.state_dict())" if isinstance(c, nn.Module) else ""))
    return out


_STATE_DICT_FIX = "save the weights with torch.save(model.state_dict(), path) and pass that path (or the state_dict)"


def read_checkpoint(ckpt, index: int = 0) -> Mapping:
    """A state_dict from a state_dict, a path saved with ``torch.save(model.state_dict(), path)``
    or a ``CheckpointFile`` (refused when the file changed since ``as_checkpoints``). A file
    holding anything else (a pickled ``nn.Module``) is refused with a TypeError naming it."""
    stamp = ckpt if isinstance(ckpt, CheckpointFile) else None
    if isinstance(ckpt, (str, Path, CheckpointFile)):
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {index}: no file {path}")
        if stamp is not None:
            stat = path.stat()
            if (stat.st_size, stat.st_mtime_ns) != (stamp.size, stamp.mtime_ns):
                raise ValueError(f"checkpoint {index}: the file {path} changed since fit (size or modification "
                                 "time differ), so it may hold other weights; call fit again with the "
                                 "checkpoints you mean, or keep checkpoint files unchanged")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL (\S+)", str(err))
            found = f" ({found.group(1)})" if found else ""
            raise TypeError(f"checkpoint {index}: {path} is not a state_dict file: it holds pickled Python "
                            f"objects{found}, e.g. a whole model saved with torch.save(model); "
                            f"{_STATE_DICT_FIX}") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise ValueError(f"checkpoint {index}: {path} cannot be read as a state_dict ({type(err).__name__}: "
                             f"{str(err)[:200]}); {_STATE_DICT_FIX}") from None
        if not isinstance(ckpt, Mapping):
            raise TypeError(f"checkpoint {index}: {path} holds a {type(ckpt).__name__}, not a state_dict; "
                            f"{_STATE_DICT_FIX}")
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"checkpoint {index} must be a state_dict or a path, got {type(ckpt).__name__}")
    return ckpt


def check_checkpoint(model: nn.Module, state: Mapping, index: int = 0) -> None:
    """A ValueError naming what of the state dict does not match the model (keys, shapes) or
    holds NaN / Inf (naming the checkpoint and the entry)."""
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
    for key, value in state.items():
        # A finite sum means no NaN / Inf (they propagate): one reduction, 0.015 s for GPT-2's
        # 38.6M-float token table against 0.37 s for isfinite().all(), which runs only after an
        # overflowing or non-finite sum.
        if (torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value.sum()))
                and not bool(torch.isfinite(value).all())):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"checkpoint {index}: {key!r} has {bad} NaN or Inf value{'s' * (bad > 1)}; "
                             "attribution at diverged weights is meaningless: pass a checkpoint saved before "
                             "training diverged, or leave this one out")


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


__all__ = ["Checkpoint", "CheckpointFile", "as_checkpoints", "read_checkpoint", "check_checkpoint", "load_checkpoint",
           "checked_checkpoints", "preserved_weights", "checkpoint_loop", "model_device", "fingerprint"]
