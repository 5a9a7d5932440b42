"""Which part of the training set this process fits on, and how its sums are combined.

Three ways to run ``fit`` (the stage sums are the same either way; only who adds them differs):

* one process, no process group: the whole train loader, nothing combined;
* under an initialised ``torch.distributed`` group (torchrun, ...): rank r of W passes over shard
  r of W, and each stage's sums are added by one bucketed ``all_reduce_sum``;
* ``shard=(i, n)`` or a ``Shard``: this process passes over that shard alone and writes its
  partial sums to the store (``partials``), with no collective (even under a process group);
  whichever process finds the partial files covering every example adds them.

The split is by batches: shard i of n holds whole batches of the train loader
(``distributed.batch_shard``), so every batch, and with ``fisher="true"`` its sampled labels
(seeded by the batch's first example), is the one a single process sees, and the sharded factors equal the
one-process factors up to the rounding of the sums. An explicit ``Shard`` that does not start
on a batch boundary is refused for the true Fisher for that reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...distributed import Group, Shard, all_reduce_sum, batch_shard, process_group, shard_loader


@dataclass(frozen=True)
class Split:
    """This process's part of the fit: ``shard`` None means the whole loader (one process);
    ``offline`` a shard given explicitly (partial files, no collectives)."""

    shard: Shard | None
    group: Group
    offline: bool = False

    def loader(self, train):
        return train if self.shard is None else shard_loader(train, self.shard)

    @property
    def writer(self) -> bool:
        """Whether this process writes the store's merged files (rank 0 of a group)."""
        return self.group.rank == 0


def _train_size(train) -> tuple[int, int]:
    dataset, batch_size = getattr(train, "dataset", None), getattr(train, "batch_size", None)
    if dataset is None or not hasattr(dataset, "__len__") or not batch_size:
        raise TypeError("a sharded fit needs a torch DataLoader over a map-style dataset with a batch_size, "
                        f"got {type(train).__name__}")
    return len(dataset), batch_size


def split_of(train, shard, fisher: str) -> Split:
    """The Split for ``fit(train, shard=...)``: None takes (rank, world size) from the process
    group (the whole loader without one), ``(i, n)`` shard i of n (``distributed.batch_shard``), a ``Shard``
    its range (checked against the loader)."""
    if shard is None:
        group = process_group()
        if not group.distributed:
            return Split(None, group)
        n, batch_size = _train_size(train)
        return Split(batch_shard(n, batch_size, group.rank, group.size), group)
    n, batch_size = _train_size(train)
    if isinstance(shard, tuple) and len(shard) == 2:
        index, count = shard
        for name, value in (("shard index", index), ("shard count", count)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"shard must be (index, count) ints or a Shard, got {name} {value!r}")
        if not 0 <= index < count:
            raise ValueError(f"shard=(index, count) needs 0 <= index < count, got {shard}")
        return Split(batch_shard(n, batch_size, index, count), Group(), offline=True)
    if not isinstance(shard, Shard):
        raise TypeError(f"shard must be None, (index, count) or a Shard, got {type(shard).__name__}")
    if shard.n is not None and shard.n != n or shard.stop > n:
        raise ValueError(f"shard [{shard.start}, {shard.stop}) of {shard.n} examples does not fit the train "
                         f"loader's {n} examples")
    if fisher == "true" and shard.start % batch_size and shard.start != n:
        raise ValueError(f"shard [{shard.start}, {shard.stop}) does not start on a batch boundary (batch_size "
                         f"{batch_size}): with fisher='true' its batches, and so their sampled labels, would differ "
                         "from a single process's; pass shard=(index, count), which splits by batches")
    return Split(Shard(shard.start, shard.stop, shard.index, shard.count, n), Group(), offline=True)


def agree(flags: list, group: Group, what: str) -> list:
    """``flags`` (booleans) when every rank of the group has the same (one small all-reduce); a
    RuntimeError on every rank when they differ (e.g. a store directory the ranks do not share)."""
    flags = [bool(f) for f in flags]
    if not group.distributed:
        return flags
    counts = torch.tensor([int(f) for f in flags], dtype=torch.int64)
    all_reduce_sum([counts], what=what)
    if any(0 < int(c) < group.size for c in counts):
        raise RuntimeError(f"rank {group.rank}: the ranks disagree on {what} (counts {counts.tolist()} of "
                           f"{group.size}); every rank must see the same store directory (a shared filesystem)")
    return flags
