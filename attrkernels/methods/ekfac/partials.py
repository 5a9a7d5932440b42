"""Partial sums of a stage over one shard of the training set, on disk, and their merge.

A shard's pass (``fit(train, shard=(i, n))``) writes, per stage and checkpoint, a shard directory
of ``distributed.manifest`` (``<store>/partial/<stage>_<fp>/shards/<start>-<stop>/``): ``sums
.safetensors`` (the stage's unnormalised sums: float64 sums and int64 counts keyed
``<layer>/<key>``, and ``examples``), then the digests of the shard's examples and, last and
atomically, its manifest, so a shard with a manifest is done and a killed shard is redone. The
manifest's settings are the store's settings, the stage, the checkpoint's fingerprint, the size
of the training set, the batch size of the split and, for ``lambda``, the digest of the
eigenbasis the correction was computed in (``basis_digest``).

``merge`` is a pure function of the finished shards, whatever split wrote them (2 processes, 3,
a job array): sums cannot be cut, so it takes one split whose shards cover [0, n) (else
``MissingShards`` names the gaps and the shards that would fill them), refuses shards of other
settings (``check_settings``) or of other training data than the caller's (``check_data``: the
shard and both fingerprints named), and adds the sums in range order.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ...distributed import (MissingShards, Shard, check_data, check_settings, cover, shard_directory,
                            shard_manifests, write_manifest)
from .storage import FactorStore, stage_tensors

PARTIAL_DIR = "partial"
SUMS = "sums.safetensors"


def basis_digest(factors: dict) -> str:
    """A digest of the eigenbases and eigenvalues (the ``eigen`` stage) a correction pass ran in."""
    h = hashlib.blake2b(digest_size=16)
    for key, t in sorted(stage_tensors("eigen", factors).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Partials:
    """The partial sums of one stage and checkpoint in a factor store (see the module docstring)."""

    def __init__(self, store: FactorStore, stage: str, fp: str, n: int, batch: int, basis: str = ""):
        self.store, self.n, self.batch = store, n, batch
        self.root = store.path / PARTIAL_DIR / f"{stage}_{fp}"
        self.settings = {"store": store.store.meta, "stage": stage, "checkpoint": fp, "n": n, "batch": batch,
                         "basis": basis}

    @staticmethod
    def exist(store: FactorStore, stage: str, fp: str) -> bool:
        """Whether the store holds partial sums of ``stage`` for checkpoint ``fp``."""
        return bool(shard_manifests(store.path / PARTIAL_DIR / f"{stage}_{fp}"))

    def found(self) -> list:
        return shard_manifests(self.root)

    def done(self, shard: Shard) -> bool:
        return any(m.start == shard.start and m.stop == shard.stop for m in self.found())

    def save(self, shard: Shard, sums: dict, digests: np.ndarray) -> None:
        directory = shard_directory(self.root, shard)
        name = directory.relative_to(self.store.path) / SUMS
        self.store.store.save_tensors(str(name), {k: v.cpu() for k, v in sums.items()})
        write_manifest(directory, shard, settings=self.settings, digests=digests, info={"batch": self.batch})

    def _split_covering(self, found: list):
        """Pieces of the first split (by shard count) whose finished shards cover [0, n), or None."""
        for count in sorted({m.count for m in found}):
            try:
                return cover([m for m in found if m.count == count], self.n)
            except MissingShards:
                continue
        return None

    def ready(self) -> bool:
        """Whether one split's finished shards cover every example (``merge`` can run)."""
        return self._split_covering(self.found()) is not None

    def covering(self) -> list:
        """The pieces ``merge`` adds (one split's whole shards: sums cannot be cut), after checking
        the shards' settings; ``MissingShards`` naming the gaps when no split covers [0, n)."""
        found = self.found()
        check_settings(found, self.settings)
        pieces = self._split_covering(found)
        if pieces is None:
            cover(found, self.n)  # raises MissingShards naming the gaps
            raise MissingShards(f"the finished shards in {self.root} cover every example only by mixing splits, "
                                "whose sums cannot be cut; run the missing shards of one split")
        return pieces

    def merge(self, digests: np.ndarray) -> dict:
        """The float64 / int64 sums over every example, from finished shards of one split covering
        [0, n) (``covering``), after checking their examples against ``digests`` (the caller's [n]
        example digests)."""
        pieces = self.covering()
        total = None
        for piece in pieces:
            check_data(piece, digests[piece.start:piece.stop])
            tensors = self.store.store.load_tensors(str(piece.manifest.path.relative_to(self.store.path) / SUMS))
            total = tensors if total is None else {k: total[k] + tensors[k] for k in total}
        return total
