"""Step ``ekfac`` of the GPU check: EK-FAC fit + score, ours against kronfluence, on the GPU.

ResNet-9 of width 32 (1.65 M parameters) on random CIFAR-shaped data (1,000 training and 100 test
examples, batch 128), untrained, BatchNorm in eval mode: the problem of ``benchmarks.ekfac``'s
CPU table (there with batch 64), so the two tables compare. Both libraries: EK-FAC with the true Fisher, damping 0.1 x the mean corrected eigenvalue
(kronfluence: ``damping_factor=None``), the same datasets, Linear and Conv2d layers tracked.
Order: ours, kronfluence, ours again if time allows (the first call of each pays one-time costs;
the note says which call a row is). Reports fit and score seconds (wall, GPU synchronised), the speedup
(kronfluence's fit + score over ours) and the Pearson correlation of the two score matrices.
kronfluence is a peer: without it (carry its wheel, ``scripts/gpu_wheels.sh``) only ours is timed
and the comparison is recorded as skipped.

    python -m benchmarks.gpu.ekfac --out DIR [--device cuda] [--smoke]

Writes ekfac.csv / .json / .md.
"""
from __future__ import annotations

import copy
import logging
import sys
import tempfile
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import attrkernels as ak
from attrkernels.tasks.resnet9 import resnet9

from .common import installed, parse, time_left, write_table


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def ours(model, train_set, test_set, batch, device):
    m = ak.EKFAC(model, ak.tasks.Classification(), verbose=False)
    train, test = DataLoader(train_set, batch_size=batch), DataLoader(test_set, batch_size=batch)
    sync(device)
    t0 = time.perf_counter()
    m.fit(train)
    sync(device)
    t1 = time.perf_counter()
    scores = m.score(test, train=train)
    sync(device)
    return scores.float().cpu(), t1 - t0, time.perf_counter() - t1


def kronfluence(model, train_set, test_set, batch, device):
    """kronfluence EK-FAC on ``device``: (scores [n_train, n_test], fit s, score s)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    from benchmarks.ekfac import KronfluenceTask

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    task = KronfluenceTask()
    model = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("gpucheck", model=model, task=task, cpu=device == "cpu", disable_tqdm=True,
                            output_dir=tmp)
        sync(device)
        t0 = time.perf_counter()
        analyzer.fit_all_factors("f", dataset=train_set, per_device_batch_size=batch,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        sync(device)
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores("s", "f", query_dataset=test_set, train_dataset=train_set,
                                         per_device_query_batch_size=batch, per_device_train_batch_size=batch,
                                         score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("s")["all_modules"].T
        sync(device)
        t2 = time.perf_counter()
    return scores.float().cpu(), t1 - t0, t2 - t1


def corr(a, b) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main() -> int:
    args = parse(__doc__)
    dev = args.device
    n_train, n_test, batch, width, hw = (32, 4, 16, 4, 8) if args.smoke else (1000, 100, 128, 32, 32)
    torch.manual_seed(0)
    model = resnet9(10, width=width).to(dev).eval()
    gen = torch.Generator().manual_seed(0)
    train_set = TensorDataset(torch.randn(n_train, 3, hw, hw, generator=gen),
                              torch.randint(0, 10, (n_train,), generator=gen))
    test_set = TensorDataset(torch.randn(n_test, 3, hw, hw, generator=gen),
                             torch.randint(0, 10, (n_test,), generator=gen))
    params = sum(p.numel() for p in model.parameters())
    rows, note = [], ""
    peer = installed("kronfluence")

    def flush():
        intro = (f"EK-FAC fit + score on {dev}{' (smoke: tiny model)' if args.smoke else ''}: ResNet-9 width "
                 f"{width} ({params / 1e6:.2f} M parameters), {n_train} train x {n_test} test random "
                 f"CIFAR-shaped examples, batch {batch}; seconds are wall time with the GPU synchronised; "
                 f"`speedup` = kronfluence's fit + score / that row's; `corr` = Pearson correlation with "
                 f"kronfluence's scores. {note}")
        write_table(args.out, "ekfac", rows, ["impl", "fit_s", "score_s", "total_s", "speedup", "corr", "note"],
                    intro, {"device": dev, "kronfluence": peer, "smoke": args.smoke})

    results, first = {}, None

    def tabulate():
        rows.clear()
        peer_total = sum(results["kronfluence"][1:]) if "kronfluence" in results else None
        for name, (scores, fit, score) in results.items():
            row = dict(impl=name if name == "ours" else f"kronfluence {peer}", fit_s=round(fit, 3),
                       score_s=round(score, 3), total_s=round(fit + score, 3), note="first call")
            if name == "ours" and first is not None:
                row["note"] = f"second call; the first took {sum(first[1:]):.2f} s"
            if peer_total is not None:
                row.update(speedup=round(peer_total / (fit + score), 2),
                           corr=round(corr(scores, results["kronfluence"][0]), 4))
            rows.append(row)
        flush()

    # ours, kronfluence, then ours again when there is time (the first call of each library pays
    # its one-time costs: CUDA context, cuSOLVER handles, kernel compilation); the table is
    # rewritten after each, so a timeout keeps what ran
    results["ours"] = ours(model, train_set, test_set, batch, dev)
    tabulate()
    if peer and (time_left() > 10 or args.smoke):
        results["kronfluence"] = kronfluence(model, train_set, test_set, batch, dev)
    elif peer:
        note = f"kronfluence {peer} installed but skipped: {time_left():.0f} s left"
    else:
        note = "kronfluence: skipped (not installed; carry its wheel, see scripts/gpu_wheels.sh)"
    tabulate()
    if not args.smoke and time_left() > 1.5 * sum(results["ours"][1:]) + 5:
        first = results["ours"]
        results["ours"] = ours(model, train_set, test_set, batch, dev)
        tabulate()
    for row in rows:
        print(row, flush=True)
    if note:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
