"""Where ``score(..., out=)`` puts the scores [n_train, n_test]: one meaning for every method.

``out`` is

- ``None``: a new float32 torch tensor, returned;
- a path (``str`` or ``Path``): a float32 ``.npy`` file, written under a temporary name beside it
  (``<out>.tmp.<pid>``) and renamed to ``out`` once complete, so a killed job never leaves a
  partial file under that name (the temporary file is removed on error); tiles go to the file by
  plain positioned writes (not a memory map, whose written pages would stay resident), so memory
  holds one tile whatever the size of the scores; returned as a torch tensor over the memory map
  (``np.load(out, mmap_mode="r+")``);
- an existing [n_train, n_test] torch tensor or NumPy array (e.g. a memmap) of floats: filled in
  place and returned itself.

A method writes tiles of training rows (and, optionally, of test columns), for each checkpoint:

    with ScoreOutput(out, n_test, n_train=n) as dest:        # n_train None: learnt from the rows
        for start, tile in ...:                              # tile [rows, cols] torch tensor
            dest.write(start, tile, first=k == 0, col=c0)    # = tile, or += tile when not first
        return dest.finish(rows=n)

``n_train`` may be unknown up front (a loader streamed once): then a path needs it (ValueError),
``out=None`` keeps the tiles of the first checkpoint and concatenates them (whole rows only), and
a given array is checked as the rows arrive. ``finish(rows)`` checks that the rows written cover
``out``.

Under a process group (``group=distributed.process_group()`` with more than one rank) every rank
writes its own rows of one shared output: a path is created by rank 0 as ``<out>.tmp.group``,
filled by every rank, and renamed by rank 0 when all have finished (three barriers, issued by
every rank in the same order); a given array is filled in place by each rank (pass every rank a
memory map of one shared file); ``None`` is refused (it would need a gather of the whole matrix).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..distributed.collectives import barrier, process_group


class ScoreOutput:
    """The destination of ``score(..., out=)``; see the module docstring for the contract."""

    def __init__(self, out, n_test: int, n_train: int | None = None, group=None):
        self.n_test, self.n_train, self.group = int(n_test), n_train, group
        self._tiles: list | None = None  # out=None with n_train unknown: tiles of the first pass
        self._tmp = self._path = self._file = None
        shared = group is not None and group.distributed
        if out is None:
            if shared:
                raise ValueError("under a process group each rank scores its own training rows: pass out= a path "
                                 "on a file system every rank sees (or a memory map of one shared file), not None")
            if n_train is None:
                self.array, self._tiles = None, []
            else:
                self.array = torch.zeros(n_train, self.n_test)
        elif isinstance(out, (str, Path)):
            if n_train is None:
                raise ValueError("out= a path needs the number of training examples up front; pass a train "
                                 "loader whose dataset has a length, or an array to fill")
            self._path = Path(out)
            self._tmp = Path(f"{out}.tmp.group" if shared else f"{out}.tmp.{os.getpid()}")
            if not shared or group.rank == 0:
                np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.float32, shape=(n_train, self.n_test))._mmap.close()
            if shared:
                barrier()
            self._header = _npy_header(self._tmp, (n_train, self.n_test))
            self._file = open(self._tmp, "r+b")
            self.array = None
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
            self._close()
            if self.group is None or not self.group.distributed or self.group.rank == 0:
                self._tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, start: int, tile: torch.Tensor, *, first: bool = True, col: int = 0) -> None:
        """Rows [start, start + len(tile)), columns [col, col + tile.shape[1]) = tile (``first``) or += tile."""
        stop, cols = start + tile.shape[0], tile.shape[1]
        if self._tiles is not None:
            if col or cols != self.n_test:
                raise ValueError("out=None with an unknown number of training rows takes whole rows")
            if first:
                self._tiles.append(tile)
                return
            self.array, self._tiles = torch.cat(self._tiles), None
        rows = self.n_train if self._file is not None else self.array.shape[0]
        if stop > rows or col + cols > self.n_test:
            raise ValueError(f"out has shape {(rows, self.n_test)}, too small for rows [{start}, {stop}) and "
                             f"columns [{col}, {col + cols})")
        if self._file is not None:
            self._write_file(start, tile.detach().cpu().float().numpy(), first, col)
            return
        values = tile if torch.is_tensor(self.array) else tile.detach().cpu().numpy()
        if first:
            self.array[start:stop, col:col + cols] = values
        else:
            self.array[start:stop, col:col + cols] += values

    def _write_file(self, start: int, values: np.ndarray, first: bool, col: int) -> None:
        """Positioned reads and writes of the .npy file: one per tile of whole rows, else one per row."""
        fd, rows, cols = self._file.fileno(), values.shape[0], values.shape[1]
        row_bytes = 4 * self.n_test
        spans = [(0, rows)] if cols == self.n_test else [(r, r + 1) for r in range(rows)]
        for r0, r1 in spans:
            offset = self._header + (start + r0) * row_bytes + 4 * col
            part = np.ascontiguousarray(values[r0:r1], dtype=np.float32)
            if not first:
                old = np.frombuffer(os.pread(fd, part.nbytes, offset), dtype=np.float32).reshape(part.shape)
                part = part + old
            os.pwrite(fd, part.tobytes(), offset)

    def finish(self, rows: int | None = None):
        """The scores: the tensor, the array given as ``out``, or a tensor over the renamed memory map.
        ``rows``: how many training rows were written (checked against ``out``'s)."""
        if self._tiles is not None:
            self.array, self._tiles = torch.cat(self._tiles), None
        have = self.n_train if self._tmp is not None else self.array.shape[0]
        if rows is not None and have != rows:
            raise ValueError(f"out has {have} rows but the train loader yielded {rows} examples")
        if self._tmp is None:
            return self.array
        os.fsync(self._file.fileno())
        self._close()
        shared = self.group is not None and self.group.distributed
        if shared:
            barrier()
        if not shared or self.group.rank == 0:
            os.replace(self._tmp, self._path)
        if shared:
            barrier()
        self._tmp = None
        return torch.from_numpy(np.load(self._path, mmap_mode="r+"))


def shard_scores(scores: torch.Tensor, out, shard) -> torch.Tensor:
    """The scores of a method that computed its rows in memory: ``scores`` [rows, n_test] of the
    training rows of this process's ``shard`` (None: all rows, one process), written at the
    shard's rows of ``out`` (``ScoreOutput``; under a process group a file every rank sees).
    Returns ``scores`` itself when there is nothing to write (one process, ``out=None``)."""
    if out is None and shard is None:
        return scores
    n = scores.shape[0] if shard is None else shard.n
    with ScoreOutput(out, scores.shape[1], n_train=n, group=process_group()) as dest:
        dest.write(0 if shard is None else shard.start, scores)
        return dest.finish(rows=n)


def _npy_header(path: Path, shape: tuple) -> int:
    """Bytes before the data of a float32 C-order .npy file of ``shape`` (checked)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got, fortran, dtype = read(f)
        if tuple(got) != tuple(shape) or fortran or dtype != np.float32:
            raise ValueError(f"{path} holds a {dtype} {got} array, expected float32 {shape}")
        return f.tell()


__all__ = ["ScoreOutput"]
