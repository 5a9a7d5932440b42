"""Splitting work across processes: shards of the training set and the few collectives the
methods issue when a ``torch.distributed`` process group is running.

* ``shards``: ``Shard`` (a contiguous range of training examples, shard i of n) and
  ``shard_of(n, index, count)``, the one split used everywhere (job arrays, torchrun ranks,
  offline merges), so a shard written by any launcher is found by any other;
  ``shard_loader(train, shard)`` the loader of its examples; ``batch_shard(n, batch, i, count)``
  the same split at batch boundaries (a shard's batches are the full loader's).
* ``manifest``: per-shard manifests (settings hash, data fingerprint of the shard's examples) and
  the pure merge of finished shards from any number of processes (``cover``, ``check_settings``,
  ``check_data``), with ``MissingShards`` naming what is missing.
* ``ranks``: ``rank_shard(loader)``, this rank's shard of a loader under a process group;
  ``check_world`` refuses scoring with another world size than the fit's; ``together`` makes an
  error in one rank's pass raise on every rank (no rank left waiting in a collective).
* ``collectives``: ``process_group()`` reads (rank, world size) from an initialised group (the
  library never initialises one and never chooses a backend) and ``all_reduce_sum`` adds tensors
  across ranks in buckets, refusing ranks whose tensors differ in shape or dtype.
"""
from .collectives import Group, all_reduce_sum, barrier, process_group
from .loaders import shard_loader
from .manifest import (MissingShards, Piece, ShardManifest, check_data, check_settings, cover, merged_fingerprint,
                       read_manifest, settings_hash, shard_directory, shard_manifests, write_manifest)
from .ranks import check_world, rank_shard, together
from .shards import Shard, batch_shard, shard_of

__all__ = ["Shard", "shard_of", "batch_shard", "shard_loader", "Group", "process_group", "all_reduce_sum", "barrier",
           "MissingShards", "Piece", "ShardManifest", "check_data", "check_settings", "cover", "merged_fingerprint",
           "read_manifest", "settings_hash", "shard_directory", "shard_manifests", "write_manifest", "rank_shard", "check_world",
           "together"]
