"""The covariance pass's captures, kept for the eigenvalue correction of the same checkpoint.

Both factor stages need, per training batch, the tracked layers' inputs a and output-gradients
delta under the Fisher's loss. The covariance pass keeps its captures batch by batch while they
fit in ``budget`` bytes, and the correction stage reads that prefix of the batches instead of
running the model on them again (the model then runs on the batches after it only):

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

The same pass can keep the captures of the training loss's gradients for ``score`` (``held``):
with the true Fisher the task gives the loss from the same forward pass (``sampled_losses(...,
with_loss=True)``) and a last backward pass captures its output-gradients (the inputs are shared
with the correction's captures); with the empirical Fisher the covariance pass's captures are
those gradients already. ``score`` then reads them instead of running the model over the
training data (its pass still checks every example against the fit's; batches after the kept
prefix go through the model).

With the empirical Fisher the correction's captures are the training loss's too, so the
correction can also keep the rotated per-example gradients R_b = Q_S^T G_b Q_A it forms
(``Rotations``, in the budget the captures leave free; every layer's handler must
``keeps_rotated``), each layer's either formed or as the rotated positions D_b Q_S, A_b Q_A that
form them, whichever is smaller; the scores are then <R_b, preconditioned query in the
eigenbasis>, one GEMM per layer and batch (after one batched product where positions were kept)
instead of rotating each G_b again, and the captures they cover are released (the scores read
the rotations' prefix, then the captures kept after it, then the model).

Batches beyond the budget are written to the budget's spill file when there is one
(``EKFAC(spill_dir=...)``, ``spill.SpillFile``) and read back in order, the next one in a
background thread while the current one is used (``Replay.items``); the scores move what is kept
in memory there when their queries need the room (``Replay.to_disk_all``).

``default_budget(device)``: a quarter of the memory available when the fit starts (the host's
MemAvailable for a CPU model, the free memory of a CUDA device), 0 elsewhere. The captures kept
for the correction and for the scores share it (``Budget``); the scores' are dropped first.
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .spill import SpillFile


def available_memory(device: torch.device) -> int:
    """Bytes of memory available now on ``device``: the host's MemAvailable for the CPU, the
    free memory of a CUDA device; 0 when it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def return_freed_memory() -> None:
    """Hand the heap pages freed so far back to the OS (glibc's ``malloc_trim``; nothing
    elsewhere). Released captures otherwise stay in the process's heap, where the large
    allocations that follow (the queries, each a separate mapping) cannot use them: a two-block
    GPT-2 with 48 sequences kept 3.03 GB resident after releasing its captures, 2.11 GB after."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def default_budget(device: torch.device) -> int:
    """A quarter of the memory available now on ``device`` (0 when it cannot be read)."""
    return available_memory(device) // 4


def capture_bytes(handlers: dict, seen: set | None = None) -> int:
    """Bytes of the storages the records of ``handlers`` keep alive (each storage counted once,
    also across calls that share ``seen``)."""
    seen = set() if seen is None else seen
    total = 0
    for handler in handlers.values():
        for record in handler.records:
            for t in (record.inputs, record.grad_out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
    return total


class Budget:
    """Bytes that the captures kept by one or more ``Replay`` s may hold together in memory, and
    where the batches beyond them go (``spill``: a ``spill.SpillFile``, None: nowhere, keeping
    stops at the first batch that does not fit)."""

    def __init__(self, total: int, spill: SpillFile | None = None):
        self.total, self.used, self.spill = total, 0, spill


@dataclass
class OnDisk:
    """A kept batch written to the budget's spill file: ``skeleton`` is the batch without its
    tensors, ``refs`` where each tensor went (see ``Replay.to_disk``)."""

    skeleton: object
    refs: list


class BatchMemo:
    """What the Replays given one batch share: the storages counted in memory already
    (``counted``) and the tensors written to disk already (``written``: key -> ``Spilled``)."""

    def __init__(self):
        self.counted: set = set()
        self.written: dict = {}


def copied_handlers(handlers: dict, record) -> dict:
    """Shallow copies of ``handlers`` whose records are ``record(name, index, original)`` (tied
    uses relinked to the copies)."""
    new = {name: copy.copy(h) for name, h in handlers.items()}
    relink = {id(h): new[name] for name, h in handlers.items()}
    for name, h in new.items():
        h.records = [record(name, i, r) for i, r in enumerate(handlers[name].records)]
        h.tied = [relink[id(t)] for t in handlers[name].tied]
    return new


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


class Replay:
    """The (size, handlers) of the batches of one covariance pass (checkpoint ``k``, shard range
    ``span``) kept in ``budget`` (bytes, or a shared ``Budget``): every batch while they fit in
    memory; beyond it, each batch is written to the budget's spill file if it has one (and the
    disk room), else ``yields`` (another Replay on the same budget) is dropped if that makes
    room, else keeping stops there (here and in ``yields``) and the batches kept so far stay: a
    prefix of the pass (``complete`` when it is the whole pass; ``dropped`` when it is empty).
    ``starts``: the first example of each kept batch; ``end``: the first example after the
    prefix; ``bytes``: those kept in memory; ``largest``: the bytes of the largest batch kept.
    ``items()`` reads the batches back in order."""

    def __init__(self, k: int, span, budget, yields: "Replay | None" = None):
        self.k, self.span, self.yields = k, span, yields
        self.budget = budget if isinstance(budget, Budget) else Budget(budget)
        self.batches: list = []
        self.starts: list = []
        self.bytes = 0
        self.largest = 0
        self.end = 0
        self.dropped = self.budget.total <= 0 and self.budget.spill is None
        self.accepting = not self.dropped  # every batch so far was kept

    def add(self, size: int, handlers: dict, start: int | None = None, memo: BatchMemo | None = None) -> None:
        """Keep a batch's captures (``memo``: what this batch's other Replay kept already; the
        batch's storages are added to it when they are kept in memory)."""
        if not self.accepting:
            return
        memo = BatchMemo() if memo is None else memo
        counted = set(memo.counted)
        added = self.nbytes(handlers, counted)
        over = self.budget.used + added - self.budget.total
        entry = handlers
        if over > 0 and self.budget.spill is not None:
            entry = self.to_disk(handlers, memo.written)
        elif over > 0 and self.yields is not None and not self.yields.dropped and self.yields.bytes >= over:
            self.yields.drop()
        if entry is None or (entry is handlers and self.budget.used + added > self.budget.total):
            self.stop()
            if self.yields is not None:
                self.yields.stop()
            return
        if entry is handlers:
            memo.counted |= counted
            self.bytes += added
            self.budget.used += added
        self.largest = max(self.largest, self.nbytes(handlers))
        self.batches.append((size, entry))
        self.starts.append(start)
        self.end = (start or 0) + size

    @staticmethod
    def nbytes(handlers: dict, seen: set | None = None) -> int:
        return capture_bytes(handlers, seen)

    @staticmethod
    def tensors(handlers: dict):
        """(place, tensor) of every tensor a batch's captures hold (place: (layer, record, field))."""
        for name, h in handlers.items():
            for i, r in enumerate(h.records):
                for field in ("inputs", "grad_out"):
                    t = getattr(r, field)
                    if isinstance(t, torch.Tensor):
                        yield (name, i, field), t

    @staticmethod
    def skeleton(handlers: dict):
        """The batch without its tensors (what ``rebuild`` fills)."""
        return copied_handlers(handlers, lambda name, i, r: dataclasses.replace(r, inputs=None, grad_out=None,
                                                                                output=None))

    @staticmethod
    def rebuild(skeleton, values: dict):
        """The batch from its skeleton and {place: tensor}."""
        def record(name, i, r):
            return dataclasses.replace(r, inputs=values.get((name, i, "inputs")),
                                       grad_out=values.get((name, i, "grad_out")))
        return copied_handlers(skeleton, record)

    def to_disk(self, entry, written: dict | None = None) -> OnDisk | None:
        """The batch ``entry`` written to the spill file (a tensor in ``written`` is not written
        again), or None when the disk lacks the room."""
        written = {} if written is None else written
        pending = [(place, t) for place, t in self.tensors(entry) if _tensor_key(t) not in written]
        if not self.budget.spill.room(sum(t.numel() * t.element_size() for _, t in pending)):
            return None
        refs = []
        for place, t in self.tensors(entry):
            key = _tensor_key(t)
            if key not in written:
                try:
                    written[key] = self.budget.spill.write(t)
                except OSError:  # e.g. the disk filled up meanwhile: keep no more
                    return None
            refs.append((place, written[key]))
        return OnDisk(self.skeleton(entry), refs)

    def load(self, entry):
        """A kept batch as it was given to ``add`` (read back from disk if it was spilled)."""
        if not isinstance(entry, OnDisk):
            return entry
        return self.rebuild(entry.skeleton, {place: self.budget.spill.read(ref) for place, ref in entry.refs})

    def items(self):
        """(start, size, batch) of the kept batches in order; while one is used, the next one on
        disk is read in a background thread."""
        entries = list(zip(self.starts, self.batches))
        with ThreadPoolExecutor(1) as pool:
            ahead = None
            for i, (start, (size, entry)) in enumerate(entries):
                batch = ahead.result() if ahead is not None else self.load(entry)
                ahead = None
                if i + 1 < len(entries) and isinstance(entries[i + 1][1][1], OnDisk):
                    ahead = pool.submit(self.load, entries[i + 1][1][1])
                yield start, size, batch
                del batch

    def to_disk_all(self) -> bool:
        """Write the batches kept in memory to the spill file, freeing their memory; False without
        a spill file or the disk room for them (some may have moved: release the Replay then)."""
        spill, seen = self.budget.spill, set()
        if spill is None or not spill.room(sum(self.nbytes(entry, seen) for _, entry in self.batches
                                               if not isinstance(entry, OnDisk))):
            return False
        for i, (size, entry) in enumerate(self.batches):
            if not isinstance(entry, OnDisk):
                spilled = self.to_disk(entry)
                if spilled is None:
                    return False
                self.batches[i] = (size, spilled)
        spill.flush()  # the memory is free once the writes are done
        self.budget.used -= self.bytes
        self.bytes = 0
        return True

    def stop(self) -> None:
        """Keep no later batch (those kept stay)."""
        self.accepting = False
        self.dropped = not self.batches

    def drop(self) -> None:
        if not self.dropped:
            self.budget.used -= self.bytes
        self.batches, self.starts, self.bytes, self.end = [], [], 0, 0
        self.dropped, self.accepting = True, False

    @property
    def complete(self) -> bool:
        """Whether every batch of the pass was kept (asked after the pass)."""
        return self.accepting

    def serves(self, k: int, span) -> bool:
        """Whether this holds a prefix (at least one batch) of the covariance pass of checkpoint
        ``k`` over ``span``."""
        return not self.dropped and self.k == k and self.span == span

    def trim(self, count: int) -> None:
        """Release the first ``count`` kept batches (others serve them now)."""
        self.batches, self.starts = self.batches[count:], self.starts[count:]
        self.dropped = not self.batches


class Rotations(Replay):
    """The rotated gradients the eigenvalue correction of checkpoint ``k`` formed, per training
    batch ``{layer: [handlers.kron.Rotated chunk, ...]}`` (``add(size, parts, start)``; ``starts``
    and ``batches`` of (size, parts) as a ``Replay``'s), for the prefix of the batches that fits
    in ``budget`` (bytes in memory, then its spill file)."""

    def __init__(self, k: int, budget):
        super().__init__(k, None, budget)

    @staticmethod
    def nbytes(parts: dict, seen: set | None = None) -> int:
        return sum(chunk.nbytes() for chunks in parts.values() for chunk in chunks)

    @staticmethod
    def tensors(parts: dict):
        for name, chunks in parts.items():
            for i, chunk in enumerate(chunks):
                for field in ("R", "a", "d"):
                    t = getattr(chunk, field)
                    if t is not None:
                        yield (name, i, field), t

    @staticmethod
    def skeleton(parts: dict):
        return {name: [dataclasses.replace(c, R=None, a=None, d=None) for c in chunks]
                for name, chunks in parts.items()}

    @staticmethod
    def rebuild(skeleton, values: dict):
        return {name: [dataclasses.replace(c, **{f: values.get((name, i, f)) for f in ("R", "a", "d")})
                       for i, c in enumerate(chunks)] for name, chunks in skeleton.items()}
