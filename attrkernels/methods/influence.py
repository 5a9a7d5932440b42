"""Influence functions (Koh & Liang, 2017): explicit, conjugate-gradient and LiSSA inverses.

Upweighting training example i by eps in the mean training loss L = (1/N) sum_i l_i moves the
optimum by -eps (H + damping I)^{-1} grad l_i, so the measurement f_j of test example j moves
by -eps grad f_j^T (H + damping I)^{-1} grad l_i. The score, [n_train, n_test] with the
orientation and sign of ``methods.base``, is

    score[i, j] = - grad l_i^T (H + damping I)^{-1} grad f_j            (averaged over checkpoints)

with l = ``task.loss``, f = ``task.measure``, H the Hessian (``curvature="hessian"``) or the
Gauss-Newton matrix (``"gauss-newton"``, positive semi-definite: J^T (d^2 l / dz^2) J with z =
``task.logits`` and l = ``task.logit_loss(z)``, convex in z, e.g. cross-entropy) of the mean
training loss over the train loader, at each checkpoint. Removing example i changes f_j by
about -score[i, j] / N. Weight decay of the training objective is not part of L: add its
coefficient to ``damping`` to include it.

How: per checkpoint, the test gradients G [p, n_test] (``capture.Gradients``) are
solved for all at once, X = (H + damping I)^{-1} G, then the training set is streamed and
score[batch] = -G_batch^T X, with the per-example training gradients from the same capture
(never a per-example vmap over the whole model). The three solvers:

* ``InfluenceExplicit``: the exact damped curvature built from p curvature-vector products
  (``hvp`` with unit vectors, in chunks), stored packed in float64 (4 p^2 bytes) and factorised
  by Cholesky (``kernels.packed``); for small models (p up to a few 10^4).
* ``InfluenceCG``: block conjugate gradient (``kernels.cg``), one pass over the training data per
  step for all test examples, to a relative residual ``tol``.
* ``InfluenceLiSSA``: the stochastic Neumann recursion (``kernels.lissa``) on minibatch
  curvatures, cycling through the train loader.

Under a ``torch.distributed`` process group (CG and explicit; the library never initialises one),
rank r of W passes over shard r of the training set (``distributed.rank_shard``): every
curvature-vector product is the sum of the ranks' shard sums (``methods.curvature``: one
``all_reduce_sum`` per CG step or per explicit chunk), so every rank holds the same products and
runs the same solver arithmetic on them; ``score`` writes each rank's training rows into
``out=`` (a path every rank sees; ``methods.scores.ScoreOutput``). Fit and score must run with
the same world size (``distributed.check_world``). ``InfluenceLiSSA`` runs in one process (its
recursion is a sequence of minibatch products that a split does not shorten) and refuses a
process group.

A damped curvature that is not positive definite (e.g. the Hessian of a non-convex model with
``damping=0``) raises ``attrkernels.utils.errors.NotPositiveDefiniteError`` (a ValueError) with a
damping estimated by Lanczos (``kernels.lanczos``).
"""
from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from ..capture import Gradients, make_plan
from ..distributed import check_world, process_group, rank_shard, shard_loader, together
from ..kernels.cg import block_cg
from ..kernels.lanczos import lanczos_extremes
from ..kernels.lissa import lissa
from ..kernels.packed import PackedSPD
from ..utils.checks import check_damping, check_number, check_positive_int
from ..utils.errors import NotPositiveDefiniteError
from .base import AttributionMethod, call_task
from .checkpoints import as_checkpoints, checked_checkpoints, checkpoint_loop
from .curvature import CURVATURES, Curvature, check_gauss_newton, check_gauss_newton_task
from .passes import checked
from .scores import shard_scores

class _Influence(AttributionMethod):
    """Shared fit/score of the influence methods; subclasses implement ``_prepare`` and ``_solve``."""

    def __init__(self, model, task, *, damping: float = 0.0, curvature: str = "hessian", params=None,
                 hvp_chunk=None, verbose: bool = True):
        super().__init__(model, task, verbose=verbose)
        self.damping = check_damping(damping)
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if curvature == "gauss-newton":
            check_gauss_newton_task(task)
        check_positive_int("hvp_chunk", hvp_chunk, optional=True)
        self.curvature, self.hvp_chunk = curvature, hvp_chunk
        self.plan = make_plan(model, params)
        self.checkpoints = None
        self.train = self._train_passes = self.shard = None
        self.info: list = []  # per checkpoint: the solver's diagnostics

    def curvature_at(self, index: int = 0) -> Curvature:
        """The damped curvature at checkpoint ``index`` (loaded in the model); each of its
        passes over the train loader is checked (``DataPasses``)."""
        return Curvature(self.model, self.task, self.plan, self._train_passes.batches(f"checkpoint {index}"),
                         damping=self.damping, curvature=self.curvature, chunk=self.hvp_chunk, shard=self.shard)

    def fit(self, train, checkpoints=None):
        """Record the training loader and checkpoints (state dicts, paths or ``ak.tasks.Checkpoint``;
        snapshotted), after checking them: the loader (``DataPasses``), and at every checkpoint
        one forward pass over the training data (finite losses, labels; for Gauss-Newton that
        task.loss is task.logit_loss of task.logits), so a bad example is named before the
        curvature's many passes.

        Under a ``torch.distributed`` process group each rank passes over its shard of the
        training set (``distributed.rank_shard``): every curvature product is all-reduced, every
        rank solves the same system, and ``score`` splits the training rows (``out=`` a path).
        """
        self.checkpoints = checked_checkpoints(self.model, checkpoints)
        self.shard, self._world = rank_shard(train), process_group().size
        self.train = train
        self._train_passes = self._passes(train if self.shard is None else shard_loader(train, self.shard), "train")
        with checkpoint_loop(self.model, self.checkpoints) as loop:
            for index, _ in loop:
                with together(f"the check of the training data at checkpoint {index}", self.shard):
                    self._check_pass(index)
                self._prepare(index)
        return self

    def _has_rows(self) -> bool:
        """Whether this process has training examples (a rank's shard can be empty when N < world size)."""
        return self.shard is None or len(self.shard) > 0

    def _check_pass(self, index: int) -> None:
        if not self._has_rows():
            return
        with self._train_passes.over(self._context(index)) as batches, torch.no_grad():
            for start, batch, size in batches:
                call_task(self.task.loss, self.model, batch, size, "train")
                if start == 0 and self.curvature == "gauss-newton":
                    check_gauss_newton(self.task, self.model, [(start, batch, size)])

    def _prepare(self, index: int) -> None:
        """Per-checkpoint work that does not depend on the test set (model loaded)."""

    def _solve(self, index: int, G: torch.Tensor) -> torch.Tensor:
        """X = (H + damping I)^{-1} G for G [p, n_test] (model loaded with checkpoint ``index``)."""
        raise NotImplementedError

    def _gradients(self, passes, fn, name: str, index: int) -> list:
        """Per-example gradients [B, p] of ``fn`` over one checked pass (``DataPasses``)."""
        gradients = Gradients(self.model, checked(fn, name), params=self.plan.names)
        with passes.over(f"checkpoint {index}") as batches:
            return [gradients(batch) for _, batch, _ in batches]

    def score(self, test, *, out=None) -> torch.Tensor:
        """Scores [n_train, n_test] (float32); positive = including the training example raises f.

        ``out``: None (a new tensor), a path (a float32 .npy file) or an array to fill
        (``methods.scores.ScoreOutput``); under a process group a path every rank sees, into
        which each rank writes the rows of its shard (``methods.scores.ScoreOutput``)."""
        if self.checkpoints is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(train, checkpoints) before score()")
        check_world(self._world, type(self).__name__)
        scores = None
        self.info = []
        test_passes = self._passes(test, "test")
        with checkpoint_loop(self.model, self.checkpoints, desc=type(self).__name__, verbose=self.verbose) as loop:
            for index, _ in loop:
                G = torch.cat(self._gradients(test_passes, self.task.measure, "measure", index)).T
                X = self._solve(index, G.contiguous())
                part = self._stream_train(X, index)
                scores = part if scores is None else scores + part
        scores = (scores / len(self.checkpoints)).to(torch.float32)
        return shard_scores(scores, out, self.shard)

    def _stream_train(self, X: torch.Tensor, index: int = 0) -> torch.Tensor:
        """-G_train^T X over the train loader (this rank's shard), [rows, n_test] float64."""
        rows = []
        gradients = Gradients(self.model, checked(self.task.loss, "loss"), params=self.plan.names)
        with together(f"the score pass of checkpoint {index}", self.shard):
            if self._has_rows():
                with self._train_passes.over(self._context(index)) as batches:
                    rows = [-(gradients(batch).to(X.dtype) @ X).to(torch.float64) for _, batch, _ in batches]
        return torch.cat(rows).cpu() if rows else torch.zeros(0, X.shape[1], dtype=torch.float64)

    def _context(self, index: int) -> str:
        """Where a pass over the training data is, for errors (a rank's shard counts from its start)."""
        shard = "" if self.shard is None else f", shard [{self.shard.start}, {self.shard.stop})"
        return f"checkpoint {index}{shard}"


class InfluenceCG(_Influence):
    """Influence functions with block conjugate gradient: all test examples solved together.

    InfluenceCG(model, task, *, damping=0.0, curvature="hessian", tol=1e-4, max_iter=100,
                params=None, hvp_chunk=None, query_batch=None, verbose=True)

    damping: lambda >= 0 added to the curvature; curvature: "hessian" or "gauss-newton";
    tol: per-column relative residual ||G - (H + damping I) X|| / ||G|| to reach; max_iter: at most
    this many passes over the training data (a CGConvergenceWarning lists unconverged residuals);
    params: names of the tracked parameters (default all trainable); hvp_chunk: vectors per
    vmapped product (memory); query_batch: test examples per block solve (default: all).
    ``info`` holds the CGResult (without x) of every block solve, checkpoint by checkpoint.

    The first block-CG step is the exact solution restricted to the span of the test gradients
    (a Galerkin projection), so ``max_iter=1`` is a cheap, sound approximation: on digits-mlp
    it scores LDS 0.77 in one pass over the training data, as the converged solve does
    (benchmarks/results/influence_cpu.md).
    """

    def __init__(self, model, task, *, damping: float = 0.0, curvature: str = "hessian", tol: float = 1e-4,
                 max_iter: int = 100, params=None, hvp_chunk=None, query_batch=None, verbose: bool = True):
        super().__init__(model, task, damping=damping, curvature=curvature, params=params,
                         hvp_chunk=hvp_chunk, verbose=verbose)
        check_number("tol", tol, positive=True)
        check_positive_int("max_iter", max_iter)
        check_positive_int("query_batch", query_batch, optional=True)
        self.tol, self.max_iter, self.query_batch = tol, max_iter, query_batch

    def _solve(self, index, G):
        op = self.curvature_at(index)
        step = G.shape[1] if self.query_batch is None else self.query_batch
        parts = []
        for start in range(0, G.shape[1], step):
            try:
                result = block_cg(op.matvec, G[:, start:start + step], tol=self.tol, max_iter=self.max_iter)
            except NotPositiveDefiniteError as err:
                raise op.not_positive_definite(err.found) from err
            parts.append(result.x)
            result.x = None
            self.info.append(result)
        return torch.cat(parts, 1)


class InfluenceExplicit(_Influence):
    """Influence functions with the exact damped curvature, factorised by Cholesky in float64.

    InfluenceExplicit(model, task, *, damping=0.0, curvature="hessian", params=None,
                      hvp_chunk=256, verbose=True)

    ``fit`` builds, per checkpoint, the p x p curvature from p / hvp_chunk passes of curvature-
    vector products with unit vectors and keeps its Cholesky factor in packed storage:
    4 p^2 bytes per checkpoint (2.7 GB for p = 26,122). For small models or a few tracked layers
    (``params``).
    """

    def __init__(self, model, task, *, damping: float = 0.0, curvature: str = "hessian", params=None,
                 hvp_chunk: int = 256, verbose: bool = True):
        super().__init__(model, task, damping=damping, curvature=curvature, params=params,
                         hvp_chunk=hvp_chunk, verbose=verbose)
        self.factors: list = []

    def fit(self, train, checkpoints=None):
        checkpoints = as_checkpoints(self.model, checkpoints)
        need = 4 * self.plan.total * (self.plan.total + 2) * len(checkpoints)
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > 0.8 * physical:
            raise MemoryError(
                f"InfluenceExplicit needs {need / 1e9:.1f} GB for the packed curvature of "
                f"{self.plan.total} parameters; this machine has {physical / 1e9:.1f} GB. "
                "Use InfluenceCG, or track fewer parameters with params=")
        self.factors = []
        return super().fit(train, checkpoints)

    def _prepare(self, index):
        op = self.curvature_at(index)
        p, step = op.p, self.hvp_chunk
        dtype, device = self.plan.params[0].dtype, self.plan.params[0].device
        packed = PackedSPD(p)
        for start in tqdm(range(0, p, step), desc=f"curvature of checkpoint {index}", unit="chunk",
                          disable=not self.verbose):
            stop = min(p, start + step)
            E = torch.zeros(p, stop - start, dtype=dtype, device=device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            packed.set_rows(start, op.full(E, 0.0).T)
        packed.shift(self.damping)
        try:
            packed.factor()
        except NotPositiveDefiniteError as err:
            raise op.not_positive_definite() from err
        self.factors.append(packed)

    def _solve(self, index, G):
        return self.factors[index].solve(G).to(G.device)


class InfluenceLiSSA(_Influence):
    """Influence functions with LiSSA: batched stochastic Neumann series on minibatch curvatures.

    InfluenceLiSSA(model, task, *, damping=0.0, curvature="hessian", depth=1000, repeat=1,
                   scale=None, params=None, hvp_chunk=None, verbose=True)

    Each recursion step multiplies every test column by the curvature of the next batch of the
    train loader (cycling through it). scale: s above the largest eigenvalue of every minibatch
    curvature + damping (default: 2 (theta_max + damping) with theta_max a Lanczos estimate for the
    full curvature); depth: steps per recursion (the error decays like (1 - damping / s)^depth at
    worst); repeat: recursions averaged. ``info[c]`` holds the LissaResult (without x).
    """

    def __init__(self, model, task, *, damping: float = 0.0, curvature: str = "hessian", depth: int = 1000,
                 repeat: int = 1, scale=None, params=None, hvp_chunk=None, verbose: bool = True):
        super().__init__(model, task, damping=damping, curvature=curvature, params=params,
                         hvp_chunk=hvp_chunk, verbose=verbose)
        check_positive_int("depth", depth)
        check_positive_int("repeat", repeat)
        check_number("scale", scale, positive=True, optional=True)
        self.depth, self.repeat, self.scale = depth, repeat, scale

    def _minibatches(self, index: int = 0):
        """The train loader's batches, cycling; every pass checked (``DataPasses``)."""
        batches = self._train_passes.batches(f"checkpoint {index}")
        while True:
            empty = True
            for batch in batches:
                empty = False
                yield batch
            if empty:
                raise ValueError("the train loader yielded no batches")

    def fit(self, train, checkpoints=None):
        if process_group().distributed:
            raise RuntimeError("InfluenceLiSSA runs in one process: its recursion multiplies by one minibatch "
                               "curvature after another, which a split of the training set does not shorten; under "
                               "a process group use InfluenceCG (each curvature product all-reduced)")
        return super().fit(train, checkpoints)

    def _solve(self, index, G):
        op = self.curvature_at(index)
        scale = self.scale
        if scale is None:
            _, high = lanczos_extremes(lambda v: op.full(v, 0.0), op.p, steps=20,
                                       dtype=self.plan.params[0].dtype, device=G.device)
            scale = 2 * (max(high, 0.0) + self.damping)
        stream = self._minibatches(index)

        def operator(X):
            return op.apply(X, [next(stream)], 0.0)

        result = lissa(operator, G, scale=scale, depth=self.depth, damping=self.damping, repeat=self.repeat)
        x, result.x = result.x, None
        self.info.append(result)
        return x


__all__ = ["InfluenceExplicit", "InfluenceCG", "InfluenceLiSSA", "Curvature"]
