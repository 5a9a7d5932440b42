"""The configurations of the frontier: our methods with their settings, and the installed peers.

``ours(quick)`` and ``peers(quick)`` return ``attrkernels.eval.frontier.Config`` lists; ``quick``
keeps the cheap ones (the quick frontier finishes in minutes on 2 cores). Every method is called
through its public API (construct, ``fit(train, checkpoints)``, ``score(test)``), on the
checkpoints and loaders of the frontier's context, so ours and the peers are measured alike.

Settings tuned for the digits MLP (``digits-mlp``) and used as they are on other benchmarks:

* ``DIGITS_DAMPING = 1e-2``: the damping of the influence-function solvers (CG, LiSSA, explicit)
  and of dattri's IF-CG, chosen for the digits MLP; ``benchmarks.influence`` uses the same value
  (benchmarks/results/influence_cpu.md, part 2). Other models need their own.
"""
from __future__ import annotations

import importlib.util
import warnings

import attrkernels as ak
from attrkernels.eval.frontier import Config
from attrkernels.eval.harness import default_workers
from attrkernels.kernels.cg import CGConvergenceWarning

DIGITS_DAMPING = 1e-2


def _trak(k, mode="dense"):
    def run(ctx, ckpts, rates):
        m = ak.TRAK(ctx.model(), ctx.benchmark.task, k=k, mode=mode, verbose=False)
        return m.fit(ctx.train, ckpts).score(ctx.test)
    return run


def _tracin(k=None):
    def run(ctx, ckpts, rates):
        m = ak.TracIn(ctx.model(), ctx.benchmark.task, k=k, verbose=False)
        return m.fit(ctx.train, ckpts, learning_rates=rates).score(ctx.test)
    return run


def _influence(cls, **kwargs):
    def run(ctx, ckpts, rates):
        m = cls(ctx.model(), ctx.benchmark.task, verbose=False, **kwargs)
        with warnings.catch_warnings():
            if "max_iter" in kwargs:  # a truncated solve on purpose: its warning says nothing new
                warnings.simplefilter("ignore", CGConvergenceWarning)
            return m.fit(ctx.train, ckpts).score(ctx.test)
    return run


def _ekfac(cls, **kwargs):
    def run(ctx, ckpts, rates):
        m = cls(ctx.model(), ctx.benchmark.task, verbose=False, **kwargs)
        return m.fit(ctx.train, ckpts).score(ctx.test, train=ctx.train)
    return run


def _source(segments):
    """SOURCE with ``segments`` segments over a trajectory's checkpoints (their ``lr_sum``), with the
    benchmark recipe's momentum and weight decay (the unrolled SGD it approximates)."""
    def run(ctx, ckpts, rates):
        recipe = ctx.benchmark.recipe
        m = ak.SOURCE(ctx.model(), ctx.benchmark.task, segments=segments, momentum=recipe.momentum,
                      weight_decay=recipe.weight_decay, verbose=False)
        return m.fit(ctx.train, ckpts).score(ctx.test, train=ctx.train)
    return run


def source_configs(trajectories=(3, 6), segments=(1, 3)) -> list:
    """SOURCE (L segments over C trajectory checkpoints) and, for each C, EK-FAC on the same C
    checkpoints (scores averaged over them), its converged-model counterpart."""
    out = []
    for C in trajectories:
        for L in segments:
            out.append(Config("SOURCE", f"SOURCE L={L} C={C}", ("trajectory", C), _source(L), {"L": L, "C": C}))
        out.append(Config("EK-FAC", f"EK-FAC trajectory C={C}", ("trajectory", C), _ekfac(ak.EKFAC), {"C": C}))
    return out


def _datamodels(m_models):
    """(run, cost) of Datamodels with ``m_models`` retrained subset models; its models' training
    (summed one-core seconds / the cores that trained them in parallel) is its train_s."""
    state = {}

    def fit(ctx):
        if m_models not in state:
            dm = ak.Datamodels(ctx.benchmark, ctx.runs / "gt" / f"{ctx.benchmark.name}-datamodels-m{m_models}",
                               m=m_models, r=1, seed=1, verbose=ctx.verbose)
            state[m_models] = dm.fit(exclude=ctx.gt)
        return state[m_models]

    def run(ctx, ckpts, rates):
        return fit(ctx).score()

    def cost(ctx):
        c = fit(ctx).cost
        return c["train_seconds"] / default_workers(), c["fit_seconds"]
    return run, cost


def ours(quick: bool) -> list:
    """Our methods' configurations; ``quick`` keeps the cheap ones."""
    out = []
    ks = (128, 512) if quick else (128, 512, 2048)
    Ms = (1, 5) if quick else (1, 3, 10)
    for k in ks:
        for M in Ms:
            out.append(Config("TRAK", f"TRAK k={k} M={M}", ("models", M), _trak(k), {"k": k, "M": M}))
    if not quick:
        for M in (1, 10):
            out.append(Config("TRAK factored", f"TRAK factored k=2048 M={M}", ("models", M),
                              _trak(2048, "factored"), {"k": 2048, "M": M, "mode": "factored"}))
    for C in ((5,) if quick else (5, 10)):
        out.append(Config("TracIn", f"TracIn C={C}", ("trajectory", C), _tracin(), {"C": C}))
    damping = DIGITS_DAMPING
    out.append(Config("IF", "IF-CG M=1", ("models", 1), _influence(ak.InfluenceCG, damping=damping),
                      {"damping": damping}))
    out.append(Config("IF", "IF-CG 3 steps M=1", ("models", 1),
                      _influence(ak.InfluenceCG, damping=damping, max_iter=3),
                      {"damping": damping, "max_iter": 3}))
    if not quick:
        out.append(Config("IF", "IF-LiSSA M=1", ("models", 1),
                          _influence(ak.InfluenceLiSSA, damping=damping), {"damping": damping}))
        out.append(Config("IF", "IF-explicit M=1", ("models", 1),
                          _influence(ak.InfluenceExplicit, damping=damping), {"damping": damping}))
        out.append(Config("IF", "IF-CG M=5", ("models", 5), _influence(ak.InfluenceCG, damping=damping),
                          {"damping": damping}))
    for M in ((1,) if quick else (1, 5)):
        out.append(Config("EK-FAC", f"EK-FAC M={M}", ("models", M), _ekfac(ak.EKFAC), {"M": M}))
    out.append(Config("K-FAC", "K-FAC M=1", ("models", 1), _ekfac(ak.KFAC), {"M": 1}))
    out += source_configs()
    for m in ((100,) if quick else (100, 300, 1000)):
        run, cost = _datamodels(m)
        out.append(Config("Datamodels", f"Datamodels m={m}", ("none", 0), run, {"m": m}, cost))
    return out


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def peers(quick: bool) -> list:
    """The installed peers on the same checkpoints and loaders: traker's TRAK, kronfluence's
    EK-FAC and (full run only) dattri's IF-CG."""
    out = []
    if _installed("trak"):
        from .trak import traker

        def run_traker(k):
            return lambda ctx, ckpts, rates: traker(ctx.benchmark, ckpts, ctx.train, ctx.test, k)[0]

        for M in ((1, 5) if quick else (1, 5, 10)):
            out.append(Config("traker (peer)", f"traker TRAK k=512 M={M}", ("models", M),
                              run_traker(512), {"k": 512, "M": M}))
    if _installed("kronfluence"):
        from .ekfac import kronfluence_scores

        out.append(Config("kronfluence (peer)", "kronfluence EK-FAC M=1", ("models", 1),
                          lambda ctx, ckpts, rates: kronfluence_scores(ctx, ckpts), {"M": 1}))
    if _installed("dattri") and not quick:
        from .influence import dattri_ifcg_scores

        out.append(Config("dattri (peer)", "dattri IF-CG M=1", ("models", 1),
                          lambda ctx, ckpts, rates: dattri_ifcg_scores(ctx, ckpts), {"M": 1}))
    return out
