"""Partial sums of a stage over one shard of the training set, on disk, and their merge.

A shard's pass (``fit(train, shard=(i, n))``) writes ``<store>/partial/<stage>_<fp>_<start>-<stop>
.safetensors`` (``Shard.name``; atomically, so a complete file means the shard is done and a
killed shard leaves nothing), holding the stage's unnormalised sums (``sums``: float64 sums and
int64 counts keyed ``<layer>/<key>``, and ``examples``), the digests of the shard's examples
(``digests``, int64 view of the uint64 ``store.fingerprint`` digests) and in its metadata the
range, the training set's size, the shard's data fingerprint and, for ``lambda``, the checksum of
the eigenbasis the correction was computed in. The model (checkpoint fingerprint ``fp``) is in the
name; the settings are the store's ``meta.json``, so a shard of other settings cannot be written
into the store at all.

``merge`` is a pure function of the files: it picks files that tile [0, n) whatever split wrote
them (2 processes, 3, a job array), checks that they agree (size, eigenbasis) and that each
covers the examples the caller's loader yields there (``check``), and adds them in range order.
A gap raises naming the missing ranges; disagreeing files raise naming the shard and its
fingerprint.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ...distributed import Shard
from ...store import DataMismatch, StoreMismatch, combine
from .storage import FactorStore, StoredDataMismatch, stage_tensors

PARTIAL_DIR = "partial"


class MissingShards(ValueError):
    """The partial sums of a stage do not cover every training example yet."""


def basis_digest(factors: dict) -> str:
    """A digest of the eigenbases and eigenvalues (the ``eigen`` stage) a correction pass ran in."""
    h = hashlib.blake2b(digest_size=16)
    for key, t in sorted(stage_tensors("eigen", factors).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def partial_name(stage: str, fp: str, shard: Shard) -> str:
    return f"{PARTIAL_DIR}/{stage}_{fp}_{shard.name}.safetensors"


class Partials:
    """The partial-sum files of a factor store (see the module docstring)."""

    def __init__(self, store: FactorStore):
        self.factor_store, self.store = store, store.store
        self.path = store.path / PARTIAL_DIR

    def exists(self, stage: str, fp: str, shard: Shard) -> bool:
        return self.store.exists(partial_name(stage, fp, shard))

    def ranges(self, stage: str, fp: str) -> list[tuple[int, int]]:
        """The (start, stop) of every partial file of ``stage`` for checkpoint ``fp``, sorted."""
        out = []
        for p in self.path.glob(f"{stage}_{fp}_*-*.safetensors"):
            start, stop = p.name[:-len(".safetensors")].rsplit("_", 1)[1].split("-")
            out.append((int(start), int(stop)))
        return sorted(out)

    def save(self, stage: str, fp: str, shard: Shard, sums: dict, digests: np.ndarray, basis: str = "") -> None:
        tensors = dict(sums)
        tensors["digests"] = torch.from_numpy(np.ascontiguousarray(digests, dtype=np.uint64).view(np.int64))
        meta = {"start": shard.start, "stop": shard.stop, "n": shard.n, "data": combine(digests)["digest"],
                "basis": basis}
        self.store.save_tensors(partial_name(stage, fp, shard), {k: v.cpu() for k, v in tensors.items()}, meta)

    def tiling(self, stage: str, fp: str, n: int) -> list[Shard]:
        """Shards whose files tile [0, n) (the widest at each step), or MissingShards naming the
        ranges no file covers."""
        ranges = self.ranges(stage, fp)
        chosen, at = [], 0
        while at < n:
            here = [stop for start, stop in ranges if start == at and stop > at]
            if not here:
                break
            chosen.append(Shard(at, max(here), n=n))
            at = max(here)
        if at >= n:
            return chosen
        covered, gaps, pos = sorted(ranges), [], 0
        for start, stop in covered:
            if start > pos:
                gaps.append((pos, start))
            pos = max(pos, stop)
        if pos < n:
            gaps.append((pos, n))
        gaps = gaps or [(at, n)]
        raise MissingShards(
            f"the partial sums of stage {stage!r} for checkpoint {fp} in {self.path} do not cover the training "
            f"examples {', '.join(f'[{a}, {b})' for a, b in gaps)} of {n}; run fit(train, shard=...) for the "
            "shards holding them (e.g. the failed tasks of the job array), then fit(train) again")

    def merge(self, stage: str, fp: str, n: int, check=None, basis: str = "") -> tuple[dict, np.ndarray]:
        """(float64 / int64 sums over every example, the [n] example digests) from files that tile
        [0, n). ``check(shard, digests)`` raises ``DataMismatch`` when the caller's data differs
        there; ``basis`` (lambda): the eigenbasis checksum every file must carry."""
        total, parts = None, []
        for shard in self.tiling(stage, fp, n):
            name = partial_name(stage, fp, shard)
            meta = self.store.tensors_metadata(name)
            where = f"partial sums {self.store.path / name} (shard [{shard.start}, {shard.stop}), data fingerprint " \
                    f"{meta.get('data')})"
            if meta.get("n") != str(n):
                raise StoreMismatch(f"{where} were computed on a training set of {meta.get('n')} examples, this one "
                                    f"has {n}; delete them and rerun that shard")
            if meta.get("basis", "") != basis:
                raise StoreMismatch(f"{where} were computed in another eigenbasis than the store's eigen file of "
                                    "this checkpoint; delete them and rerun that shard")
            tensors = self.store.load_tensors(name)
            digests = tensors.pop("digests").numpy().view(np.uint64)
            if digests.size != len(shard) or combine(digests)["digest"] != meta.get("data"):
                raise StoreMismatch(f"{where} hold {digests.size} example digests that do not match their metadata; "
                                    "delete them and rerun that shard")
            if check is not None:
                try:
                    check(shard, digests)
                except DataMismatch as err:
                    raise StoredDataMismatch(f"{where} were computed from other training data than the train "
                                             f"loader yields: {str(err).rstrip('.')}. Delete them and rerun that "
                                             "shard on this data") from None
            if total is not None and set(tensors) != set(total):
                raise StoreMismatch(f"{where} hold other layers than the other shards; delete them and rerun")
            total = {k: v.clone() for k, v in tensors.items()} if total is None else \
                {k: total[k] + tensors[k] for k in total}
            parts.append(digests)
        return total, np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
