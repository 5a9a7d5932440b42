"""The loader of one shard: the examples [start, stop) of a sequential training loader.

A method that works on a shard passes over ``shard_loader(train, shard)``: a DataLoader over
``Subset(train.dataset, range(start, stop))`` with the training loader's batch size, collate
function, workers and pinning. Example i of the shard is example ``start + i`` of the full
loader (the loader is checked to be sequential first, ``utils.loaders.check_loader``); its
per-example data digests (``store.fingerprint``) do not depend on batching, so a shard's
fingerprint is the slice of the whole set's.
"""
from __future__ import annotations

from torch.utils.data import DataLoader, Subset

from ..utils.loaders import check_loader
from .shards import Shard


def shard_loader(loader, shard: Shard, what: str = "train") -> DataLoader:
    """A DataLoader over examples [shard.start, shard.stop) of ``loader`` (a sequential
    DataLoader over a map-style dataset), batched as ``loader`` is."""
    check_loader(loader, what)
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or dataset is None or not hasattr(dataset, "__len__"):
        raise TypeError(f"the {what} loader must be a torch DataLoader over a map-style dataset (with __len__) "
                        f"to be split into shards, got {type(loader).__name__}")
    if loader.batch_size is None:
        raise TypeError(f"the {what} loader uses a custom batch_sampler; shards need a DataLoader with batch_size")
    if shard.stop > len(dataset):
        raise ValueError(f"shard [{shard.start}, {shard.stop}) reaches past the {len(dataset)} examples of the "
                         f"{what} loader")
    return DataLoader(Subset(dataset, range(shard.start, shard.stop)), batch_size=loader.batch_size,
                      shuffle=False, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, drop_last=False)
