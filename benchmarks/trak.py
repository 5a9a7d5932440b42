"""TRAK: ours vs traker on the digits MLP, same checkpoints, same ground truth, same run.

For k in {128, 512, 2048} and M in {1, 5} checkpoints (independently trained models), both fit
on the 1,000 training examples and score the 300 test examples; the table reports LDS (95% CI
over test examples) and wall time of fit + score (checkpoint training excluded: it is shared).
traker runs with its CPU defaults (BasicProjector, Gaussian) and lambda = 0; ours with its
default damping (2 x the mean nonzero eigenvalue of Phi^T Phi) and a Rademacher projection, dense
(the exact sketch of the gradient) and factored (LoGra-style Kronecker projection per layer).
``--sweep`` adds our LDS over the damping ratio, the evidence for that default.

    python -m benchmarks.trak            # about 8 minutes on 2 cores (ground truth cached after)
    python -m benchmarks.trak --sweep

Writes benchmarks/results/trak_digits.csv and .md.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import attrkernels as ak
from attrkernels.methods.trak import DEFAULT_DAMPING_RATIO

from .common import RESULTS, matmul_peak_gflops, provenance, write_results
from .setup_task import checkpoints, ground_truth, lds_of, loaders

DEFAULT = f"{DEFAULT_DAMPING_RATIO:g} x mean nonzero eig"  # our default damping, as the table says it


def ours(task, ckpts, train, test, k, damping_ratio=DEFAULT_DAMPING_RATIO, damping=None, kind="rademacher",
         mode="dense"):
    model = task.make_model(0)
    t0 = time.perf_counter()
    trak = ak.TRAK(model, task.task, k=k, kind=kind, damping=damping, damping_ratio=damping_ratio,
                   mode=mode, verbose=False)
    scores = trak.fit(train, ckpts).score(test)
    return scores, time.perf_counter() - t0


def median_of(reps, run):
    """(scores of the last run, median seconds) of ``reps`` runs of run() -> (scores, seconds)."""
    results = [run() for _ in range(reps)]
    return results[-1][0], statistics.median(t for _, t in results)


def traker(task, ckpts, train, test, k):
    from trak import TRAKer

    model = task.make_model(0)
    n_train, n_test = len(train.dataset), len(test.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tr = TRAKer(model=model, task="image_classification", train_set_size=n_train, save_dir=tmp,
                    device="cpu", proj_dim=k, use_half_precision=False,
                    logging_level=logging.ERROR)
        for i, sd in enumerate(ckpts):
            tr.load_checkpoint(sd, model_id=i)
            for batch in train:
                tr.featurize(batch=batch, num_samples=batch[0].shape[0])
        tr.finalize_features()
        for i, sd in enumerate(ckpts):
            tr.start_scoring_checkpoint(exp_name="bench", checkpoint=sd, model_id=i, num_targets=n_test)
            for batch in test:
                tr.score(batch=batch, num_samples=batch[0].shape[0])
        scores = tr.finalize_scores(exp_name="bench")
        elapsed = time.perf_counter() - t0
    return torch.from_numpy(np.asarray(scores, dtype=np.float32)), elapsed


def row(impl, k, M, scores, seconds, gt, **extra):
    r = lds_of(scores, gt)
    out = dict(impl=impl, k=k, checkpoints=M, **extra, lds=f"{r.mean:.3f}", ci=f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
               seconds=f"{seconds:.2f}")
    print(out, flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also sweep our damping ratio")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--reps", type=int, default=3, help="runs per row; the median time is reported")
    args = parser.parse_args(argv)
    task = ak.tasks.get("digits-mlp")
    gt = ground_truth(task, "default")
    ckpts, train_seconds = checkpoints(task, 5)
    train, test = loaders(task, batch_size=100)
    rows = []
    for k in (128, 512, 2048):
        for M in (1, 5):
            s, t = median_of(args.reps, lambda: ours(task, ckpts[:M], train, test, k))
            rows.append(row("ours", k, M, s, t, gt, damping=DEFAULT))
            sf, tf = median_of(args.reps, lambda: ours(task, ckpts[:M], train, test, k, mode="factored"))
            rows.append(row("ours factored", k, M, sf, tf, gt, damping=DEFAULT))
            if not args.no_peer:
                s2, t2 = median_of(args.reps, lambda: traker(task, ckpts[:M], train, test, k))
                rows.append(row("traker", k, M, s2, t2, gt, damping="0"))
                rows[-1]["time_ratio"] = f"{t2 / t:.1f} (factored {t2 / tf:.1f})"
    if args.sweep:
        for k in (128, 512, 2048):
            for M in (1, 5):
                for ratio in (0.0, 1e-2, 1e-1, 1.0, 2.0, 5.0, 20.0, 1e4):
                    if ratio == 0.0 and k > 1000:
                        continue  # singular: k > n_train
                    s, t = ours(task, ckpts[:M], train, test, k, damping_ratio=ratio)
                    rows.append(row("ours-sweep", k, M, s, t, gt, damping=f"{ratio:g} x mean nonzero eig"))

    info = provenance(torch.device("cpu"))
    peak = matmul_peak_gflops(torch.device("cpu"))
    p = sum(q.numel() for q in task.make_model(0).parameters())
    for r in rows:
        r["floor_s"] = f"{2 * 1300 * p * r['k'] * r['checkpoints'] / (peak * 1e9):.2f}"
    columns = ["impl", "k", "checkpoints", "damping", "lds", "ci", "seconds", "floor_s", "time_ratio"]
    intro = (f"TRAK on digits-mlp (1,000 train / 300 test, ground truth: {gt.masks.shape[0]} subsets "
             f"x {gt.outputs.shape[1]} seeds) on {info['device']}, {info['date']}, commit {info['commit']}.\n"
             f"Checkpoints: independently trained models ({np.mean(train_seconds):.2f} s each, not "
             f"counted). `seconds` = fit + score wall time (median of {args.reps}); `time_ratio` = traker / ours "
             "(dense; factored in parentheses); `floor_s` = dense featurisation's FLOPs, 2 p k per example "
             f"and checkpoint (p = {p}, 1,300 examples), at the matmul peak {peak:.0f} GFLOP/s "
             "measured in this run.")
    write_results(RESULTS / "trak_digits", rows, columns, info, intro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
