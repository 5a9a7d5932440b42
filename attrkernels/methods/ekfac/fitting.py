"""The stages of one checkpoint's factors: each loaded from the store, merged from shards'
partial sums, or computed over this process's part of the training set and summed across the
process group (see ``sharding`` for the three ways to run and ``partials`` for the files).

Per checkpoint, every rank of a group makes the same collectives in the same order: one
agreement on which stage files the store holds, then per computed stage one flag all-reduce
after the rank's pass (``distributed.together``: an error on one rank raises on all) and one
``all_reduce_sum`` of its sums (with the covariance stage, the digests of every rank's
examples, so that every rank knows the fingerprint of the whole training set), and one for the
eigendecompositions. Only rank 0 writes the store's merged files; it issues no collective of its
own. An offline shard (``fit(shard=...)``) issues none at all, even under a process group.
"""
from __future__ import annotations

import numpy as np
import torch

from ...distributed import all_reduce_sum, together
from ..checkpoints import model_device
from .factors import covariance_factors, eigen, set_lambda
from .partials import Partials, basis_digest
from .sharding import Split, agree
from .storage import FactorStore, dataset_len


def factors_of(method, train, k: int, fp: str, store: FactorStore | None, data, split: Split) -> dict | None:
    """The factors of checkpoint k; None when this process ran a shard (``split.offline``)
    whose stage cannot be merged yet (other shards' partial sums are missing)."""
    stages, layers, device = method.stages, method.layers, model_device(method.model)
    present = dict(zip(stages, agree([store is not None and store.exists(s, fp) for s in stages], split.group,
                                     f"which factor files of checkpoint {fp} the store holds")))
    if present["covariance"]:
        store.check_data(fp, data.digests)
    if all(present.values()):
        return store.load(stages, fp, layers, device)
    if present["covariance"]:
        factors = store.load(("covariance",), fp, layers, device)
    else:
        sums = stage_sums(method, "covariance", train, k, fp, store, data, split)
        if sums is None:
            return None
        factors = covariance_factors(layers, sums)
        if store is not None and split.writer:
            store.save("covariance", fp, factors, int(sums["examples"]), data.digests)
    if present["eigen"]:
        store.load(("eigen",), fp, layers, device, factors)
    else:
        eigen(layers, factors, method.block_width, split.group, method.eigh_dtype)
        if store is not None and split.writer:
            store.save("eigen", fp, factors)
            if split.offline:  # shards running at once: use the basis on file, whichever wrote it last
                store.load(("eigen",), fp, layers, device, factors)
    if "lambda" in stages:
        sums = stage_sums(method, "lambda", train, k, fp, store, data, split, factors)
        if sums is None:
            return None
        set_lambda(layers, factors, sums)
        if store is not None and split.writer:
            store.save("lambda", fp, factors)
    return factors


def stage_sums(method, stage: str, train, k: int, fp: str, store, data, split: Split, factors=None) -> dict | None:
    """The sums of ``stage`` over every training example (float64 / int64, on the model's device),
    or None for an offline shard whose stage cannot be merged yet."""
    passes, device = method.passes, model_device(method.model)

    def compute(shard):
        if stage == "covariance":
            # without a store the factors live in this process only, so its score will follow:
            # keep the training loss's captures for it (``replay``)
            return passes.covariances(train, k, method.fisher, method.seed, data, shard,
                                      replay="lambda" in method.stages,
                                      hold=method.store_path is None and split.shard is None)
        return passes.correction(train, k, factors, method.fisher, method.seed, data, shard)

    def merged(partials):
        partials.covering()  # MissingShards naming the gaps before any work
        digests = data.digests
        if digests is None:  # one hashing pass (no model call) over the loader's examples
            digests = passes.hash(train)
        sums = partials.merge(digests)
        data.recorded(digests)
        return {key: v.to(device) for key, v in sums.items()}

    n = dataset_len(train)
    if split.offline:
        shard = split.shard
        partials = Partials(store, stage, fp, n, train.batch_size, basis_digest(factors) if factors else "")
        if not partials.done(shard):
            with together(f"the {stage} pass of checkpoint {k}", shard, split.group):
                sums = compute(shard)
            partials.save(shard, sums, data.seen if len(shard) else np.zeros(0, dtype=np.uint64))
        return merged(partials) if partials.ready() else None
    group = split.group
    if agree([store is not None and Partials.exist(store, stage, fp)], group,
             f"whether the store holds partial {stage} sums")[0]:
        return merged(Partials(store, stage, fp, n, getattr(train, "batch_size", None),
                               basis_digest(factors) if factors else ""))
    with together(f"the {stage} pass of checkpoint {k}", split.shard, group):
        sums = compute(split.shard)
    if group.distributed:
        tensors = list(sums.values())
        if stage == "covariance":  # the digests of every rank's examples, each in its range
            digests = torch.zeros(n, dtype=torch.int64)
            if len(split.shard):
                digests[split.shard.start:split.shard.stop] = torch.from_numpy(data.seen.view(np.int64))
            tensors.append(digests)
        all_reduce_sum(tensors, what=f"{stage} sums of checkpoint {k}")
        if stage == "covariance":
            data.recorded(digests.numpy().view(np.uint64))
    return sums
