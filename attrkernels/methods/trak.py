"""TRAK (Park et al., 2023) on the engine's featurizer, with a resumable on-disk store.

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
    meta.json                settings (k, kind, seed, mode, damping, n_train, chunk, checkpoints)
    train_<m>.f32 (+ .done)  [n_train, k + 1]: Phi_m | Q_m, one chunk per train batch, resumable
    kernel_<m>.npz           K_m, lambda_m, Cholesky factor of K_m + lambda_m I
Scoring streams tiles of training rows, so memory is bounded for any n_train x n_test, and can
write the scores into a memory map (``out=path``) or an array (``methods.scores.ScoreOutput``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..capture import Featurizer, make_plan
from ..capture.featurizer import DEFAULT_MEMORY_BUDGET, MODES
from ..kernels.philox import derive_seed
from ..kernels.projection import check_k, check_kind
from ..store import Store, damaged
from ..utils.checks import check_damping, check_memory_budget, check_number, check_positive_int, check_seed
from ..utils.errors import NotPositiveDefiniteError
from .base import AttributionMethod, call_task
from .checkpoints import checked_checkpoints, checkpoint_loop, fingerprint
from .passes import checked, chunk_digest, iterate
from .scores import ScoreOutput

DEFAULT_DAMPING_RATIO = 2.0


def _loader_size(loader, task):
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        sampler = getattr(loader, "sampler", None)
        return len(sampler) if sampler is not None and hasattr(sampler, "__len__") else len(dataset)
    return sum(size for _, _, size in iterate(loader, task, "train"))


def _free_memory() -> int | None:
    """Bytes of memory available now (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _free_disk(path: Path) -> int | None:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def _chunk_size(loader, task):
    size = getattr(loader, "batch_size", None)
    if size:
        return int(size)
    for _, _, size in iterate(loader, task, "train"):
        return size


class TRAK(AttributionMethod):
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
        params: names of the parameters to differentiate (default: all trainable).
        backend, memory_budget: passed to the Featurizer.
        verbose: progress bars.

    ``fit(train, checkpoints=None)``; ``score(test, *, out=None, tile=4096)`` -> [n_train, n_test].
    A kernel K_m + lambda_m I that is not positive definite raises
    ``attrkernels.utils.errors.NotPositiveDefiniteError`` with the damping that would fix it.
    """

    def __init__(self, model, task, *, k=2048, seed=0, kind="rademacher", mode="dense",
                 damping=None, damping_ratio=DEFAULT_DAMPING_RATIO, store=None, params=None,
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
        self.damping, self.damping_ratio = damping, damping_ratio
        self.params, self.backend, self.memory_budget = params, backend, check_memory_budget(memory_budget)
        make_plan(model, params)
        self._tmp = None if store is not None else tempfile.TemporaryDirectory(prefix="attrkernels-trak-")
        self.store_path = Path(store if store is not None else self._tmp.name)
        self.store = None

    def _featurizer(self, m):
        return Featurizer(self.model, checked(self.task.measure, "measure"), self.k, seed=derive_seed(self.seed, m),
                          kind=self.kind, mode=self.mode, params=self.params,
                          backend=self.backend, memory_budget=self.memory_budget)

    # -----------------------------------------------------------------------------------------
    def fit(self, train, checkpoints=None):
        """Featurise the training set at every checkpoint and factor the kernels (resumable).

        What is verified (see the README, "What is verified"): the loader (``DataPasses``: no
        shuffling, no drop_last, re-iterable; every pass yields the examples of the first);
        each stored chunk of features was computed from the examples the loader yields now
        (else ``StoreMismatch``); the stored features' checksums (a damaged chunk is recomputed,
        with a warning); each kernel against the checksum of the features it was computed from
        (recomputed when they differ); the sizes of the features (disk) and kernel (memory)
        before anything is written. One process at a time writes a checkpoint's features.
        The model's own weights are restored afterwards.
        """
        checkpoints = checked_checkpoints(self.model, checkpoints)  # mismatches refused before any work
        passes = self._passes(train, "train")
        n_train = _loader_size(train, self.task)
        if n_train < 1:
            raise ValueError("the train loader yielded no examples")
        chunk = _chunk_size(train, self.task)
        self._check_sizes(n_train, len(checkpoints))
        self.store = Store(self.store_path, {
            "method": "TRAK", "k": self.k, "seed": self.seed, "kind": self.kind, "mode": self.mode,
            "damping": self.damping, "damping_ratio": self.damping_ratio, "params": self.params,
            "n_train": n_train, "chunk": chunk, "checkpoints": [fingerprint(c) for c in checkpoints],
        })
        self.num_checkpoints, self.n_train = len(checkpoints), n_train
        self._checkpoints = None
        with checkpoint_loop(self.model, checkpoints) as loop:
            for m, _ in loop:
                arr = self.store.chunked(f"train_{m}.f32", n_train, self.k + 1, chunk)
                arr.lock()  # one writer at a time; a second process waits, then checks what the first wrote
                try:
                    arr.verify(repair=True)  # flipped bits: those chunks are recomputed
                    self._featurize_train(m, arr, passes, n_train, chunk)
                    self._factor_kernel(m, arr, n_train)
                finally:
                    arr.unlock()
        if passes.digests is not None:
            self.store.write_json("data.json", passes.fingerprint())
        self._checkpoints = checkpoints
        return self

    def _check_sizes(self, n_train: int, num_checkpoints: int) -> None:
        """Refuse, before anything is written, features that do not fit on the store's disk and
        kernels that do not fit in memory (with the numbers and the fix)."""
        kernel = 3 * 8 * self.k * self.k  # K, K + lambda I and its Cholesky factor, float64
        memory = _free_memory()
        if memory is not None and kernel > memory:
            raise MemoryError(
                f"TRAK with k = {self.k} needs {_gb(kernel)} of memory for the {self.k} x {self.k} float64 kernel "
                f"and its Cholesky factor, but {_gb(memory)} is available; reduce k (k = 2048 to 8192 is usual)")
        features = 4 * n_train * (self.k + 1)
        need = 0
        for m in range(num_checkpoints):
            path = self.store_path / f"train_{m}.f32"
            have = path.stat().st_size if path.exists() else 0
            need += max(features - have, 0)
        free = _free_disk(self.store_path)
        if free is not None and need > free:
            raise MemoryError(
                f"TRAK with k = {self.k} writes {_gb(features)} of features per checkpoint ({n_train} x {self.k + 1} "
                f"float32; {_gb(need)} still to write for {num_checkpoints} checkpoint(s)) to {self.store_path}, "
                f"whose disk has {_gb(free)} free; reduce k, pass store= on a larger disk, or use fewer checkpoints")

    def _featurize_train(self, m, arr, passes, n_train, chunk):
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
        bar = tqdm(total=n_train, desc=f"TRAK featurize checkpoint {m}", disable=not self.verbose or not missing,
                   unit="ex")
        with passes.over(f"checkpoint {m}") as batches:
            for start, batch, size in batches:
                i = start // chunk
                if start % chunk or (size != chunk and start + size != n_train) or start + size > n_train:
                    raise ValueError(f"train batches must all have {chunk} examples except the last "
                                     f"(batch at example {start} has {size}; n_train = {n_train})")
                data = chunk_digest(passes.batch_digests)
                if i not in missing:
                    arr.check_data(i, data)
                    bar.update(size)
                    continue
                with torch.no_grad():  # first: it names non-finite examples and bad labels clearly
                    q = call_task(self.task.out_to_loss, self.model, batch, size, "train")
                phi = featurizer(batch)
                arr.write(i, torch.cat([phi.cpu(), q.detach().cpu().reshape(-1, 1).float()], 1).numpy(), data=data)
                bar.update(size)
        bar.close()
        if not arr.complete:
            raise ValueError(f"the train loader yielded fewer than the {n_train} examples of its dataset")

    def _factor_kernel(self, m, arr, n_train):
        """Factor K_m + lambda_m I, unless kernel_<m>.npz already holds the factor of exactly
        these features (it records their checksum)."""
        name = f"kernel_{m}.npz"
        if self.store.exists(name):
            saved = self.store.load_arrays(name)
            if "features" in saved and str(saved["features"]) == arr.checksum():
                return
            warnings.warn(f"store file {self.store.file(name)} was computed from other features than "
                          f"{arr.path} holds now; it is recomputed", stacklevel=3)
        data = arr.read()
        K = np.zeros((self.k, self.k))
        for r0 in range(0, n_train, 8192):
            phi = np.asarray(data[r0:r0 + 8192, :self.k], dtype=np.float64)
            K += phi.T @ phi
        lam = self.damping if self.damping is not None else \
            self.damping_ratio * np.trace(K) / min(self.k, n_train)
        L = _cholesky(K, lam, self.k, n_train)
        self.store.save_arrays(name, K=K, damping=np.float64(lam), L=L, features=np.array(arr.checksum()))

    def _verified(self, m):
        """The features of checkpoint m and the Cholesky factor of its kernel, checked against
        their checksums (``StoreDamaged`` naming the file and the fix otherwise)."""
        n, k = self.n_train, self.k
        arr = self.store.chunked(f"train_{m}.f32", n, k + 1, self.store.meta["chunk"])
        if not arr.complete:
            raise damaged(arr.path, f"chunks {arr.missing()[:10]} are missing",
                          "run fit(...) again with the same data to recompute them")
        arr.verify(repair=False)
        saved = self.store.load_arrays(f"kernel_{m}.npz")
        if "L" not in saved or "features" not in saved or str(saved["features"]) != arr.checksum():
            raise damaged(self.store.file(f"kernel_{m}.npz"), f"it was not computed from the features {arr.path} "
                          "holds", "run fit(...) again to recompute it")
        return arr.read(), saved["L"]

    # -----------------------------------------------------------------------------------------
    def _test_features(self, m, passes):
        featurizer = self._featurizer(m)
        with passes.over(f"checkpoint {m}") as batches:
            feats = [featurizer(batch).cpu() for _, batch, _ in
                     tqdm(batches, desc=f"TRAK test features {m}", disable=not self.verbose)]
        return torch.cat(feats).double().numpy()

    def score(self, test, *, out=None, tile=4096) -> torch.Tensor:
        """Scores [n_train, n_test] (float32), streaming ``tile`` training rows at a time.

        ``out``: None (a new tensor), a path (written as a float32 .npy memory map and returned as
        a tensor over it) or an [n_train, n_test] tensor or array filled in place and returned
        (``methods.scores.ScoreOutput``).
        """
        if getattr(self, "_checkpoints", None) is None:
            raise RuntimeError("call fit(train, checkpoints) before score()")
        check_positive_int("tile", tile)
        M, n, k = self.num_checkpoints, self.n_train, self.k
        solves, qbar, arrays = [], np.zeros(n), []
        test_passes = self._passes(test, "test")
        with checkpoint_loop(self.model, self._checkpoints) as loop:
            for m, _ in loop:
                data, L = self._verified(m)
                phi_test = self._test_features(m, test_passes)
                X = _cho_solve(L, phi_test.T)  # [k, n_test] = (K + lambda I)^{-1} phi^T
                solves.append(torch.from_numpy(X.astype(np.float32)))
                qbar += np.asarray(data[:, k], dtype=np.float64) / M
                arrays.append(data)
        n_test = solves[0].shape[1]
        with ScoreOutput(out, n_test, n_train=n) as result:
            for r0 in tqdm(range(0, n, tile), desc="TRAK score", disable=not self.verbose):
                r1 = min(n, r0 + tile)
                acc = torch.zeros(r1 - r0, n_test)
                for m in range(M):
                    acc += torch.from_numpy(np.array(arrays[m][r0:r1, :k], dtype=np.float32)) @ solves[m]
                acc *= torch.from_numpy((qbar[r0:r1] / M).astype(np.float32)).reshape(-1, 1)
                result.write(r0, acc)
            return result.finish(rows=n)


def _cholesky(K, lam, k, n_train):
    """Cholesky factor of K + lam I; raises when it fails or the matrix is numerically singular
    (a pivot below 1e-10 of the largest, where float64 solves lose all accuracy)."""
    A = K + lam * np.eye(k)
    try:
        L = np.linalg.cholesky(A)
        pivots = np.diag(L) ** 2
        if not pivots.min() > 1e-10 * pivots.max():
            raise np.linalg.LinAlgError("numerically singular")
        return L
    except np.linalg.LinAlgError:
        mean_eig = np.trace(K) / min(k, n_train)
        hint = f"; k = {k} exceeds n_train = {n_train}, so Phi^T Phi has rank < k" if k > n_train else ""
        raise NotPositiveDefiniteError(
            f"the TRAK kernel Phi^T Phi + {lam:g} I ({k} x {k}) is not positive definite{hint}. "
            f"Pass damping > 0, e.g. damping={DEFAULT_DAMPING_RATIO * mean_eig:.3g} "
            f"({DEFAULT_DAMPING_RATIO:g} x its mean nonzero eigenvalue, the default of damping=None)."
        ) from None


def _cho_solve(L, B):
    """(L L^T)^{-1} B by two triangular solves, float64."""
    from scipy.linalg import solve_triangular

    Y = solve_triangular(L, B, lower=True)
    return solve_triangular(L.T, Y, lower=False)


