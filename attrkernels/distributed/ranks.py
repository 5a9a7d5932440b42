"""This rank's training rows under a process group, and rank-local work that fails together.

``rank_shard(loader)`` is shard ``rank`` of ``world size`` of the loader's examples
(``shard_of``), None without a group: methods whose passes have no per-batch randomness split the
rows of their passes and scores this way. ``check_world`` refuses scoring with another world size
than the fit's. ``with together(what):`` wraps a rank's pass so that an error on one rank (a
non-finite example in its shard) raises on every rank rather than leaving the others blocked in
the next collective, and names a bad example by its index in the whole training set."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..utils.errors import ExampleError
from .collectives import Group, all_reduce_sum, process_group
from .shards import Shard, shard_of


def check_world(fitted: int, method: str) -> None:
    """Refuse to score with another world size than ``fit`` ran with, for methods that keep
    their shard from ``fit`` (rows would be missing or written twice)."""
    now = process_group().size
    if now != fitted:
        raise RuntimeError(f"{method} was fitted with {fitted} process(es) and scores with {now}: its training rows "
                           "were split at fit; call fit again in this process group")


def rank_shard(loader) -> Shard | None:
    """Shard (rank, world size) of the loader's examples, or None without a process group; the
    loader must have a dataset with a length."""
    group = process_group()
    if not group.distributed:
        return None
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise TypeError("under a process group the train loader is split into shards: pass a torch DataLoader over "
                        f"a map-style dataset (with __len__), got {type(loader).__name__}")
    return shard_of(len(dataset), group.rank, group.size)


def _in_whole_set(err: Exception, shard: Shard | None) -> Exception:
    """An ExampleError of a pass over ``shard`` with its indices shifted into the whole training set."""
    if not isinstance(err, ExampleError) or shard is None or not shard.start:
        return err
    return ExampleError(err.problem, [shard.start + i for i in err.examples], fix=err.fix, where=err.where)


@contextmanager
def together(what: str, shard: Shard | None = None, group: Group | None = None):
    """Run a block of rank-local work (a pass over the rank's ``shard``) so that an error on one
    rank stops every rank instead of leaving the others waiting in the next collective: after the
    block, one ``all_reduce_sum`` of a [world size] flag vector; the failed rank re-raises its
    error, the others raise a RuntimeError naming the failed ranks. An ``ExampleError`` of the
    pass names the examples' indices in the whole training set (shifted by ``shard.start``).
    ``group``: the ranks that run the block together (default: the process group; ``Group()`` for
    a process that runs its shard alone, e.g. ``fit(shard=...)`` under a group)."""
    group = process_group() if group is None else group
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001  (re-raised below, after the other ranks learn of it)
        error = err
    if group.distributed:
        failed = torch.zeros(group.size, dtype=torch.int64)
        failed[group.rank] = int(error is not None)
        all_reduce_sum([failed], what=f"the error flags of {what}")
        if error is None and bool(failed.any()):
            ranks = torch.nonzero(failed).flatten().tolist()
            raise RuntimeError(f"rank {group.rank}: {what} failed on rank(s) {ranks} (their error names the "
                               "cause); every rank stops")
    if error is not None:
        located = _in_whole_set(error, shard)
        if located is error:
            raise error
        raise located from error
