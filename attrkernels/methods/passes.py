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

from ..store.fingerprint import DataPass, combine
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


class _Pass:
    """One checked pass (see ``DataPasses.over``): iterable and a context manager."""

    def __init__(self, passes: "DataPasses", context: str):
        self.passes, self.context, self.start = passes, context, None

    def __enter__(self) -> "_Pass":
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if isinstance(err, ExampleError) and not err.where and self.start is not None:
            raise err.locate(self.start, self.passes.what, self.context) from None
        return False

    def __iter__(self):
        p = self.passes
        check = DataPass(p.digests, what=p.what, context=self.context)
        for start, batch, size in iterate(p.loader, p.task, p.what, allow_empty=True):
            self.start = start
            p.batch_digests = check.update(start, batch, size)
            yield start, (batch if p.device is None else to_device(batch, p.device)), size
        check.finish()
        if p.digests is None:
            p.digests = check.digests()


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

    def over(self, context: str = "") -> _Pass:
        """One pass: ``with passes.over("checkpoint 0") as batches: for start, batch, size in batches``."""
        return _Pass(self, context)

    def batches(self, context: str = ""):
        """A re-iterable of the batches alone; every iteration is a checked pass."""
        return _Batches(self, context)

    @property
    def examples(self) -> int | None:
        return None if self.digests is None else int(self.digests.size)

    def fingerprint(self) -> dict | None:
        """The fingerprint of the first complete pass (None before one)."""
        return None if self.digests is None else combine(self.digests)


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


__all__ = ["DataPasses", "chunk_digest", "checked", "check_finite"]
