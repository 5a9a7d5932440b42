"""Every pass a method makes over a loader, checked against the first one.

A method indexes training example i by the order its train loader yields it, on every pass:
at every checkpoint, in ``fit`` and in ``score``, in each step of an iterative solver. A loader
that shuffles, samples at random, augments at random, drops its last batch or is a one-shot
iterator silently permutes, changes or loses rows of the scores. ``DataPasses`` makes every
such pass checked:

    passes = DataPasses(train, task, "train", device=model_device(model))  # check_loader now
    with passes.over(f"checkpoint {k}") as batches:
        for start, batch, size in batches:    # batch moved to ``device``
            ...                                # an ExampleError raised here is re-raised
                                               # naming global indices, loader and checkpoint
    passes.digests                             # [n] uint64 example digests of the first full pass
    passes.fingerprint()                       # {"examples": n, "digest": ...}, for store metadata

* Constructing it calls ``utils.loaders.check_loader`` (one-shot iterators, ``drop_last=True``,
  samplers of any class whose order changes between iterations), so most misuse is refused
  before any work.
* The first complete pass records the digest of every example (``store.fingerprint``); every
  later pass compares batch by batch and raises ``store.DataMismatch`` at the first example that
  differs (saying whether it was reordered) and, at the end, when the count differs. Keep one
  ``DataPasses`` per loader on the method object so that ``fit`` and ``score`` are compared too.
* ``batch_digests`` holds the digests of the batch last yielded (a store records them per chunk:
  ``chunk_digest``).
* ``batches(context)`` is a re-iterable of the batches alone, each iteration a checked pass, for
  code that takes a loader (``kernels.hvp``, Lanczos, CG matvecs).
* A pass abandoned in the middle (LiSSA cycles through the loader) is checked as far as it went.

Wiring a method (as TRAK, TracIn and the influence methods do; EK-FAC / K-FAC the same way):
create ``self._train_passes = self._passes(train, "train")`` in ``fit`` (``AttributionMethod``;
it refuses bad loaders before any work) and keep it for ``score``; replace every
``iterate(loader, task, what)`` with ``with passes.over(f"checkpoint {k}") as batches``; call task
functions through ``call_task`` (or hand ``checked(task.loss, "loss")`` to a featurizer / capture)
so non-finite values and bad labels name the example; a store records ``passes.fingerprint()``
in its metadata (or ``chunk_digest`` of each chunk's examples) and refuses a mismatch with
``store.StoreMismatch``.

``checked(fn, name)`` wraps a task function ``fn(model, batch) -> [B]`` so that non-finite values
raise ``ExampleError`` naming the examples (then located by the pass); ``call_task`` does the
same for direct calls.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch
from tqdm.auto import tqdm

from ..store.fingerprint import DataMismatch, DataPass, combine
from ..utils.batches import to_device
from ..utils.errors import ExampleError
from ..utils.loaders import check_loader


def chunk_digest(digests) -> int:
    """One 63-bit digest of a run of example digests (in order), e.g. the examples of a chunk
    of a store (``ChunkedArray.write(i, values, data=chunk_digest(...))``)."""
    h = hashlib.blake2b(np.ascontiguousarray(digests, dtype=np.uint64).tobytes(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def iterate(loader, task, what: str, device=None, *, allow_empty: bool = False):
    """Yield (start, batch, size) over a loader, the batch's tensors moved to ``device`` (None:
    left where they are); clear errors for batches the task cannot read and (unless
    ``allow_empty``: a ``DataPass`` reports it with more context) for empty loaders."""
    start = 0
    for batch in loader:
        try:
            size = task.batch_size(batch)
        except Exception as err:  # noqa: BLE001  (the task decides what a batch is)
            raise TypeError(f"the task cannot read batches of the {what} loader: {err}") from err
        yield start, (batch if device is None else to_device(batch, device)), size
        start += size
    if start == 0 and not allow_empty:
        raise ValueError(f"the {what} loader yielded no examples")


class CheckedPass:
    """One pass over a loader, as a context manager whose iteration yields (first example, batch
    on ``device``, size). Each batch is hashed where the loader yields it (the CPU, usually) and
    compared with ``expected`` (the digests of an earlier pass; None: only recorded; ``compare``
    False: not hashed at all); at the end the example count is checked and ``on_finish(digests)``
    called. An ``ExampleError`` raised in the loop body is re-raised with the global index and
    ``context``; a ``DataMismatch`` is passed through ``on_mismatch`` when given (e.g. to name a
    store). ``desc``: a progress bar (with ``verbose``)."""

    def __init__(self, loader, task, what: str, *, expected=None, compare: bool = True, context: str = "",
                 device=None, desc: str | None = None, verbose: bool = False, on_finish=None, on_mismatch=None):
        self.loader, self.task, self.what, self.expected, self.compare = loader, task, what, expected, compare
        self.context, self.device, self.desc, self.verbose = context, device, desc, verbose
        self.on_finish, self.on_mismatch = on_finish, on_mismatch
        self.start, self.batch_digests = None, None

    def __enter__(self) -> "CheckedPass":
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if isinstance(err, ExampleError) and not err.where and self.start is not None:
            raise err.locate(self.start, self.what, self.context) from None
        if isinstance(err, DataMismatch) and self.on_mismatch is not None:
            raise self.on_mismatch(err) from None
        return False

    def __iter__(self):
        check = DataPass(self.expected, what=self.what, context=self.context) if self.compare else None
        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        bar = tqdm(iterate(self.loader, self.task, self.what, allow_empty=check is not None), total=total,
                   desc=self.desc, unit="batch", disable=not self.verbose or self.desc is None, leave=False)
        for start, batch, size in bar:
            self.start = start
            if check is not None:
                self.batch_digests = check.update(start, batch, size)
            yield start, (batch if self.device is None else to_device(batch, self.device)), size
        if check is not None:
            check.finish()
            if self.on_finish is not None:
                self.on_finish(check.digests())


class DataPasses:
    """Checked passes over one loader (see the module docstring).

    ``loader``: a DataLoader or a list of batches (re-iterable, fixed order); ``task``: reads the
    batch size; ``what``: "train" or "test", named in errors; ``device``: where batches go (None:
    left where they are); ``check``: False skips ``check_loader`` (a loader already checked).
    """

    def __init__(self, loader, task, what: str = "train", device=None, *, check: bool = True):
        if check:
            check_loader(loader, what)
        self.loader, self.task, self.what, self.device = loader, task, what, device
        self.digests: np.ndarray | None = None
        self.batch_digests: np.ndarray | None = None

    def over(self, context: str = "") -> "_Pass":
        """One pass: ``with passes.over("checkpoint 0") as batches: for start, batch, size in batches``."""
        return _Pass(self, context)

    def _record(self, digests) -> None:
        if self.digests is None:
            self.digests = digests

    def batches(self, context: str = ""):
        """A re-iterable of the batches alone; every iteration is a checked pass."""
        return _Batches(self, context)

    @property
    def examples(self) -> int | None:
        return None if self.digests is None else int(self.digests.size)

    def fingerprint(self) -> dict | None:
        """The fingerprint of the first complete pass (None before one)."""
        return None if self.digests is None else combine(self.digests)


class _Pass(CheckedPass):
    """A pass of ``DataPasses``: compared with its first pass, the batch digests kept for callers."""

    def __init__(self, passes: DataPasses, context: str):
        super().__init__(passes.loader, passes.task, passes.what, expected=passes.digests, context=context,
                         device=passes.device, on_finish=passes._record)
        self.passes = passes

    def __iter__(self):
        for item in super().__iter__():
            self.passes.batch_digests = self.batch_digests
            yield item


class _Batches:
    def __init__(self, passes, context):
        self.passes, self.context = passes, context

    def __iter__(self):
        with self.passes.over(self.context) as batches:
            for _, batch, _ in batches:
                yield batch


def check_finite(values, name: str) -> None:
    """Raise ExampleError naming the examples whose task value ``name`` is NaN or Inf (no check
    under ``vmap``, where values cannot be inspected)."""
    if not torch.is_tensor(values) or values.ndim != 1 or not values.is_floating_point():
        return
    try:
        bad = ~torch.isfinite(values.detach())
        if not bool(bad.any()):
            return
        examples = torch.nonzero(bad).flatten().tolist()
    except RuntimeError:  # batched under vmap: data-dependent control flow is not allowed
        return
    raise ExampleError(f"task.{name} is NaN or Inf", examples,
                       fix="check these examples' inputs (NaN / Inf values) and the checkpoint's weights, "
                           "and drop or repair them")


def checked(fn, name: str | None = None):
    """``fn(model, batch) -> [B]`` that raises ExampleError for non-finite values."""
    name = name or getattr(fn, "__name__", "output")

    @functools.wraps(fn)
    def wrapper(model, batch, *args, **kwargs):
        out = fn(model, batch, *args, **kwargs)
        check_finite(out, name)
        return out

    return wrapper


__all__ = ["CheckedPass", "DataPasses", "chunk_digest", "checked", "check_finite"]
