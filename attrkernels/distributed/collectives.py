"""The process group a method runs in, and bucketed sums across it.

The library never initialises a process group and never picks a backend: when the caller has
initialised one (torchrun, ``accelerate launch``, Ray Train: gloo on CPU, nccl on GPU), methods
take their shard from (rank, world size); otherwise they run as one process. Every rank must call
the collectives in the same order with tensors of the same shapes: ``all_reduce_sum`` checks the
shapes and dtypes of every rank against each other first (two small all-reduces) and raises on all
ranks alike when they differ, rather than adding mismatched buffers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 64 << 20


@dataclass(frozen=True)
class Group:
    """(rank, world size) of the running process group; (0, 1) when there is none."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1


def process_group() -> Group:
    """The caller's ``torch.distributed`` default group, if one is initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def _signature(tensors: list[torch.Tensor]) -> int:
    """A 62-bit hash of the tensors' shapes and dtypes (equal on every rank when they agree)."""
    text = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in tensors)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def _device_of(tensors: list[torch.Tensor]) -> torch.device:
    """Where the group's buffers live: CUDA for nccl, the CPU otherwise."""
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensors[0].device if tensors else torch.device("cpu")


def all_reduce_sum(tensors: list[torch.Tensor], *, what: str = "tensors",
                   bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Replace every tensor by its sum over the ranks of the process group, in place.

    Tensors are packed per dtype into flat buckets of at most ``bucket_bytes`` (one all-reduce per
    bucket, not per tensor). Before any sum, the shapes and dtypes of all ranks are compared
    (max and min of a hash); a mismatch raises a RuntimeError naming ``what`` on every rank.
    Without a process group (or with one rank) nothing happens.
    """
    group = process_group()
    if not group.distributed:
        return
    dist = torch.distributed
    device = _device_of(tensors)
    sig = _signature(tensors)
    check = torch.tensor([sig, -sig], dtype=torch.int64, device=device)
    dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if int(check[0]) != sig or int(check[1]) != -sig:
        raise RuntimeError(f"rank {group.rank}: the {what} to sum differ in shape or dtype between ranks; every "
                           "rank must run the same method with the same settings on the same model")
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, same in by_dtype.items():
        per_bucket = max(1, bucket_bytes // torch.empty((), dtype=dtype).element_size())
        for bucket in _buckets(same, per_bucket):
            flat = torch.cat([b.reshape(-1).to(device) for b in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()


def barrier() -> None:
    """Wait for every rank of the process group (nothing without one)."""
    if process_group().distributed:
        torch.distributed.barrier()


def _buckets(tensors: list[torch.Tensor], per_bucket: int):
    """Consecutive groups of tensors of at most ``per_bucket`` elements (a larger tensor alone)."""
    bucket, filled = [], 0
    for t in tensors:
        if bucket and filled + t.numel() > per_bucket:
            yield bucket
            bucket, filled = [], 0
        bucket.append(t)
        filled += t.numel()
    if bucket:
        yield bucket
