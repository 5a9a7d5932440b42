"""Tensors written to an anonymous file on disk and read back: the tier of ``replay.Replay`` for
the batches kept beyond its memory budget (``EKFAC(spill_dir=...)``).

A kept batch of GPT-2-small (128 positions) holds 75 MB of captured inputs and output-gradients
a sequence; a few hundred sequences do not fit in memory beside the factors and the queries, and
without a disk tier the batches past the budget cost a forward + backward pass of the model
again at the correction and at the scores (~1.2 s a sequence on one core, against ~0.08 s to
write and read its 75 MB at the 1 GB/s of this machine's disk).

The file is created unlinked (``tempfile.TemporaryFile``): it has no name, nothing else can open
it, and the OS frees its blocks when it is closed or the process dies, so a killed job leaves
nothing behind. A write that would leave less than ``reserve`` bytes free on the disk is refused
(``room``) rather than filling the disk.

Writes happen behind the caller: ``write`` hands the tensor to one background thread and returns
where it will be, holding the tensor until its bytes are in the file, so the model's next batch
runs while the last one is written (GPT-2-small, 48 sequences with every batch on disk: the
writes took 4.8 s of the covariance and correction stages on the caller's thread, 0.2 s now).
At most ``behind`` bytes wait; a ``write`` that leaves more waits for the oldest. A read of a
tensor still waiting waits for it. A write that fails (the disk filled up anyway) keeps its
tensor in memory, where reads find it, and every later ``write`` raises that OSError, so the
caller stops writing: what was written is never lost, and memory grows by at most ``behind``
bytes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# Bytes waiting to be written at most: about two and a half GPT-2-small batches of 8 sequences
# (600 MB each).
DEFAULT_BEHIND = 1536 << 20


@dataclass(frozen=True)
class Spilled:
    """Where ``SpillFile.write`` put a tensor: ``nbytes`` bytes at ``offset``, read back as a
    contiguous tensor of ``shape`` / ``dtype`` on ``device``."""

    offset: int
    nbytes: int
    shape: tuple
    dtype: torch.dtype
    device: torch.device


def default_reserve(directory) -> int:
    """Bytes a spill leaves free on the disk of ``directory``: 5% of it, at least 1 GiB."""
    return max(1 << 30, shutil.disk_usage(directory).total // 20)


class SpillFile:
    """An anonymous file in ``directory``, created at the first write; tensors are appended
    (``write``, in a background thread) and read back (``read``). A written tensor must not be
    modified afterwards: it may not be in the file yet."""

    def __init__(self, directory, reserve: int | None = None, behind: int = DEFAULT_BEHIND):
        self.file, self._writer = None, None
        self._lock = threading.Lock()
        self._waiting: dict = {}  # offset -> (tensor, future) of the writes not in the file
        self._waiting_bytes = 0
        self.failure: Exception | None = None  # the first write that failed
        self.size = 0
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"spill_dir {directory!r} is not a directory")
        if behind < 0:
            raise ValueError(f"behind must be >= 0 bytes, got {behind}")
        self.directory, self.behind = directory, behind
        self.reserve = default_reserve(directory) if reserve is None else reserve

    def room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more can be written and leave ``reserve`` bytes free on the disk."""
        with self._lock:
            waiting = self._waiting_bytes
        return shutil.disk_usage(self.directory).free - waiting - nbytes >= self.reserve

    def write(self, t: torch.Tensor) -> Spilled:
        """Append ``t``'s values (row-major) and return where they are; raises the OSError of an
        earlier write that failed."""
        if self.failure is not None:
            raise OSError(f"an earlier write to the spill file in {self.directory!r} failed: {self.failure}")
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.directory)
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="spill")
        t = t.detach()
        ref = Spilled(self.size, t.numel() * t.element_size(), tuple(t.shape), t.dtype, t.device)
        self.size += ref.nbytes
        if not ref.nbytes:
            return ref
        with self._lock:
            self._waiting_bytes += ref.nbytes
            self._waiting[ref.offset] = (t, self._writer.submit(self._put, t, ref))
        self._wait_below(self.behind)
        return ref

    def _put(self, t: torch.Tensor, ref: Spilled) -> None:
        try:
            raw = t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            written = 0
            while written < ref.nbytes:  # pwrite may write less than asked (e.g. interrupted)
                written += os.pwrite(self.file.fileno(), raw[written:], ref.offset + written)
        except Exception as err:  # an OSError, or e.g. a device copy that failed
            with self._lock:
                self.failure = self.failure or err
            raise
        with self._lock:
            del self._waiting[ref.offset]
            self._waiting_bytes -= ref.nbytes

    def _wait_below(self, nbytes: int) -> None:
        """Wait for the oldest writes until at most ``nbytes`` wait (failed ones count as done)."""
        while True:
            with self._lock:
                if self._waiting_bytes <= nbytes:
                    return
                running = [f for _, f in self._waiting.values() if not f.done()]
            if not running:
                return
            running[0].exception()  # waits; a failure is recorded by _put

    def flush(self) -> None:
        """Wait until every write is in the file (or failed), so the memory of the tensors
        written so far is the caller's to free."""
        self._wait_below(0)

    def read(self, ref: Spilled) -> torch.Tensor:
        """The tensor written at ``ref`` (a new tensor; the file is not changed)."""
        with self._lock:
            waiting = self._waiting.get(ref.offset)
        if waiting is not None:
            t, future = waiting
            if future.exception() is not None:  # not in the file: the tensor stayed in memory
                return t.clone().contiguous()
        out = torch.empty(ref.nbytes, dtype=torch.uint8)
        buf = memoryview(out.numpy())
        done = 0
        while done < ref.nbytes:
            n = os.preadv(self.file.fileno(), [buf[done:]], ref.offset + done)
            if n <= 0:
                raise OSError(f"the spill file {self.file.name} ended {ref.nbytes - done} bytes early at offset "
                              f"{ref.offset + done}")
            done += n
        return out.view(ref.dtype).reshape(ref.shape).to(ref.device)

    def close(self) -> None:
        """Wait for the writes, then free the file."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self.file is not None:
            self.file.close()
            self.file = None
        self._waiting.clear()
        self._waiting_bytes = 0

    def __del__(self):
        self.close()
