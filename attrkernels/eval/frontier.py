"""The LDS-vs-cost frontier: configurations of attribution methods on one benchmark, one ground truth.

Each configuration (``Config``: a method and its settings) produces scores [n_train, n_test]
whose LDS (with a bootstrap 95% CI over test examples) is measured against the benchmark's
ground truth. Its cost has two parts, both reported:

* ``train_s``: the time to train the checkpoints it needs — M independent models trained on the
  whole training set (``needs=("models", M)``), C checkpoints of one run
  (``("trajectory", C)``), or what the configuration's own ``cost`` reports (Datamodels: its
  retrained subset models);
* ``method_s``: the method's own wall time (fit + score).

Everything is cached under the ``runs`` folder: the ground truth (``runs/gt/<name>-<protocol>``,
see ``harness``), the checkpoints with their training time (``runs/ckpt/<name>``, see
``checkpoints``) and each finished configuration's row (``runs/frontier/<name>-<protocol>/``,
keyed on its label, settings, benchmark config and protocol), so an interrupted run resumes and a
repeated one does no work. ``frontier.csv`` and ``frontier.png`` go to the output folder, which
the caller names; they are written only when at least one configuration finished.

Arguments are checked before any work (ground truth, training): an unknown benchmark or
protocol, an ``only`` that selects nothing or an output folder that cannot be written raises
``FrontierArgumentError`` at once.

    rows, failed = run_frontier("digits-mlp", configs, out="results/digits", runs="runs")
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from torch.utils.data import DataLoader

from .. import tasks
from ..provenance import provenance
from ..store import read_json, write_json
from .checkpoints import CheckpointCache
from .harness import build_ground_truth
from .lds import lds
from .quality import split_half
from .report import plot, write_csv
from .subsets import resolve_protocol

NEEDS = ("models", "trajectory", "none")


class FrontierArgumentError(ValueError):
    """An argument of the frontier is unusable; raised before any work is done."""


@dataclass
class Config:
    """One point of the frontier.

    family: marker group in the plot; label: unique name (also names its cached result);
    needs: ``("models", M)`` independent models, ``("trajectory", C)`` checkpoints of one run, or
    ``("none", 0)``; run(ctx, checkpoints, learning_rates) -> scores [n_train, n_test], where
    checkpoints are state dicts for "models", ``Checkpoint`` objects for "trajectory" (epoch,
    ``lr``, and ``lr_sum`` / ``steps`` since the previous checkpoint, as SOURCE needs; every
    method accepts them in place of state dicts) and None for "none"; learning_rates: the
    ``lr`` of each trajectory checkpoint (None otherwise); settings: recorded in the CSV (``setting_<key>``) and in the cache key;
    cost(ctx) -> (train_s, method_s) replaces the measured cost for methods that account for it
    themselves, called before ``run``.
    """

    family: str
    label: str
    needs: tuple
    run: Callable
    settings: dict = field(default_factory=dict)
    cost: Optional[Callable] = None

    def __post_init__(self):
        if not (isinstance(self.needs, tuple) and len(self.needs) == 2 and self.needs[0] in NEEDS):
            raise ValueError(f"Config {self.label!r}: needs must be (kind, count) with kind in {NEEDS}, "
                             f"got {self.needs!r}")


class Context:
    """Benchmark, loaders, ground truth and cached checkpoints shared by the configurations.

    Building it builds (or loads) the ground truth: ``workers`` processes train the missing
    models (default: one per core)."""

    def __init__(self, benchmark, runs, protocol: str, *, batch_size: int = 100,
                 workers: Optional[int] = None, verbose: bool = True):
        self.benchmark, self.runs, self.protocol, self.verbose = benchmark, Path(runs), protocol, verbose
        self.checkpoints = CheckpointCache(benchmark, runs)
        self.train = DataLoader(benchmark.train_data(), batch_size=batch_size, shuffle=False)
        self.test = DataLoader(benchmark.test_data(), batch_size=batch_size, shuffle=False)
        t0 = time.perf_counter()
        self.gt = build_ground_truth(benchmark, self.runs / "gt" / f"{benchmark.name}-{protocol}", protocol,
                                     workers=workers, verbose=verbose)
        self.gt_seconds = time.perf_counter() - t0

    def model(self):
        """A fresh model of the benchmark (seed 0), to load checkpoints into."""
        return self.benchmark.make_model(0)

    def models(self, count: int):
        """(state_dicts, None, summed training seconds) of ``count`` independently trained models."""
        states, seconds = self.checkpoints.models(count)
        return states, None, sum(seconds)

    def trajectory(self, count: int):
        """(Checkpoints, their learning rates, seconds) of ``count`` checkpoints of one run."""
        ckpts, seconds = self.checkpoints.trajectory(count)
        return ckpts, [c.lr for c in ckpts], seconds

    def needs(self, config: Config):
        """(checkpoints, learning rates, training seconds) that ``config`` asks for."""
        kind, count = config.needs
        if kind == "models":
            return self.models(count)
        if kind == "trajectory":
            return self.trajectory(count)
        return None, None, 0.0


def cache_key(config: Config, ctx: Context) -> str:
    """Key of a configuration's cached result: its label, settings, benchmark config, protocol."""
    text = json.dumps({"label": config.label, "settings": config.settings,
                       "task": ctx.benchmark.config_hash(), "protocol": ctx.protocol},
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def result_path(config: Config, results: Path) -> Path:
    return Path(results) / f"{config.label.replace(' ', '_').replace('=', '')}.json"


def evaluate(config: Config, ctx: Context, results) -> dict:
    """Run one configuration (or load its cached result from ``results``) and measure LDS and cost.

    Returns the row: key, family, label, lds, ci_low, ci_high, train_s, method_s, cost_s and
    ``setting_<key>`` for each setting."""
    path, key = result_path(config, results), cache_key(config, ctx)
    ckpts, rates, train_s = ctx.needs(config)
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


# ---------------------------------------------------------------------------------------------
# Argument checks (no work, nothing written)


def resolve_benchmark(benchmark):
    """A Benchmark from itself or a registered name; FrontierArgumentError for an unknown name."""
    if isinstance(benchmark, str):
        try:
            return tasks.get(benchmark)
        except KeyError as err:
            raise FrontierArgumentError(err.args[0]) from None
    return benchmark


def select(configs: Iterable[Config], only: Optional[Iterable[str]] = None) -> list:
    """The configurations whose label contains one of the substrings ``only`` (all if None).

    Raises FrontierArgumentError when nothing is selected (naming the labels there are) and
    ValueError when two configurations share a label (their cached results would collide)."""
    configs = list(configs)
    labels = [c.label for c in configs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"configuration labels must be unique; repeated: {', '.join(duplicates)}")
    if only is not None:
        only = [s for s in ([only] if isinstance(only, str) else only) if s]
        configs = [c for c in configs if any(s in c.label for s in only)]
    if not configs:
        what = f"only={only!r} matches none of the configurations" if only is not None else "no configurations given"
        raise FrontierArgumentError(f"{what}; labels: {', '.join(labels) if labels else '(none)'}")
    return configs


def check_writable_dir(path, name: str = "out") -> Path:
    """``path`` as a Path if it is, or could be created as, a writable folder; creates nothing.

    Raises FrontierArgumentError naming ``name`` and the reason otherwise."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is" if probe == path else f"lies below {str(probe)!r}, which is"
        raise FrontierArgumentError(f"{name} {str(path)!r} {where} a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FrontierArgumentError(f"{name} {str(path)!r} cannot be written: no write permission on {str(probe)!r}")
    return path


# ---------------------------------------------------------------------------------------------
# Running


def run_frontier(benchmark, configs: Iterable[Config], *, out, runs, protocol: str = "default",
                 only: Optional[Iterable[str]] = None, workers: Optional[int] = None,
                 batch_size: int = 100, verbose: bool = True) -> tuple[list, dict]:
    """Evaluate ``configs`` on ``benchmark`` and write ``out``/frontier.csv and frontier.png.

    benchmark: a ``tasks.Benchmark`` or a registered name; configs: ``Config`` objects (unique
    labels); out: output folder (required; created when there is something to write); runs: cache
    folder (ground truth, checkpoints, results; required); protocol: a name in
    ``benchmark.lds_protocols``; only: substrings of labels to run; workers: processes training
    the ground truth (default: all cores); batch_size: of the train and test loaders.

    Every argument is checked before any work (``FrontierArgumentError``). A configuration that
    raises is reported and skipped, so one failing method does not lose the others. Returns
    (rows, failed): the finished rows in order, and {label: error} of the failed ones. The CSV and
    the plot are written only when there is at least one row; an existing pair is left alone
    otherwise.
    """
    benchmark = resolve_benchmark(benchmark)
    chosen = select(configs, only)
    if not isinstance(protocol, str):
        raise FrontierArgumentError(f"protocol must be a name in {type(benchmark).__name__}.lds_protocols, "
                                    f"got {type(protocol).__name__}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise FrontierArgumentError(f"workers must be a positive int or None, got {workers!r}")
    try:
        resolve_protocol(benchmark, protocol)
    except (KeyError, TypeError, ValueError) as err:
        raise FrontierArgumentError(err.args[0] if err.args else str(err)) from None
    out, runs = check_writable_dir(out, "out"), check_writable_dir(runs, "runs")

    t_start = time.perf_counter()
    ctx = Context(benchmark, runs, protocol, batch_size=batch_size, workers=workers, verbose=verbose)
    results = runs / "frontier" / f"{benchmark.name}-{protocol}"
    rows, failed = [], {}
    for config in chosen:
        try:
            row = evaluate(config, ctx, results)
        except Exception as err:  # noqa: BLE001  (one failing method must not lose the others)
            failed[config.label] = f"{type(err).__name__}: {err}"
            print(f"{config.label}: failed: {failed[config.label]}", flush=True)
            continue
        rows.append(row)
        if verbose:
            print(f"{row['label']:<32} LDS {row['lds']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]  "
                  f"cost {row['cost_s']:.1f} s (train {row['train_s']:.1f} + method {row['method_s']:.1f})",
                  flush=True)
    if not rows:
        if verbose:
            print(f"no configuration finished: nothing written to {out}", flush=True)
        return rows, failed
    header = _header(benchmark, protocol, ctx, time.perf_counter() - t_start)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "frontier.csv", header)
    plot(rows, out / "frontier.png",
         f"{benchmark.name} ({protocol} protocol): LDS vs cost on {header['machine']}")
    return rows, failed


def _header(benchmark, protocol: str, ctx: Context, wall_seconds: float) -> dict:
    """Provenance lines of frontier.csv: benchmark, protocol, ground truth, machine, date, commit."""
    m, r = ctx.gt.masks.shape[0], ctx.gt.outputs.shape[1]
    if r >= 2 and m >= 3:
        sh = split_half(ctx.gt.outputs)
        quality = f"split-half {sh.correlation:.3f} (Spearman-Brown {sh.spearman_brown:.3f})"
    else:  # split-half needs two seeds per subset (e.g. cifar's quick protocol has one)
        quality = "split-half n/a"
    info = provenance()
    return {"task": benchmark.name, "protocol": protocol,
            "ground_truth": f"{m} subsets x {r} seeds, {quality}",
            "ground_truth_seconds": f"{ctx.gt_seconds:.1f}", "wall_seconds": f"{wall_seconds:.1f}",
            "machine": f"{info['device']} ({info['cores']} cores)", "date": info["date"],
            "commit": info["commit"]}
