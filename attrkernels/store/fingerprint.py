"""Fingerprints of training data, example by example, and the check that a later pass over a
loader yields the same examples in the same order.

An example's digest is a 64-bit BLAKE2b hash of, for each tensor of the batch (in the batch's
flattened order): its per-example shape, dtype and bytes; values of the batch that are not
tensors (strings, numbers) are hashed once per batch into every example's digest of that batch.
Digests do not depend on how the examples are batched (except through such non-tensor values).

The fingerprint of a data set is the BLAKE2b hash of its examples' digests in order, with their
count: ``{"examples": n, "digest": "<32 hex>"}``. It changes when any example changes, when
examples are reordered, added or dropped.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils import _pytree as pytree


class DataMismatch(ValueError):
    """A pass over the training data yielded other examples (or another order) than the first."""


ORDER_FIX = ("every pass over the training data must yield the same examples in the same order: "
             "use a DataLoader with shuffle=False and a sequential sampler (no RandomSampler or "
             "SubsetRandomSampler), drop_last=False, no random augmentation, and a loader that can "
             "be iterated more than once (not a generator)")


def example_digests(batch, size: int) -> np.ndarray:
    """[size] uint64 digests of the batch's examples (see the module docstring)."""
    leaves = pytree.tree_leaves(batch)
    shared = hashlib.blake2b(digest_size=8)
    rows = []
    for leaf in leaves:
        if torch.is_tensor(leaf):
            if leaf.ndim == 0 or leaf.shape[0] != size:
                shared.update(_tensor_bytes(leaf, header=True))
                continue
            rows.append(leaf)
        else:
            shared.update(repr(leaf).encode())
    base = shared.digest()
    cpu = [t.detach().cpu().contiguous() for t in rows]
    headers = [f"{tuple(t.shape[1:])}:{t.dtype}".encode() for t in cpu]
    flat = [t.reshape(size, -1).view(torch.uint8).numpy() if t.numel() else None for t in cpu]
    out = np.empty(size, dtype=np.uint64)
    for b in range(size):
        h = hashlib.blake2b(base, digest_size=8)
        for header, f in zip(headers, flat):
            h.update(header)
            if f is not None:
                h.update(f[b].tobytes())
        out[b] = int.from_bytes(h.digest(), "little")
    return out


def _tensor_bytes(t: torch.Tensor, header: bool) -> bytes:
    t = t.detach().cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return (f"{tuple(t.shape)}:{t.dtype}".encode() if header else b"") + data


def combine(digests: np.ndarray) -> dict:
    """The fingerprint of a data set from its examples' digests in order."""
    digests = np.ascontiguousarray(digests, dtype=np.uint64)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(int(digests.size)).encode())
    h.update(digests.tobytes())
    return {"examples": int(digests.size), "digest": h.hexdigest()}


class DataPass:
    """Digests of one pass over a loader, checked batch by batch against an earlier pass.

        check = DataPass(expected=None)          # first pass: records
        for start, batch, size in batches:
            check.update(start, batch, size)     # raises DataMismatch at the first differing example
        check.finish()                           # raises if fewer/more examples than expected
        check.fingerprint()                      # {"examples": n, "digest": ...}

    ``expected``: the digests of the first pass ([n] uint64), or None. ``what`` names the loader in
    errors, ``context`` adds e.g. the checkpoint.
    """

    def __init__(self, expected: np.ndarray | None = None, *, what: str = "train", context: str = ""):
        self.expected = None if expected is None else np.asarray(expected, dtype=np.uint64)
        self.what, self.context = what, context
        self._parts: list = []
        self.examples = 0

    def update(self, start: int, batch, size: int) -> np.ndarray:
        if start != self.examples:
            raise ValueError(f"DataPass: batch starts at example {start}, expected {self.examples}")
        d = example_digests(batch, size)
        if self.expected is not None:
            self._compare(start, d)
        self._parts.append(d)
        self.examples += size
        return d

    def _compare(self, start: int, d: np.ndarray) -> None:
        n = self.expected.size
        stop = start + d.size
        if stop > n:
            raise DataMismatch(f"the {self.what} loader yielded more than the {n} examples of the first "
                               f"pass{self._where()}; {ORDER_FIX}")
        differ = np.nonzero(self.expected[start:stop] != d)[0]
        if differ.size == 0:
            return
        i = start + int(differ[0])
        seen = np.nonzero(self.expected == d[differ[0]])[0]
        moved = (f"; it is example {int(seen[0])} of the first pass, so the loader reorders examples"
                 if seen.size else "; no example of the first pass matches it (data or augmentation changed)")
        raise DataMismatch(f"{self.what} example {i} differs from example {i} of the first pass"
                           f"{self._where()}{moved}. {ORDER_FIX[0].upper()}{ORDER_FIX[1:]}")

    def _where(self) -> str:
        return f" ({self.context})" if self.context else ""

    def finish(self) -> None:
        """Check the example count against the first pass (drop_last, exhausted iterators)."""
        if self.examples == 0:
            hint = (" (a generator or iterator can be consumed only once: pass a DataLoader or a "
                    "list of batches)" if self.expected is not None else "")
            raise ValueError(f"the {self.what} loader yielded no examples{self._where()}{hint}")
        if self.expected is not None and self.examples != self.expected.size:
            raise DataMismatch(f"the {self.what} loader yielded {self.examples} examples{self._where()}, "
                               f"the first pass {self.expected.size}; {ORDER_FIX}")

    def digests(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.uint64)

    def fingerprint(self) -> dict:
        return combine(self.digests())
