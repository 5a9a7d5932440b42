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
(``write`` returns None) rather than filling the disk.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch


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
    (``write``) and read back (``read``)."""

    def __init__(self, directory, reserve: int | None = None):
        self.file = None
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"spill_dir {directory!r} is not a directory")
        self.directory = directory
        self.reserve = default_reserve(directory) if reserve is None else reserve
        self.size = 0

    def room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more can be written and leave ``reserve`` bytes free on the disk."""
        return shutil.disk_usage(self.directory).free - nbytes >= self.reserve

    def write(self, t: torch.Tensor) -> Spilled:
        """Append ``t``'s values (row-major) and return where they are."""
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.directory)
        host = t.detach().contiguous().cpu()
        raw = host.reshape(-1).view(torch.uint8).numpy() if host.numel() else b""
        ref = Spilled(self.size, host.numel() * host.element_size(), tuple(t.shape), t.dtype, t.device)
        written = os.pwrite(self.file.fileno(), raw, self.size) if ref.nbytes else 0
        while written < ref.nbytes:  # pwrite may write less than asked (e.g. interrupted)
            written += os.pwrite(self.file.fileno(), raw[written:], self.size + written)
        self.size += ref.nbytes
        return ref

    def read(self, ref: Spilled) -> torch.Tensor:
        """The tensor written at ``ref`` (a new tensor; the file is not changed)."""
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
        if self.file is not None:
            self.file.close()
            self.file = None

    def __del__(self):
        self.close()
