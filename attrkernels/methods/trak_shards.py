"""TRAK's fit on one shard of the training set, and the merge of finished shards.

A mixin of ``methods.trak.TRAK`` (it uses the method's store, settings, featurisation and kernel
factoring; see that module's docstring for the layout and the maths):

* ``_fit_shard``: featurise shard [start, stop) into ``shards/<start>-<stop>/`` (resumable, one
  writer at a time; its partial kernel Phi^T Phi saved as ``gram_<m>.npz``; the manifest, with the
  fingerprint of the shard's examples, written last). A shard already covered by finished shards
  of any split costs one hashing pass (its data checked against theirs). Under a process group,
  every rank then issues the same collectives: one ``all_reduce_sum`` of its partial kernels (a
  rank's rows from whichever shards cover them; zeros for an empty shard) and of the digests of
  its examples (every rank learns the whole set's fingerprint), then rank 0 factors and writes
  the kernels, then a barrier.
* ``_merge``: one process over finished shards covering the training set (a job array's last
  step): the loader's examples checked against every shard (``StoreMismatch`` naming the shard
  and both fingerprints), the saved partial kernels added in order of the rows, and factored.
"""
from __future__ import annotations

import numpy as np
import torch

from ..distributed import (MissingShards, Piece, all_reduce_sum, barrier, check_data, cover, shard_directory,
                           shard_loader, shard_manifests, write_manifest)
from ..store import combine, damaged
from .checkpoints import checkpoint_loop
from .trak_store import Features, Part, feature_array, feature_file


class ShardedFit:
    """The sharded half of TRAK's fit (see the module docstring)."""

    def _fit_shard(self, train, checkpoints, shard, group, found):
        """Featurise the shard (unless finished shards already cover it), then, under a process
        group, sum the kernels across ranks; every rank issues the same collectives."""
        M, k = len(checkpoints), self.k
        grams, digests = [np.zeros((k, k)) for _ in range(M)], np.zeros(0, np.uint64)
        if len(shard):
            try:
                pieces = cover(found, self.n_train, shard.start, shard.stop)
            except MissingShards:
                pieces = None
            if pieces is None:
                pieces, digests = self._featurize_shard(train, checkpoints, shard)
            else:  # finished: resume is free, after one hashing pass that checks the shard's data
                digests = self._digests(shard_loader(train, shard))
                for p in pieces:
                    check_data(p, digests[p.start - shard.start:p.stop - shard.start])
            if group.distributed:
                grams = [sum(self._piece_gram(m, p) for p in pieces) for m in range(M)]
        if not group.distributed:
            return
        every = torch.zeros(self.n_train, dtype=torch.int64)
        every[shard.start:shard.stop] = torch.from_numpy(digests.view(np.int64))
        sums = [torch.from_numpy(g) for g in grams]
        all_reduce_sum(sums + [every], what="TRAK kernels Phi^T Phi and example digests")
        pieces = cover(shard_manifests(self.store_path), self.n_train)
        self._features = [self._read(m, pieces) for m in range(M)]
        if group.rank == 0:
            for m in range(M):
                self._factor(m, sums[m].numpy(), self._features[m])
            self.store.write_json("data.json", combine(every.numpy().view(np.uint64)))
        barrier()  # the kernels are on disk before any rank scores

    def _featurize_shard(self, train, checkpoints, shard):
        directory = shard_directory(self.store_path, shard)
        directory.mkdir(parents=True, exist_ok=True)
        loader = shard_loader(train, shard)
        passes = self._passes(loader, "train")
        with checkpoint_loop(self.model, checkpoints) as loop:
            for m, _ in loop:
                arr = feature_array(directory / feature_file(m, self.dtype), len(shard), self.k, self._chunk,
                                    self.dtype)
                arr.lock()
                try:
                    arr.verify(repair=True)
                    self._featurize_train(m, arr, passes, len(shard), self._chunk)
                    features = Features([Part(arr, 0, 0, len(shard))], self.k, self.dtype)
                    self.store.save_arrays(f"{directory.relative_to(self.store_path)}/gram_{m}.npz",
                                           K=features.gram(0, len(shard)), features=np.array(features.signature()))
                finally:
                    arr.unlock()
        if passes.digests is None:  # every chunk was done: one hashing pass for the manifest
            passes.digests = self._digests(loader)
        manifest = write_manifest(directory, shard, settings=self.store.meta, digests=passes.digests,
                                  info={"batch": self._chunk, "dtype": self.dtype, "seed": self.seed})
        return [Piece(manifest, shard.start, shard.stop)], passes.digests

    def _merge(self, passes, found):
        """One process over the finished shards of any split: check their data against the
        loader (one hashing pass), add their partial kernels, factor."""
        pieces = cover(found, self.n_train)
        digests = self._digests(passes.loader, passes)
        for p in pieces:
            check_data(p, digests[p.start:p.stop])
        self._features = []
        for m in range(self.num_checkpoints):
            features = self._read(m, pieces)
            if not self._kernel_current(m, features):
                self._factor(m, sum(self._piece_gram(m, p) for p in pieces), features)
            self._features.append(features)
        self.store.write_json("data.json", passes.fingerprint())

    def _digests(self, loader, passes=None) -> np.ndarray:
        """The digests of every example of ``loader`` (one pass, no features)."""
        passes = passes or self._passes(loader, "train")
        with passes.over("data check") as batches:
            for _ in batches:
                pass
        return passes.digests

    def _read(self, m, pieces) -> Features:
        """Checkpoint m's features over the pieces of finished shards."""
        parts = []
        for p in pieces:
            s = p.manifest
            arr = feature_array(s.path / feature_file(m, self.dtype), s.stop - s.start, self.k, self._chunk,
                                self.dtype)
            if not arr.complete:
                raise damaged(arr.path, f"chunks {arr.missing()[:10]} are missing although its shard is finished",
                              f"delete {s.path} and fit that shard again")
            parts.append(Part(arr, s.start, p.start, p.stop))
        return Features(parts, self.k, self.dtype)

    def _piece_gram(self, m, piece) -> np.ndarray:
        """Phi^T Phi of a piece: its shard's saved partial kernel when the piece is the whole
        shard and the kernel matches the shard's features, else computed from the rows."""
        s = piece.manifest
        features = self._read(m, [Piece(s, s.start, s.stop)])
        name = s.path / f"gram_{m}.npz"
        if (piece.start, piece.stop) == (s.start, s.stop) and name.exists():
            saved = self.store.load_arrays(str(name.relative_to(self.store_path)))
            if str(saved.get("features")) == features.signature():
                return saved["K"]
        return self._read(m, [piece]).gram(piece.start, piece.stop)
