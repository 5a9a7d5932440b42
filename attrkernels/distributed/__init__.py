"""Splitting work across processes: shards of the training set and the few collectives the
methods issue when a ``torch.distributed`` process group is running.

* ``shards``: ``Shard`` (a contiguous range of training examples, shard i of n) and
  ``shard_of(n, index, count)``, the one split used everywhere (job arrays, torchrun ranks,
  offline merges), so a shard written by any launcher is found by any other;
  ``shard_loader(train, shard)`` the loader of its examples.
* ``collectives``: ``process_group()`` reads (rank, world size) from an initialised group (the
  library never initialises one and never chooses a backend) and ``all_reduce_sum`` adds tensors
  across ranks in buckets, refusing ranks whose tensors differ in shape or dtype.
* ``rows``: ``SharedRows``, the training rows of a score matrix split across ranks, each rank
  writing its rows into one shared ``.npy`` file (never a gather of the whole matrix);
  ``rank_shard(loader)`` this rank's shard of a loader, ``write_rows`` its rows at once.
"""
from .collectives import Group, all_reduce_sum, process_group
from .loaders import shard_loader
from .rows import SharedRows, rank_shard, write_rows
from .shards import Shard, shard_of

__all__ = ["Shard", "shard_of", "shard_loader", "Group", "process_group", "all_reduce_sum", "SharedRows", "rank_shard", "write_rows"]
