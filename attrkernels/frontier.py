"""The LDS-vs-cost frontier: every attribution method on one task, one protocol, one machine.

For a built-in task, each configuration (a method and its settings) produces scores
[n_train, n_test] whose LDS (with a bootstrap 95% CI over test examples) is measured against the
task's cached ground truth. Its cost has two parts, both reported:

* ``train_s``: the time to train the checkpoints it needs on this machine — M independent models
  trained on the whole training set (TRAK, influence functions, EK-FAC), one training run saved
  at C epochs (TracIn), or the retrained subset models (Datamodels; their summed one-core
  training time divided by the cores that trained them in parallel);
* ``method_s``: the method's own wall time (fit + score; CUDA events on a GPU would replace this
  on a GPU machine).

Checkpoints are trained once and cached with their training time under ``runs/``; each finished
configuration is saved there too (atomically), so an interrupted run resumes where it stopped.
Results: ``frontier.csv`` and ``frontier.png`` (LDS against log cost, one marker per family, the
Pareto front drawn) in the output directory.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import tasks
from .eval import build_ground_truth, lds, split_half
from .eval.harness import default_workers
from .kernels.cg import CGConvergenceWarning
from .methods import TRAK, Datamodels
from .methods.ekfac import EKFAC, KFAC
from .methods.influence import InfluenceCG, InfluenceExplicit, InfluenceLiSSA
from .methods.tracin import TracIn
from .provenance import provenance
from .store import atomic_write, read_json, write_json


@dataclass
class Config:
    """One point of the frontier.

    family: marker group in the plot; label: unique name; needs: ("models", M) independent
    models, ("trajectory", C) checkpoints of one run, or ("none", 0); run(ctx, checkpoints,
    learning_rates) -> scores [n_train, n_test]; cost(ctx) -> (train_s, method_s) replaces the
    measured cost for methods that account for it themselves (Datamodels: its models' training
    and its regression), called before run.
    """

    family: str
    label: str
    needs: tuple
    run: Callable
    settings: dict = field(default_factory=dict)
    cost: Callable | None = None


class CheckpointCache:
    """Checkpoints of a task trained once and cached under ``<runs>/ckpt/<task>/`` with the seconds
    their training took (timed after an untimed warm-up run, so the first one does not also pay the
    process's one-time start-up, ~1 s here); a changed task config retrains them."""

    def __init__(self, task, runs):
        self.task, self.folder, self._warm = task, Path(runs) / "ckpt" / task.name, False

    def _cached(self, name: str, make):
        """(state_dicts, learning rates, seconds) trained by ``make`` once and cached."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path, info = self.folder / f"{name}.pt", self.folder / f"{name}.json"
        if not (path.exists() and info.exists() and read_json(info).get("config") == self.task.config_hash()):
            if not self._warm:
                self.task.train(np.arange(min(64, len(self.task.train_data()))), 0)
                self._warm = True
            t0 = time.perf_counter()
            states, rates = make()
            seconds = time.perf_counter() - t0
            torch.save({"states": states, "rates": rates}, path)
            write_json(info, {"seconds": seconds, "config": self.task.config_hash()})
        saved = torch.load(path, weights_only=True)
        return saved["states"], saved["rates"], read_json(info)["seconds"]

    def models(self, count: int) -> tuple[list, list]:
        """(state_dicts, training seconds each) of ``count`` models trained on all training data
        with seeds 0..count-1."""
        states, seconds = [], []
        for seed in range(count):
            state, _, s = self._cached(f"model-seed{seed}", lambda seed=seed: (
                [self.task.train(None, seed)[0].state_dict()], [0.0]))
            states += state
            seconds.append(s)
        return states, seconds

    def trajectory(self, count: int):
        """(state_dicts, learning rates, seconds) of ``count`` evenly spaced checkpoints of one
        training run (seed 0)."""
        def make():
            _, ckpts = self.task.train(None, 0, checkpoints=count)
            return [c.state_dict for c in ckpts], [float(c.lr) for c in ckpts]
        return self._cached(f"trajectory-{count}", make)


class Context:
    """Task, data, ground truth and cached checkpoints shared by the configurations."""

    def __init__(self, task, runs: Path, protocol: str, batch_size: int = 100, verbose: bool = True):
        self.task, self.runs, self.protocol, self.verbose = task, Path(runs), protocol, verbose
        self.checkpoints = CheckpointCache(task, runs)
        self.train = DataLoader(task.train_data(), batch_size=batch_size, shuffle=False)
        self.test = DataLoader(task.test_data(), batch_size=batch_size, shuffle=False)
        t0 = time.perf_counter()
        self.gt = build_ground_truth(task, self.runs / "gt" / f"{task.name}-{protocol}", protocol,
                                     verbose=verbose)
        self.gt_seconds = time.perf_counter() - t0

    def model(self):
        return self.task.make_model(0)

    def models(self, count: int):
        """(state_dicts, None, summed training seconds) of ``count`` independently trained models."""
        states, seconds = self.checkpoints.models(count)
        return states, None, sum(seconds)

    def trajectory(self, count: int):
        """(state_dicts, learning rates, seconds) of ``count`` checkpoints of one run."""
        return self.checkpoints.trajectory(count)


# ---------------------------------------------------------------------------------------------
# Our methods


def _trak(k, mode="dense"):
    def run(ctx, ckpts, rates):
        m = TRAK(ctx.model(), ctx.task.task, k=k, mode=mode, verbose=False)
        return m.fit(ctx.train, ckpts).score(ctx.test)
    return run


def _tracin(k=None):
    def run(ctx, ckpts, rates):
        m = TracIn(ctx.model(), ctx.task.task, k=k, verbose=False)
        return m.fit(ctx.train, ckpts, learning_rates=rates).score(ctx.test)
    return run


def _influence(cls, **kwargs):
    def run(ctx, ckpts, rates):
        m = cls(ctx.model(), ctx.task.task, verbose=False, **kwargs)
        with warnings.catch_warnings():
            if "max_iter" in kwargs:  # a truncated solve on purpose: its warning says nothing new
                warnings.simplefilter("ignore", CGConvergenceWarning)
            return m.fit(ctx.train, ckpts).score(ctx.test)
    return run


def _ekfac(cls, **kwargs):
    def run(ctx, ckpts, rates):
        m = cls(ctx.model(), ctx.task.task, verbose=False, **kwargs)
        return m.fit(ctx.train, ckpts).score(ctx.test, train=ctx.train)
    return run


def _datamodels(m_models):
    state = {}

    def fit(ctx):
        if m_models not in state:
            dm = Datamodels(ctx.task, ctx.runs / "gt" / f"{ctx.task.name}-datamodels-m{m_models}", m=m_models,
                            r=1, seed=1, verbose=ctx.verbose)
            state[m_models] = dm.fit(exclude=ctx.gt)
        return state[m_models]

    def run(ctx, ckpts, rates):
        return fit(ctx).score()

    def cost(ctx):
        c = fit(ctx).cost
        return c["train_seconds"] / default_workers(), c["fit_seconds"]
    return run, cost


# Damping of the influence-function solvers on the digits MLP (benchmarks/results/influence_cpu.md).
IF_DAMPING = 1e-2


def configs(quick: bool) -> list:
    """Our methods' configurations; ``quick`` keeps the cheap ones (finishes in minutes)."""
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
    out.append(Config("IF", "IF-CG M=1", ("models", 1), _influence(InfluenceCG, damping=IF_DAMPING),
                      {"damping": IF_DAMPING}))
    out.append(Config("IF", "IF-CG 3 steps M=1", ("models", 1),
                      _influence(InfluenceCG, damping=IF_DAMPING, max_iter=3),
                      {"damping": IF_DAMPING, "max_iter": 3}))
    if not quick:
        out.append(Config("IF", "IF-LiSSA M=1", ("models", 1),
                          _influence(InfluenceLiSSA, damping=IF_DAMPING), {"damping": IF_DAMPING}))
        out.append(Config("IF", "IF-explicit M=1", ("models", 1),
                          _influence(InfluenceExplicit, damping=IF_DAMPING), {"damping": IF_DAMPING}))
        out.append(Config("IF", "IF-CG M=5", ("models", 5), _influence(InfluenceCG, damping=IF_DAMPING),
                          {"damping": IF_DAMPING}))
    for M in ((1,) if quick else (1, 5)):
        out.append(Config("EK-FAC", f"EK-FAC M={M}", ("models", M), _ekfac(EKFAC), {"M": M}))
    out.append(Config("K-FAC", "K-FAC M=1", ("models", 1), _ekfac(KFAC), {"M": 1}))
    for m in ((100,) if quick else (100, 300, 1000)):
        run, cost = _datamodels(m)
        out.append(Config("Datamodels", f"Datamodels m={m}", ("none", 0), run, {"m": m}, cost))
    return out


# ---------------------------------------------------------------------------------------------
# Running


def _key(config: Config, ctx: Context) -> str:
    text = json.dumps({"label": config.label, "settings": config.settings, "task": ctx.task.config_hash(),
                       "protocol": ctx.protocol}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def evaluate(config: Config, ctx: Context, results: Path) -> dict:
    """Run one configuration (or load its saved result) and measure LDS and cost."""
    path = results / f"{config.label.replace(' ', '_').replace('=', '')}.json"
    key = _key(config, ctx)
    kind, count = config.needs
    ckpts, rates, train_s = {"models": ctx.models, "trajectory": ctx.trajectory}.get(
        kind, lambda c: (None, None, 0.0))(count)
    if path.exists() and read_json(path).get("key") == key:
        row = read_json(path)
        if config.cost is None:  # the checkpoints' cost is theirs: take it from their cache
            row.update(train_s=train_s, cost_s=train_s + row["method_s"])
        return row
    fixed = config.cost(ctx) if config.cost is not None else None
    t0 = time.perf_counter()
    scores = config.run(ctx, ckpts, rates)
    method_s = time.perf_counter() - t0
    if fixed is not None:
        train_s, method_s = fixed
    r = lds(scores, ctx.gt.masks, ctx.gt.mean_outputs())
    row = {"key": key, "family": config.family, "label": config.label, "lds": r.mean,
           "ci_low": r.ci_low, "ci_high": r.ci_high, "train_s": train_s, "method_s": method_s,
           "cost_s": train_s + method_s, **{f"setting_{k}": v for k, v in config.settings.items()}}
    write_json(path, row)
    return row


def pareto(rows: list) -> list:
    """Rows not dominated (no other row is cheaper and at least as accurate), by cost."""
    front, best = [], -np.inf
    for r in sorted(rows, key=lambda r: (r["cost_s"], -r["lds"])):
        if r["lds"] > best:
            front.append(r)
            best = r["lds"]
    return front


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    markers = "osD^vP*Xhp<>"
    for i, family in enumerate(sorted({r["family"] for r in rows})):
        pts = [r for r in rows if r["family"] == family]
        ax.errorbar([r["cost_s"] for r in pts], [r["lds"] for r in pts],
                    yerr=[[r["lds"] - r["ci_low"] for r in pts], [r["ci_high"] - r["lds"] for r in pts]],
                    fmt=markers[i % len(markers)], ms=7, capsize=2, label=family, alpha=0.85)
    front = pareto(rows)
    ax.step([r["cost_s"] for r in front], [r["lds"] for r in front], where="post", color="k",
            lw=1, ls="--", label="Pareto front")
    for r in front:
        ax.annotate(r["label"], (r["cost_s"], r["lds"]), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("cost: checkpoint training + method time (s, log scale)")
    ax.set_ylabel("LDS (95% CI over test examples)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130, bbox_inches="tight"))
    plt.close(fig)


def write_csv(rows: list, path: Path, header: dict) -> None:
    columns = ["family", "label", "lds", "ci_low", "ci_high", "train_s", "method_s", "cost_s"]
    extra = sorted({k for r in rows for k in r if k.startswith("setting_")})
    text = io.StringIO(newline="")
    text.write("".join(f"# {k}: {v}\n" for k, v in header.items()))
    w = csv.DictWriter(text, fieldnames=columns + extra, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def run_frontier(task_name: str = "digits-mlp", *, quick: bool = False, out=None, runs="runs",
                 extra_configs=(), only=None, verbose: bool = True) -> list:
    """Evaluate every configuration on ``task_name`` and write frontier.csv / frontier.png.

    quick: the "quick" ground-truth protocol and the cheap configurations; out: output folder
    (default benchmarks/results/<task>, or <task>-quick); runs: cache folder; extra_configs: more Config objects
    (peers); only: substrings of labels to run.
    """
    task = tasks.get(task_name)
    protocol = "quick" if quick else "default"
    t_start = time.perf_counter()
    ctx = Context(task, Path(runs), protocol, verbose=verbose)
    out = Path(out if out is not None else
               Path("benchmarks") / "results" / (task_name + ("-quick" if quick else "")))
    out.mkdir(parents=True, exist_ok=True)
    results = Path(runs) / "frontier" / f"{task_name}-{protocol}"
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    chosen = [c for c in list(configs(quick)) + list(extra_configs)
              if only is None or any(s in c.label for s in only)]
    for config in chosen:
        try:
            row = evaluate(config, ctx, results)
        except Exception as err:  # noqa: BLE001  (one failing method must not lose the others)
            print(f"{config.label}: failed: {type(err).__name__}: {err}", flush=True)
            continue
        rows.append(row)
        if verbose:
            print(f"{row['label']:<32} LDS {row['lds']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]  "
                  f"cost {row['cost_s']:.1f} s (train {row['train_s']:.1f} + method {row['method_s']:.1f})",
                  flush=True)
    sh = split_half(ctx.gt.outputs)
    info = provenance()
    header = {"task": task_name, "protocol": protocol,
              "ground_truth": f"{ctx.gt.masks.shape[0]} subsets x {ctx.gt.outputs.shape[1]} seeds, "
                              f"split-half {sh.correlation:.3f} (Spearman-Brown {sh.spearman_brown:.3f})",
              "ground_truth_seconds": f"{ctx.gt_seconds:.1f}", "wall_seconds": f"{time.perf_counter() - t_start:.1f}",
              "machine": f"{info['device']} ({info['cores']} cores)", "date": info["date"],
              "commit": info["commit"]}
    write_csv(rows, out / "frontier.csv", header)
    plot(rows, out / "frontier.png", f"{task_name} ({protocol} protocol): LDS vs cost on {header['machine']}")
    return rows
