"""A score matrix (or vector) whose training rows are split across the ranks of a process group.

Under a process group, scoring splits the training axis: rank r computes the rows of its shard
and writes them into one shared float32 ``.npy`` file, so no rank ever holds or gathers the
whole [n_train, ...] matrix. ``out`` must then be a path on a filesystem every rank sees:

    with SharedRows(out, (n_train, n_test), shard) as dest:   # rank 0 creates <out>.tmp.shared
        dest.write(start, tile, first=k == 0)                  # rows shard.start + start, ...
        scores = dest.finish()                                 # renamed to out on every rank

Rank 0 creates the file under a temporary name and every rank opens it after a barrier; at
``finish`` every rank flushes its rows, a barrier, rank 0 renames the file to ``out``, a barrier,
and every rank returns a read-only torch view of the memory map. Each rank issues the same two
barriers at open and two at finish, whatever its shard (an empty one writes nothing). A run killed
before ``finish`` leaves only the temporary file, never a partial ``out``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .collectives import process_group
from .shards import Shard, shard_of


def rank_shard(loader) -> Shard | None:
    """This rank's shard of the loader's examples under a process group (``shard_of(n, rank,
    world size)``); None without one. The loader must have a dataset with a length."""
    group = process_group()
    if not group.distributed:
        return None
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise TypeError("under a process group the train loader is split into shards: pass a torch DataLoader over "
                        f"a map-style dataset (with __len__), got {type(loader).__name__}")
    return shard_of(len(dataset), group.rank, group.size)


def write_rows(out, rows: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Write this rank's ``rows`` (shard.stop - shard.start of them) into the shared file ``out``
    and return a view of the whole file (every rank calls it)."""
    with SharedRows(out, (shard.n, *rows.shape[1:]), shard) as dest:
        dest.write(0, rows)
        return dest.finish()


def _barrier() -> None:
    torch.distributed.barrier()


class SharedRows:
    """Rows [shard.start, shard.stop) of a float32 array of ``shape`` in the file ``out``, the
    other rows written by the other ranks (see the module docstring)."""

    def __init__(self, out, shape: tuple, shard: Shard):
        if not isinstance(out, (str, Path)):
            raise ValueError("under a torch.distributed process group each rank writes its rows of the scores to one "
                             "shared file: pass out= a path on a filesystem every rank sees (got "
                             f"{type(out).__name__}); the scores are never gathered on one rank")
        self.group = process_group()
        self.shape, self.shard = tuple(int(s) for s in shape), shard
        self.path, self.tmp = Path(out), Path(f"{out}.tmp.shared")
        if self.group.rank == 0:
            np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=self.shape).flush()
        _barrier()
        self.array = np.load(self.tmp, mmap_mode="r+")

    def __enter__(self) -> "SharedRows":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.array = None

    def write(self, start: int, tile: torch.Tensor, *, first: bool = True) -> None:
        """Rows shard.start + [start, start + len(tile)) = tile (``first``) or += tile."""
        lo = self.shard.start + start
        hi = lo + tile.shape[0]
        if hi > self.shard.stop or tuple(tile.shape[1:]) != self.shape[1:]:
            raise ValueError(f"rows [{lo}, {hi}) of shape {tuple(tile.shape[1:])} do not fit the shard "
                             f"[{self.shard.start}, {self.shard.stop}) of scores {self.shape}")
        values = tile.detach().cpu().numpy()
        if first:
            self.array[lo:hi] = values
        else:
            self.array[lo:hi] += values

    def finish(self) -> torch.Tensor:
        """Flush this rank's rows, rename the complete file to ``out`` and return a view of it."""
        self.array.flush()
        self.array = None
        _barrier()
        if self.group.rank == 0:
            os.replace(self.tmp, self.path)
        _barrier()
        return torch.from_numpy(np.load(self.path, mmap_mode="r+"))
