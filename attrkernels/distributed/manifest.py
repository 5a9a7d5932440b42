"""Per-shard manifests and the pure merge of shards written by any number of processes.

A pass run on a shard of the training set writes its files into ``<root>/shards/<shard.name>/``
(``shard_directory``) and, once they are complete, ``manifest.json`` beside them
(``write_manifest``, atomic; written last, so a shard with a manifest is a finished shard and a
rerun that finds one has nothing to do):

    {"range": [start, stop], "n": n_train, "split": [index, count],
     "settings": <settings_hash(settings)>, "settings_values": settings,
     "data": {"examples": stop - start, "digest": <combine(digests)>}, "info": {...}}

with ``digests.npy`` ([stop - start] uint64, the per-example digests of ``store.fingerprint``)
written before it. ``settings`` is whatever defines the shard's contents (method settings, seed,
dtype, the model fingerprint of every checkpoint, n_train, batch size); ``info`` is free.

Merging is a pure function of the manifests found (``shard_manifests``), for any world size:

* ``check_settings`` refuses a shard written with other settings (``StoreMismatch`` naming the
  shard and each differing setting);
* ``cover(found, start, stop)`` picks shards whose ranges cover [start, stop) with no gap (at each
  position the shard reaching furthest, so overlapping splits, e.g. two shards of a 2-process run
  and one of a 3-process run, mix freely) and raises ``MissingShards`` naming every uncovered
  range and the shards of the splits seen that would fill it;
* ``check_data(piece, digests)`` refuses a shard whose examples are not the caller's
  (``StoreMismatch`` naming the shard, the first differing example and both fingerprints), and
  ``merged_fingerprint(pieces)`` is the fingerprint of the whole data set from the shards'.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..store.atomic import write_json, write_npy
from ..store.directory import StoreMismatch, differences, jsonable, reading
from ..store.fingerprint import combine
from .shards import Shard, batch_shard, shard_of

SHARDS = "shards"
MANIFEST = "manifest.json"
DIGESTS = "digests.npy"


class MissingShards(ValueError):
    """No complete shard covers some training examples."""


def settings_hash(settings: dict) -> str:
    """A 32-hex BLAKE2b hash of the settings as canonical JSON (sorted keys)."""
    text = json.dumps(jsonable(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def shard_directory(root, shard: Shard) -> Path:
    """Where the files of ``shard`` live: ``<root>/shards/<start>-<stop>``."""
    return Path(root) / SHARDS / shard.name


@dataclass(frozen=True)
class ShardManifest:
    """What a finished shard says about itself (see the module docstring)."""

    start: int
    stop: int
    n: int
    index: int
    count: int
    settings: str
    settings_values: dict
    data: dict
    info: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def shard(self) -> Shard:
        return Shard(self.start, self.stop, self.index, self.count, self.n)

    @property
    def name(self) -> str:
        return f"shard {self.path if self.path is not None else self.shard.name} (examples [{self.start}, {self.stop}))"

    def digests(self) -> np.ndarray:
        """The per-example digests of the shard's examples ([stop - start] uint64)."""
        path = self.path / DIGESTS
        with reading(path):
            d = np.load(path, allow_pickle=False)
            if d.dtype != np.uint64 or d.shape != (self.stop - self.start,):
                raise ValueError(f"expected uint64 [{self.stop - self.start}], found {d.dtype} {d.shape}")
        return d


def write_manifest(directory, shard: Shard, *, settings: dict, digests, info: dict | None = None) -> ShardManifest:
    """Record a finished shard: its digests, then (atomically, last) its manifest."""
    directory = Path(directory)
    digests = np.ascontiguousarray(digests, dtype=np.uint64)
    if digests.shape != (len(shard),):
        raise ValueError(f"digests must have one entry per example of the shard ({len(shard)}), got {digests.shape}")
    if shard.n is None:
        raise ValueError("the shard must know the size n of the training set (use shard_of)")
    write_npy(directory / DIGESTS, digests)
    body = {"range": [shard.start, shard.stop], "n": shard.n, "split": [shard.index, shard.count],
            "settings": settings_hash(settings), "settings_values": jsonable(settings),
            "data": combine(digests), "info": jsonable(info or {})}
    write_json(directory / MANIFEST, body)
    return read_manifest(directory)


def read_manifest(directory) -> ShardManifest:
    """The manifest of the shard in ``directory`` (``StoreDamaged`` naming it when unreadable)."""
    path = Path(directory) / MANIFEST
    with reading(path):
        body = json.loads(path.read_text())
        (start, stop), (index, count) = body["range"], body["split"]
        return ShardManifest(int(start), int(stop), int(body["n"]), int(index), int(count), str(body["settings"]),
                             dict(body["settings_values"]), dict(body["data"]), dict(body.get("info", {})),
                             Path(directory))


def shard_manifests(root) -> list[ShardManifest]:
    """Every finished shard under ``<root>/shards`` (directories without a manifest are unfinished)."""
    base = Path(root) / SHARDS
    if not base.is_dir():
        return []
    return [read_manifest(d) for d in sorted(base.iterdir()) if (d / MANIFEST).exists()]


def check_settings(found: list[ShardManifest], settings: dict) -> None:
    """Refuse shards written with other settings than ``settings`` (naming shard and setting)."""
    want = settings_hash(settings)
    for m in found:
        if m.settings != want:
            diff = differences(m.settings_values, jsonable(settings)) or ["(settings hash differs)"]
            raise StoreMismatch(f"{m.name} was written with other settings than this run; delete it or use "
                                "another store directory. Differences:\n  " + "\n  ".join(diff))


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of the training set, read from ``manifest``'s shard."""

    manifest: ShardManifest
    start: int
    stop: int


def cover(found: list[ShardManifest], n: int, start: int = 0, stop: int | None = None) -> list[Piece]:
    """Pieces of finished shards covering examples [start, stop) of n in order (see the module
    docstring); ``MissingShards`` names every gap."""
    stop = n if stop is None else stop
    for m in found:
        if m.n != n:
            raise StoreMismatch(f"{m.name} belongs to a training set of {m.n} examples, this one has {n}")
    pieces, p = [], start
    gaps = []
    while p < stop:
        reach = [m for m in found if m.start <= p < m.stop]
        if not reach:
            nxt = min([m.start for m in found if m.start > p] + [stop])
            gaps.append((p, min(nxt, stop)))
            p = nxt
            continue
        best = max(reach, key=lambda m: (m.stop, -m.start))
        pieces.append(Piece(best, p, min(best.stop, stop)))
        p = best.stop
    if gaps:
        raise MissingShards("no finished shard covers " + "; ".join(_name_gap(found, n, a, b) for a, b in gaps)
                            + ". Run the missing shard(s) (the same settings and data), then merge again")
    return pieces


def _name_gap(found: list[ShardManifest], n: int, a: int, b: int) -> str:
    splits = sorted({m.count for m in found})
    names = []
    for count in splits:
        known = next(m for m in found if m.count == count)
        for i in range(count):
            s = _split_shard(known, i)
            if s.start < b and a < s.stop and s.stop > s.start:
                names.append(f"shard {i} of {count} [{s.start}, {s.stop})")
    hint = f" (missing: {', '.join(names)})" if names else ""
    return f"examples [{a}, {b}){hint}"


def _split_shard(known: ShardManifest, index: int) -> Shard:
    """Shard ``index`` of the split ``known`` belongs to (batch-aligned when it records its batch)."""
    batch = known.info.get("batch")
    if batch:
        return batch_shard(known.n, int(batch), index, known.count)
    return shard_of(known.n, index, known.count)


def check_data(piece_or_manifest, digests) -> None:
    """Refuse a shard whose examples are not the caller's: ``digests`` are the caller's digests of
    the examples a ``Piece`` covers ([piece.start, piece.stop)) or of a manifest's whole range.
    The error names the shard, the first differing example and both fingerprints."""
    if isinstance(piece_or_manifest, Piece):
        m, lo, hi = piece_or_manifest.manifest, piece_or_manifest.start, piece_or_manifest.stop
    else:
        m = piece_or_manifest
        lo, hi = m.start, m.stop
    digests = np.ascontiguousarray(digests, dtype=np.uint64)
    stored = m.digests()[lo - m.start:hi - m.start]
    if digests.shape == stored.shape and np.array_equal(stored, digests):
        return
    differ = np.nonzero(stored[:digests.size] != digests[:stored.size])[0]
    where = f"example {lo + int(differ[0])} differs" if differ.size else \
        f"{digests.size} examples given for its {stored.size}"
    raise StoreMismatch(f"{m.name} was computed from other training data ({where}): its fingerprint is "
                        f"{m.data['digest']}, the examples given have {combine(digests)['digest']} (rows "
                        f"[{lo}, {hi})); fit that shard again with this data, or merge it with the data it was "
                        "fitted on")


def merged_fingerprint(pieces: list[Piece]) -> dict:
    """The fingerprint (``store.fingerprint.combine``) of the examples the pieces cover, in order."""
    parts = [p.manifest.digests()[p.start - p.manifest.start:p.stop - p.manifest.start] for p in pieces]
    return combine(np.concatenate(parts) if parts else np.zeros(0, np.uint64))


__all__ = ["SHARDS", "MissingShards", "ShardManifest", "Piece", "settings_hash", "shard_directory",
           "write_manifest", "read_manifest", "shard_manifests", "check_settings", "cover",
           "check_data", "merged_fingerprint"]
