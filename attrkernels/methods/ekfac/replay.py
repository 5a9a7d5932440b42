"""The covariance pass's captures, kept for the eigenvalue correction of the same checkpoint.

Both factor stages need, per training batch, the tracked layers' inputs a and output-gradients
delta under the Fisher's loss. When the captures of the whole covariance pass fit in ``budget``
bytes they are kept, and the correction stage reads them instead of running the model again:

* ``fisher="empirical"``: both stages use the dataset's labels, so the captures are reused as
  they are (one forward + backward over the training data instead of two);
* ``fisher="true"``: the correction draws labels independent of the covariance pass's (reusing
  the same draws fits the eigenbasis and the eigenvalues to the same noise: 0.69 -> 0.62 LDS
  for EK-FAC on the digits MLP). The covariance pass then asks the task for both stages' losses
  from one forward pass (``task.sampled_losses``), accumulates the covariances after the first
  backward pass and keeps the output-gradients of a second one at the correction's labels (one
  forward + two backward passes instead of two of each). A task without ``sampled_losses``
  keeps nothing.

The stage sums are the same either way: the model, the batches and the labels drawn are the
same, so the replayed captures are the ones a second pass would recompute (tested bit for bit).

``default_budget(device)``: a quarter of the memory available when the fit starts (the host's
MemAvailable for a CPU model, the free memory of a CUDA device), 0 elsewhere.
"""
from __future__ import annotations

import os

import torch


def default_budget(device: torch.device) -> int:
    """A quarter of the memory available now on ``device`` (0 when it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    if device.type != "cpu":
        return 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 0


def capture_bytes(handlers: dict) -> int:
    """Bytes of the storages the records of ``handlers`` keep alive (each storage counted once)."""
    seen, total = set(), 0
    for handler in handlers.values():
        for record in handler.records:
            for t in (record.inputs, record.grad_out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
    return total


class Replay:
    """The (size, handlers) of every batch of one covariance pass (checkpoint ``k``, shard
    range ``span``) while their captures stay under ``budget`` bytes; dropped beyond it."""

    def __init__(self, k: int, span, budget: int):
        self.k, self.span, self.budget = k, span, budget
        self.batches: list = []
        self.bytes = 0
        self.dropped = budget <= 0

    def add(self, size: int, handlers: dict) -> None:
        if self.dropped:
            return
        self.bytes += capture_bytes(handlers)
        if self.bytes > self.budget:
            self.batches, self.dropped = [], True
        else:
            self.batches.append((size, handlers))

    def serves(self, k: int, span) -> bool:
        """Whether this holds the whole covariance pass of checkpoint ``k`` over ``span``."""
        return not self.dropped and self.k == k and self.span == span
