"""Where ``score(..., out=)`` puts the scores [n_train, n_test]: one meaning for every method.

``out`` is

- ``None``: a new float32 torch tensor, returned;
- a path (``str`` or ``Path``): a float32 ``.npy`` file, written as a memory map under a
  temporary name beside it (``<out>.tmp.<pid>``) and renamed to ``out`` once complete, so a killed
  job never leaves a partial file under that name (the temporary file is removed on error);
  returned as a torch tensor over the memory map (``np.load(out, mmap_mode="r+")``);
- an existing [n_train, n_test] torch tensor or NumPy array (e.g. a memmap) of floats: filled in
  place and returned itself.

A method writes tiles of training rows in increasing order, for each checkpoint:

    with ScoreOutput(out, n_test, n_train=n) as dest:        # n_train None: learnt from the rows
        for start, tile in ...:                              # tile [rows, n_test] torch tensor
            dest.write(start, tile, first=k == 0)            # = tile, or += tile when not first
        return dest.finish(rows=n)

``n_train`` may be unknown up front (a loader streamed once): then a path needs it (ValueError),
``out=None`` keeps the tiles of the first checkpoint and concatenates them, and a given array is
checked as the rows arrive. ``finish(rows)`` checks that the rows written cover ``out``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


class ScoreOutput:
    """The destination of ``score(..., out=)``; see the module docstring for the contract."""

    def __init__(self, out, n_test: int, n_train: int | None = None):
        self.n_test, self.n_train = int(n_test), n_train
        self._tiles: list | None = None  # out=None with n_train unknown: tiles of the first pass
        self._tmp = self._path = None
        if out is None:
            if n_train is None:
                self.array, self._tiles = None, []
            else:
                self.array = torch.zeros(n_train, self.n_test)
        elif isinstance(out, (str, Path)):
            if n_train is None:
                raise ValueError("out= a path needs the number of training examples up front; pass a train "
                                 "loader whose dataset has a length, or an array to fill")
            self._path, self._tmp = Path(out), f"{out}.tmp.{os.getpid()}"
            self.array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.float32,
                                                   shape=(n_train, self.n_test))
        elif torch.is_tensor(out) or isinstance(out, np.ndarray):
            if out.ndim != 2 or out.shape[1] != self.n_test or (n_train is not None and out.shape[0] != n_train):
                rows = "n_train" if n_train is None else n_train
                raise ValueError(f"out has shape {tuple(out.shape)}; the scores are [{rows}, {self.n_test}]")
            self.array = out
        else:
            raise TypeError("out must be None, a path or a [n_train, n_test] tensor or array, got "
                            f"{type(out).__name__}")

    def __enter__(self) -> "ScoreOutput":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._tmp is not None:
            self.array = None
            Path(self._tmp).unlink(missing_ok=True)

    def write(self, start: int, tile: torch.Tensor, *, first: bool = True) -> None:
        """Rows [start, start + len(tile)) = tile (``first``) or += tile."""
        if self._tiles is not None:
            if first:
                self._tiles.append(tile)
                return
            self.array, self._tiles = torch.cat(self._tiles), None
        stop = start + tile.shape[0]
        if stop > self.array.shape[0] or tuple(self.array.shape[1:]) != tuple(tile.shape[1:]):
            raise ValueError(f"out has shape {tuple(self.array.shape)}, too small for rows [{start}, {stop}) of "
                             f"{tile.shape[1]} test examples")
        values = tile if torch.is_tensor(self.array) else tile.detach().cpu().numpy()
        if first:
            self.array[start:stop] = values
        else:
            self.array[start:stop] += values

    def finish(self, rows: int | None = None):
        """The scores: the tensor, the array given as ``out``, or a tensor over the renamed memory map.
        ``rows``: how many training rows were written (checked against ``out``'s)."""
        if self._tiles is not None:
            self.array, self._tiles = torch.cat(self._tiles), None
        if rows is not None and self.array.shape[0] != rows:
            raise ValueError(f"out has {self.array.shape[0]} rows but the train loader yielded {rows} examples")
        if self._tmp is None:
            return self.array
        self.array.flush()
        self.array = None
        os.replace(self._tmp, self._path)
        self._tmp = None
        return torch.from_numpy(np.load(self._path, mmap_mode="r+"))


__all__ = ["ScoreOutput"]
