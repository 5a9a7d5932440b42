"""Contiguous shards of n training examples: shard ``index`` of ``count``.

The split is balanced and depends only on (n, index, count): the first ``n % count`` shards hold
``n // count + 1`` examples, the others ``n // count``; with more shards than examples the last
ones are empty. A shard is named by its example range, so files written by shards of one split
can be opened by a run with any other number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Examples [start, stop) of a training set of ``n`` examples; shard ``index`` of ``count``."""

    start: int
    stop: int
    index: int = 0
    count: int = 1
    n: int | None = None

    def __post_init__(self):
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"shard range must satisfy 0 <= start <= stop, got [{self.start}, {self.stop})")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must lie in [0, count={self.count}), got {self.index}")
        if self.n is not None and self.stop > self.n:
            raise ValueError(f"shard [{self.start}, {self.stop}) reaches past the {self.n} training examples")

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        """``"<start>-<stop>"``: how files of this shard are named."""
        return f"{self.start:012d}-{self.stop:012d}"

    def contains(self, i: int) -> bool:
        return self.start <= i < self.stop


def shard_of(n: int, index: int = 0, count: int = 1) -> Shard:
    """Shard ``index`` of ``count`` balanced contiguous shards of ``n`` examples."""
    for name, value, low in (("n", n, 0), ("count", count, 1), ("index", index, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if index >= count:
        raise ValueError(f"index must lie in [0, count={count}), got {index}")
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return Shard(start, start + base + (index < extra), index, count, n)


def batch_shard(n: int, batch: int, index: int = 0, count: int = 1) -> Shard:
    """Shard ``index`` of ``count`` of n examples split at multiples of ``batch``: the balanced
    split (``shard_of``) of the ceil(n / batch) batches, in examples. Every shard then starts a
    batch of the full loader, so a shard's batches are the full run's batches (bit-identical
    features)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    b = shard_of(-(-n // batch), index, count)
    return Shard(min(b.start * batch, n), min(b.stop * batch, n), index, count, n)
