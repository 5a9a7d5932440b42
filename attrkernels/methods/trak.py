"""TRAK (Park et al., 2023) on the engine's featurizer, with a resumable on-disk store that can be
written by shards of the training set in any number of processes.

For checkpoints m = 1..M (each with projection seed s_m = derive_seed(seed, m - 1)):

    Phi_m  [n_train, k]  sketched gradients of the measurement (margin) of training examples
    Q_m    [n_train]     out-to-loss weights 1 - p_correct (task.out_to_loss)
    K_m  = Phi_m^T Phi_m  [k, k], float64;  lambda_m = damping or alpha * trace(K_m) / min(k, n_train)
    phi_m  [n_test, k]   the same features of the test examples

    scores = diag(Qbar) (1/M) sum_m Phi_m (K_m + lambda_m I)^{-1} phi_m^T      [n_train, n_test]

with Qbar = (1/M) sum_m Q_m (the paper averages the weights and the kernels separately). The
solve uses a float64 Cholesky factor of K_m + lambda_m I (never an inverse); a kernel that is not
positive definite raises with the damping that would fix it. The default damping is alpha = 2
times the mean nonzero eigenvalue of K_m (K_m has min(k, n_train) of them). With lambda = 0 the
estimate collapses as k approaches n_train, where K_m becomes ill-conditioned (traker: LDS 0.46
at k = 128 to 0.31 at k = 512 on the digits MLP). alpha was chosen on the digits MLP
(``python -m benchmarks.trak --sweep``): measured against the mean nonzero eigenvalue the best
alpha stays between about 2 and 5 for k from 128 to 2048, while against trace / k it grows
from about 2 to 10.

Sign: with loss = log(1 + exp(-margin)), grad loss_i = -(1 - p_i) grad margin_i, so these are
influence-function scores -grad f_test^T H^{-1} grad loss_train of the linearised model with
H ~ Phi^T Phi: positive = including training example i raises the test margin.

Store layout (``store=`` directory; a temporary one when None):
    meta.json                settings (k, kind, seed, mode, damping, dtype, n_train, chunk, checkpoints)
    train_<m>.f32 (+ .done)  [n_train, k + 1]: Phi_m | Q_m, one chunk per train batch, resumable
                             (``.f16`` / ``.bf16`` with ``dtype=``: ``methods.trak_store``)
    kernel_<m>.npz           K_m, lambda_m, Cholesky factor of K_m + lambda_m I, the features' signature
    shards/<start>-<stop>/   a shard's train_<m>.*, gram_<m>.npz (its Phi^T Phi) and manifest
                             (``distributed.manifest``: settings hash, model fingerprints, dtype,
                             the data fingerprint of its examples), written by ``fit(..., shard=)``

Scale-out: ``fit(train, checkpoints, shard=(i, n))`` featurises only shard i of n (split at
train-batch boundaries, so its features are bit-identical to a one-process run's) into its own
directory; rerunning a finished shard does nothing. Under an initialised ``torch.distributed``
group, shard = (rank, world size) with no code change, and the kernels K_m are summed across ranks
(one ``all_reduce_sum`` of every partial Phi^T Phi and the example digests, then a barrier).
Without a group (a job array) a final ``fit(train, checkpoints)`` without ``shard`` merges:
it checks every shard's settings and data against the loader (one hashing pass, no features) and
adds the shards' partial kernels. Opening a store is a pure function of the finished shards, for
any world size: ranks of a later run (of any size) read their rows from whichever shards cover
them. ``score`` splits the training rows over the ranks, each writing its rows of ``out=``.
Scoring streams tiles of features (``methods.trak_score``), so memory is bounded for any
n_train x n_test.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..capture import Featurizer, make_plan
from ..capture.featurizer import DEFAULT_MEMORY_BUDGET, MODES
from ..distributed import (Shard, all_reduce_sum, batch_shard, check_settings, process_group, shard_directory,
                           shard_manifests, shard_of)
from ..kernels.philox import derive_seed
from ..kernels.projection import check_k, check_kind
from ..store import Store, damaged
from ..utils.checks import check_damping, check_memory_budget, check_number, check_positive_int, check_seed
from .base import AttributionMethod, call_task
from .checkpoints import checked_checkpoints, checkpoint_loop, fingerprint
from .passes import checked, chunk_digest, iterate
from .scores import ScoreOutput
from .trak_shards import ShardedFit
from .trak_score import column_block, score_rows, self_influence_rows
from .trak_store import (Features, Part, check_dtype, check_sizes, cho_solve, cholesky, encode, feature_array,
                         feature_file)

DEFAULT_DAMPING_RATIO = 2.0


def _loader_size(loader, task):
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        sampler = getattr(loader, "sampler", None)
        return len(sampler) if sampler is not None and hasattr(sampler, "__len__") else len(dataset)
    return sum(size for _, _, size in iterate(loader, task, "train"))


def _chunk_size(loader, task):
    size = getattr(loader, "batch_size", None)
    if size:
        return int(size)
    for _, _, size in iterate(loader, task, "train"):
        return size


class TRAK(ShardedFit, AttributionMethod):
    """TRAK with the shared interface: ``fit(train, checkpoints)``, ``score(test)``.

    Args:
        model, task: any nn.Module and a Task (``ak.tasks.Classification()``).
        k: projection dimension.
        seed: base seed; checkpoint m uses derive_seed(seed, m).
        kind: "rademacher" or "gaussian" projection.
        mode: featurizer mode, "dense" (exact sketch) or "factored" (Kronecker, LoGra-style).
        damping: lambda added to Phi^T Phi; None = damping_ratio * trace(Phi^T Phi) / min(k, n_train).
        damping_ratio: alpha of the default damping (default 2).
        store: directory for features and kernels (resumable); None = a temporary directory.
        dtype: storage of the training features, "float32" (default), "float16" or "bfloat16"
            (half the disk; scores are still computed in float32).
        params: names of the parameters to differentiate (default: all trainable).
        backend, memory_budget: passed to the Featurizer.
        verbose: progress bars.

    ``fit(train, checkpoints=None, *, shard=None)``; ``score(test, *, out=None, tile=4096)`` ->
    [n_train, n_test]; ``self_influence(*, tile=4096)`` -> [n_train]. A kernel K_m + lambda_m I that
    is not positive definite raises ``attrkernels.utils.errors.NotPositiveDefiniteError`` with the
    damping that would fix it.
    """

    def __init__(self, model, task, *, k=2048, seed=0, kind="rademacher", mode="dense",
                 damping=None, damping_ratio=DEFAULT_DAMPING_RATIO, store=None, dtype="float32", params=None,
                 backend="auto", memory_budget=DEFAULT_MEMORY_BUDGET, verbose=True):
        super().__init__(model, task, verbose=verbose)
        check_damping(damping, optional=True)
        check_number("damping_ratio", damping_ratio)
        if not callable(getattr(task, "out_to_loss", None)):
            raise TypeError("TRAK needs task.out_to_loss(model, batch) (1 - p_correct)")
        # k, kind, mode, seed, params and memory_budget are checked now rather than in the middle of fit.
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.k, self.seed, self.kind, self.mode = check_k(k), check_seed(seed), check_kind(kind), mode
        self.damping, self.damping_ratio, self.dtype = damping, damping_ratio, check_dtype(dtype)
        self.params, self.backend, self.memory_budget = params, backend, check_memory_budget(memory_budget)
        make_plan(model, params)
        self._tmp = None if store is not None else tempfile.TemporaryDirectory(prefix="attrkernels-trak-")
        self.store_path = Path(store if store is not None else self._tmp.name)
        self.store, self._features, self._checkpoints = None, None, None

    def _featurizer(self, m):
        return Featurizer(self.model, checked(self.task.measure, "measure"), self.k, seed=derive_seed(self.seed, m),
                          kind=self.kind, mode=self.mode, params=self.params,
                          backend=self.backend, memory_budget=self.memory_budget)

    # -----------------------------------------------------------------------------------------
    def fit(self, train, checkpoints=None, *, shard=None):
        """Featurise the training set at every checkpoint and factor the kernels (resumable).

        ``shard``: None (the whole set; under a process group, shard = (rank, world size)),
        ``(i, n)`` (shard i of n, split at batch boundaries: ``distributed.batch_shard``) or a
        ``distributed.Shard`` starting at a batch boundary. With an explicit shard and no process
        group only the shard's features are written; a later ``fit`` without ``shard`` merges.

        What is verified (see the README, "What is verified"): the loader (``DataPasses``: no
        shuffling, no drop_last, re-iterable; every pass yields the examples of the first);
        each stored chunk of features was computed from the examples the loader yields now
        (else ``StoreMismatch``); every shard's settings and the fingerprint of its examples
        (``distributed.manifest``); the stored features' checksums (a damaged chunk is
        recomputed, with a warning); each kernel against the signature of the features it was
        computed from (recomputed when they differ); the sizes of the features (disk) and kernel
        (memory) before anything is written. One process at a time writes a file of features.
        The model's own weights are restored afterwards.
        """
        checkpoints = checked_checkpoints(self.model, checkpoints)  # mismatches refused before any work
        group = process_group()
        passes = self._passes(train, "train")  # bad loaders refused before any work
        n_train = _loader_size(train, self.task)
        if n_train < 1:
            raise ValueError("the train loader yielded no examples")
        chunk = _chunk_size(train, self.task)
        shard = self._shard(shard, group, n_train, chunk)
        rows = n_train if shard is None else len(shard)
        check_sizes(self.k, self.dtype, rows, len(checkpoints), self.store_path if shard is None else
                    shard_directory(self.store_path, shard))
        self.store = Store(self.store_path, {
            "method": "TRAK", "k": self.k, "seed": self.seed, "kind": self.kind, "mode": self.mode,
            "damping": self.damping, "damping_ratio": self.damping_ratio, "params": self.params,
            "n_train": n_train, "chunk": chunk, "checkpoints": [fingerprint(c) for c in checkpoints],
            **({} if self.dtype == "float32" else {"dtype": self.dtype}),
        })
        self.num_checkpoints, self.n_train, self._chunk = len(checkpoints), n_train, chunk
        self._checkpoints = self._features = None
        found = shard_manifests(self.store_path)
        check_settings(found, self.store.meta)
        if shard is not None:
            self._fit_shard(train, checkpoints, shard, group, found)
        elif found:  # a job array's last step: merge (MissingShards names any shard not finished)
            self._merge(passes, found)
        else:
            self._fit_whole(passes, checkpoints)
        if group.distributed or shard is None:
            self._checkpoints = checkpoints
        return self

    def _shard(self, shard, group, n_train, chunk) -> Shard | None:
        if shard is None:
            return batch_shard(n_train, chunk, group.rank, group.size) if group.distributed else None
        if group.distributed:
            raise ValueError("shard= is taken from (rank, world size) under a process group; pass shard=None")
        if isinstance(shard, tuple) and len(shard) == 2:
            return batch_shard(n_train, chunk, *shard)
        if not isinstance(shard, Shard):
            raise TypeError(f"shard must be None, (index, count) or a distributed.Shard, got {shard!r}")
        if shard.stop > n_train or shard.start % chunk or (shard.stop % chunk and shard.stop != n_train):
            raise ValueError(f"shard [{shard.start}, {shard.stop}) must lie in the {n_train} training examples and "
                             f"start and stop at multiples of the batch size {chunk} (or at n_train): use "
                             "shard=(index, count) or distributed.batch_shard")
        return Shard(shard.start, shard.stop, shard.index, shard.count, n_train)

    # -- the three ways of fitting: the whole set in one process, one shard, a merge of shards ----
    def _fit_whole(self, passes, checkpoints):
        n, chunk = self.n_train, self._chunk
        self._features = []
        with checkpoint_loop(self.model, checkpoints) as loop:
            for m, _ in loop:
                arr = feature_array(self.store.file(feature_file(m, self.dtype)), n, self.k, chunk, self.dtype)
                arr.lock()  # one writer at a time; a second process waits, then checks what the first wrote
                try:
                    arr.verify(repair=True)  # flipped bits: those chunks are recomputed
                    self._featurize_train(m, arr, passes, n, chunk)
                    features = Features([Part(arr, 0, 0, n)], self.k, self.dtype)
                    if not self._kernel_current(m, features):
                        self._factor(m, features.gram(0, n), features)
                finally:
                    arr.unlock()
                self._features.append(features)
        if passes.digests is not None:
            self.store.write_json("data.json", passes.fingerprint())

    def _featurize_train(self, m, arr, passes, n_rows, chunk):
        """Featurise the chunks of checkpoint m that are missing; check that the done ones were
        computed from the examples the loader yields now."""
        missing = set(arr.missing())
        if not missing and passes.digests is not None:  # done, and the data is known: no pass needed
            for i in range(arr.num_chunks):
                arr.check_data(i, chunk_digest(passes.digests[slice(*arr.rows(i))]))
            return
        if missing and len(missing) < arr.num_chunks and passes.digests is None:
            # Resuming with data not yet seen: check every done chunk before writing any new one,
            # so that a store is never left holding chunks of two data sets.
            with passes.over(f"checkpoint {m}") as batches:
                for start, _, _ in batches:
                    if start % chunk == 0 and start // chunk < arr.num_chunks:
                        arr.check_data(start // chunk, chunk_digest(passes.batch_digests))
        featurizer = self._featurizer(m) if missing else None
        bar = tqdm(total=n_rows, desc=f"TRAK featurize checkpoint {m}", disable=not self.verbose or not missing,
                   unit="ex")
        with passes.over(f"checkpoint {m}") as batches:
            for start, batch, size in batches:
                i = start // chunk
                if start % chunk or (size != chunk and start + size != n_rows) or start + size > n_rows:
                    raise ValueError(f"train batches must all have {chunk} examples except the last "
                                     f"(batch at example {start} has {size}; n_train = {n_rows})")
                data = chunk_digest(passes.batch_digests)
                if i not in missing:
                    arr.check_data(i, data)
                    bar.update(size)
                    continue
                with torch.no_grad():  # first: it names non-finite examples and bad labels clearly
                    q = call_task(self.task.out_to_loss, self.model, batch, size, "train")
                arr.write(i, encode(featurizer(batch), q, self.dtype), data=data)
                bar.update(size)
        bar.close()
        if not arr.complete:
            raise ValueError(f"the train loader yielded fewer than the {n_rows} examples of its dataset")

    def _kernel_current(self, m, features) -> bool:
        """Whether kernel_<m>.npz holds the factor of exactly these features (warns when not)."""
        name = f"kernel_{m}.npz"
        if not self.store.exists(name):
            return False
        saved = self.store.load_arrays(name)
        if "features" in saved and str(saved["features"]) == features.signature():
            return True
        warnings.warn(f"store file {self.store.file(name)} was computed from other features than the feature "
                      "files hold now; it is recomputed", stacklevel=4)
        return False

    def _factor(self, m, K, features) -> None:
        """Factor K_m + lambda_m I and save it with the signature of the features it came from."""
        n = self.n_train
        lam = self.damping if self.damping is not None else self.damping_ratio * np.trace(K) / min(self.k, n)
        L = cholesky(K, lam, self.k, n, DEFAULT_DAMPING_RATIO)
        self.store.save_arrays(f"kernel_{m}.npz", K=K, damping=np.float64(lam), L=L,
                               features=np.array(features.signature()))

    def _factors(self, rows: Shard) -> list[np.ndarray]:
        """The Cholesky factor of every kernel, checked against the features it was computed
        from; the features of ``rows`` checked against their checksums (``StoreDamaged`` naming
        the file and the fix otherwise)."""
        factors = []
        for m, features in enumerate(self._features):
            for p in features.parts:
                if p.start < rows.stop and rows.start < p.stop:
                    if not p.array.complete:
                        raise damaged(p.array.path, f"chunks {p.array.missing()[:10]} are missing",
                                      "run fit(...) again with the same data to recompute them")
                    p.array.verify(repair=False)
            saved = self.store.load_arrays(f"kernel_{m}.npz")
            if "L" not in saved or "features" not in saved or str(saved["features"]) != features.signature():
                raise damaged(self.store.file(f"kernel_{m}.npz"), "it was not computed from the features the "
                              "store holds", "run fit(...) again to recompute it")
            factors.append(saved["L"])
        return factors

    def _rows(self) -> tuple[Shard, object]:
        if self._checkpoints is None:
            raise RuntimeError("call fit(train, checkpoints) before score() (after fit(..., shard=) on every "
                               "shard, once more without shard= to merge them)")
        group = process_group()
        return shard_of(self.n_train, group.rank, group.size), group

    # -----------------------------------------------------------------------------------------
    def _test_solves(self, test, factors) -> list[np.ndarray]:
        """X_m = phi_m (K_m + lambda_m I)^{-1} [n_test, k] float32 for every checkpoint, solved a
        test batch at a time."""
        passes, solves = self._passes(test, "test"), []
        with checkpoint_loop(self.model, self._checkpoints) as loop:
            for m, _ in loop:
                featurizer = self._featurizer(m)
                with passes.over(f"checkpoint {m}") as batches:
                    parts = [cho_solve(factors[m], featurizer(batch).cpu().double().numpy().T).T.astype(np.float32)
                             for _, batch, _ in tqdm(batches, desc=f"TRAK test features {m}",
                                                     disable=not self.verbose)]
                solves.append(np.concatenate(parts))
        return solves

    def score(self, test, *, out=None, tile=4096) -> torch.Tensor:
        """Scores [n_train, n_test] (float32), streaming ``tile`` training rows at a time.

        ``out``: None (a new tensor), a path (a float32 .npy file, returned as a tensor over its
        memory map) or an [n_train, n_test] tensor or array filled in place and returned
        (``methods.scores.ScoreOutput``). Under a process group each rank scores its rows
        (``shard_of(n_train, rank, world size)``, whatever the world size of ``fit``) into ``out``
        (a path every rank sees, or each rank's memory map of one shared file).
        """
        check_positive_int("tile", tile)
        rows, group = self._rows()
        factors = self._factors(rows)
        solves = self._test_solves(test, factors)
        n_test = solves[0].shape[0]
        cols = column_block(n_test, self.k, self.num_checkpoints)
        bar = tqdm(total=len(rows) * n_test, desc="TRAK score", disable=not self.verbose, unit="score")
        with ScoreOutput(out, n_test, n_train=self.n_train, group=group) as result:
            score_rows(self._features, solves, rows.start, rows.stop,
                       lambda r, c, values: result.write(r, values, col=c), tile=tile, cols=cols, progress=bar.update)
            bar.close()
            return result.finish(rows=self.n_train)

    def self_influence(self, *, tile=4096) -> torch.Tensor:
        """scores[i, i] with the training examples as the test set, [n_train] float32, computed a
        tile of training rows at a time (no test pass). Under a process group each rank computes
        its rows and one all-reduce of the [n_train] vector shares them."""
        check_positive_int("tile", tile)
        rows, group = self._rows()
        out = torch.zeros(self.n_train)
        out[rows.start:rows.stop] = torch.from_numpy(
            self_influence_rows(self._features, self._factors(rows), rows.start, rows.stop, tile=tile))
        all_reduce_sum([out], what="TRAK self-influence")
        return out
