"""This rank's training rows under a process group: ``rank_shard(loader)`` is shard ``rank`` of
``world size`` of the loader's examples (``shard_of``), None without a group. Methods whose
passes have no per-batch randomness split the rows of their passes and scores this way."""
from __future__ import annotations

from .collectives import process_group
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
