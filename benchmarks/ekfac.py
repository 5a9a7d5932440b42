"""EK-FAC: ours vs kronfluence, fit + score time and LDS, same model, damping and data, same run.

Models
  digits-mlp   the built-in task (1,000 train / 300 test), the seed-0 model of
               ``benchmarks.setup_task``; LDS against its default ground truth (200 subsets x 8
               seeds, built on first use).
  resnet9-w32  ResNet-9 of width 32 (1.65 M parameters, ``attrkernels.tasks.resnet9``) on random
               CIFAR-shaped data (3x32x32, 10 classes, ``--cnn-train`` / ``--cnn-test`` examples),
               untrained: time only, plus the agreement of the two libraries' scores.

Both libraries run EK-FAC with the true Fisher (labels sampled from the model's softmax; each
library draws its own, from a seeded generator) and damping 0.1 x the mean corrected eigenvalue of each layer
(kronfluence: ``damping_factor=None``), on the same loaders (batch size ``--batch``), tracking
the same layers (Linear and Conv2d; BatchNorm is left out by both). kronfluence's measurement is
minus the margin, so its scores are ours transposed. On digits we also run kronfluence with its
default damping (1e-8), our K-FAC and our empirical-Fisher EK-FAC. Times are medians of
``--reps`` runs alternating the libraries (the CNN runs once), in wall and in process CPU
seconds; ``speedup`` = kronfluence's fit + score CPU time / ours (CPU time leaves out the time
other processes held the cores, which on this shared machine moves wall times by +-20% between
runs minutes apart), ``speedup_wall`` the same in wall time; ``corr`` = Pearson correlation with
kronfluence's scores of the same model; ``floor_s`` = the FLOPs of our algorithm (counted per
layer: passes, factors, float64 eigendecompositions, eigenvalue correction, scores) over this
machine's fp32 / fp64 matmul peak.

Self-influence: the digits model retrained (same recipe and seed) with 5% of its training labels
flipped to another class; the fraction of flipped examples among the top 5% by self-influence
(ours and kronfluence's). Kernels: our factor kernels against the matmul peak and against the
torch formulation they replace, at the ResNet-9's layer shapes.

Threads: one by default (``--threads``). On this shared two-core machine a second thread makes
small operations wait at OpenMP barriers whenever another process holds a core (the digits
training loop measured 0.12 s on one thread and 10-19 s on two); both libraries run with the same
setting.

    python -m benchmarks.ekfac            # about 10 minutes (ground truth cached after the first run)
    python -m benchmarks.ekfac --quick    # digits only

Writes benchmarks/results/ekfac_cpu.csv and .md (``--quick``: ekfac_cpu_quick.*).
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import attrkernels as ak
from attrkernels.capture import Capture, make_plan
from attrkernels.kernels.conv_covariance import conv_covariance
from attrkernels.kernels.conv_covariance import preferred as conv_preferred
from attrkernels.kernels.kfac import Basis, covariance, ekfac_correction, kron_eigh, rotation_cost
from attrkernels.tasks.resnet9 import resnet9

from .common import RESULTS, markdown_table, matmul_peak_gflops, provenance, write_results
from .setup_task import checkpoints, ground_truth, lds_of

EIGH_FLOPS = 4.7  # x d^3: tridiagonal reduction 4/3, divide and conquer ~4/3, back-transformation 2


def rotation_flops(T: int, i: int, o: int) -> int:
    """FLOPs of one sequence's rotated gradient Q_S^T G Q_A (T positions, G [o, i]): the cheaper of
    rotating the positions on both sides then forming it, and forming it then rotating it."""
    return min(2 * T * (i * i + o * o) + 2 * T * i * o, 2 * T * i * o + 2 * i * o * (i + o))


def kept_form_flops(T: int, i: int, o: int) -> int:
    """FLOPs the empirical Fisher's scores spend per training sequence to re-form the rotated
    gradient the correction kept: 2 T i o where it kept the rotated positions (T (i + o) < i o,
    ``KroneckerHandler.keeps_positions``), none where it kept the gradient formed."""
    return 2 * T * i * o if T * (i + o) < i * o else 0
NOTES = """
Where the difference comes from (same factors, same eigendecompositions, same three passes over
the training data): the eigenvalue correction and the scores rotate whichever side is cheaper
(for the 2304-wide ResNet layers, 16 position vectors per example, 85 M multiply-adds, instead
of the formed 256 x 2304 gradient, 1.5 G); backward passes compute layer-output gradients only
(no weight gradients); activation factors of stride-1 convolutions come from shifted
correlations instead of unfolding, wide ones from a blocked symmetric update; per-example
convolution gradients from one grouped weight-gradient convolution; queries are rotated back to
parameter space where that is cheaper than rotating every training gradient, and each block of
queries is read once per training batch; the float64 eigendecompositions run on SciPy's LAPACK.
No custom C++ / Triton kernel: every GEMM above runs at the matmul peak, and the one step a fused
kernel could remove (writing and squaring the per-example products of the correction) is bounded
in the kernel table below.
"""


# ---------------------------------------------------------------------------------------------
# The two implementations


class Clock:
    """Wall and process CPU time since the last ``lap``."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def ours(cls, model, train, test, **kw):
    """(scores [n_train, n_test], fit (wall, cpu) seconds, score (wall, cpu) seconds, the fitted
    method's query modes (for the FLOP count))."""
    m = cls(model, ak.tasks.Classification(), verbose=False, **kw)
    clock = Clock()
    m.fit(train)
    fit = clock.lap()
    scores = m.score(test, train=train)
    return scores, fit, clock.lap(), m.query_modes


class KronfluenceTask:
    """kronfluence's Task over one of ours (default ``Classification``): train loss = our
    per-example loss summed; with ``sample`` (kronfluence's true Fisher) our ``sampled_loss``,
    its targets drawn from a generator seeded with ``seed``, so kronfluence's factors are the
    same run to run; measurement = minus our measure summed (minus the margin, or a sequence's
    loss), so kronfluence's scores are ours transposed. ``modules``: names of the modules
    kronfluence tracks (None: its default, every nn.Linear / nn.Conv2d)."""

    def __new__(cls, task=None, modules=None, seed: int = 0):
        from kronfluence.task import Task

        ours_task = task if task is not None else ak.tasks.Classification()
        generator = torch.Generator().manual_seed(seed)

        class _Task(Task):
            def compute_train_loss(self, batch, model, sample=False):
                if sample:
                    return ours_task.sampled_loss(model, batch, generator).sum()
                return ours_task.loss(model, batch).sum()

            def compute_measurement(self, batch, model):
                return -ours_task.measure(model, batch).sum()

            def get_influence_tracked_modules(self):
                return None if modules is None else list(modules)

        return _Task()


def kronfluence(model, train_set, test_set, batch, damping=None, self_scores=False, *, task=None, modules=None,
                query_batch=None, seed: int = 0, stages: dict | None = None, eigh_dtype=torch.float64,
                fisher: str = "true"):
    """kronfluence EK-FAC: (scores [n_train, n_test] or self-influence [n_train], fit (wall, cpu),
    score (wall, cpu)). ``task``, ``modules``, ``seed``: as ``KronfluenceTask``; ``query_batch``:
    queries preconditioned at once (default ``batch``; kronfluence holds their preconditioned
    gradients, one model-size vector each, and passes over the training set once per block);
    ``stages``: a dict to fill with the wall seconds of the fit's three stages (covariances,
    eigendecomposition, eigenvalue correction); ``eigh_dtype``: its ``eigendecomposition_dtype``;
    ``fisher``: "true" (its default: labels sampled from the model) or "empirical" (the dataset's
    labels, its ``use_empirical_fisher``), as our ``EKFAC(fisher=...)``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    task = KronfluenceTask(task, modules, seed)
    model = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=tmp)
        clock, factor_args = Clock(), FactorArguments(strategy="ekfac", eigendecomposition_dtype=eigh_dtype,
                                                       use_empirical_fisher=fisher == "empirical")
        laps, times = Clock(), {}  # the three calls of kronfluence's fit_all_factors, timed one by one

        def lap(name):
            times[name] = laps.lap()[0]
            if stages is not None:  # printed as it happens: a long run killed midway keeps them
                print(f"kronfluence {name}: {times[name]:.1f} s", flush=True)

        analyzer.fit_covariance_matrices("f", dataset=train_set, per_device_batch_size=batch,
                                         factor_args=factor_args, overwrite_output_dir=True)
        lap("covariances")
        analyzer.perform_eigendecomposition("f", factor_args=factor_args, overwrite_output_dir=True)
        lap("eigendecomposition")
        analyzer.fit_lambda_matrices("f", dataset=train_set, per_device_batch_size=batch,
                                     factor_args=factor_args, overwrite_output_dir=True)
        lap("correction")
        if stages is not None:
            stages.update(times)
        fit = clock.lap()
        score_args = ScoreArguments(damping_factor=damping)
        if self_scores:
            analyzer.compute_self_scores("s", "f", train_dataset=train_set, per_device_train_batch_size=batch,
                                         score_args=score_args, overwrite_output_dir=True)
            scores = analyzer.load_self_scores("s")["all_modules"]
        else:
            analyzer.compute_pairwise_scores("s", "f", query_dataset=test_set, train_dataset=train_set,
                                             per_device_query_batch_size=query_batch or batch,
                                             per_device_train_batch_size=batch, score_args=score_args,
                                             overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores("s")["all_modules"].T
        score = clock.lap()
    return scores.float(), fit, score


def kronfluence_scores(ctx, ckpts) -> torch.Tensor:
    """The frontier's kronfluence row: its EK-FAC with damping 0.1 x mean eigenvalue (as ours) per
    checkpoint, on the frontier's loaders' batch size, scores averaged over checkpoints."""
    total = 0
    for state in ckpts:
        model = ctx.model()
        model.load_state_dict(state)
        total = total + kronfluence(model.eval(), ctx.benchmark.train_data(), ctx.benchmark.test_data(),
                                    ctx.train.batch_size)[0]
    return total / len(ckpts)


# ---------------------------------------------------------------------------------------------
# The FLOP floor of our algorithm


def algorithm_flops(model, train, n_train, n_test, query_modes):
    """(fp32 FLOPs, fp64 FLOPs) of our EK-FAC fit + score, counted per tracked layer."""
    m = ak.EKFAC(model, ak.tasks.Classification(), verbose=False)
    batch = next(iter(train))
    handlers = m.passes.record(batch, int(batch[1].shape[0]), m.task.loss, "train")
    f32 = f64 = 0.0
    for layer in m.layers:
        h = handlers[layer.name]
        T = sum(r.grad_out[0].numel() for r in h.records) // layer.d_out
        d_in, d_out = layer.d_in, layer.d_out
        dense_a, dense_s = Basis(d_in, (torch.empty(d_in, d_in),)), Basis(d_out, (torch.empty(d_out, d_out),))
        rotation = rotation_cost(T, dense_a, dense_s)
        product = T * d_in * d_out
        passes = 2 * product * (3 * n_train + n_test)  # forward + input gradient, 3 train passes, 1 test
        if conv_preferred(layer.module, h.records[0].inputs.shape):  # False for every non-conv layer
            ks = layer.module.kernel_size
            kh, kw = (1, *ks) if len(ks) == 1 else ks
            shifts = ((2 * kh - 1) * (2 * kw - 1) + 1) // 2
            cov_a = shifts * T * (layer.module.in_channels ** 2)
        else:
            cov_a = T * d_in * d_in
        cov = n_train * (cov_a + T * d_out * d_out)
        lam = n_train * (product + rotation)
        train_side = product + (rotation if query_modes[layer.name] == "eigenbasis" else 0) + n_test * d_in * d_out
        test_side = product + rotation + (0 if query_modes[layer.name] == "eigenbasis"
                                          else d_out * d_in * d_in + d_in * d_out * d_out)
        f32 += passes + 2 * (cov + lam + n_train * train_side + n_test * test_side)
        f64 += EIGH_FLOPS * (d_in ** 3 + d_out ** 3)
    return f32, f64


# ---------------------------------------------------------------------------------------------
# Experiments


def digits(args, rows):
    task = ak.tasks.get("digits-mlp")
    gt = ground_truth(task, verbose=True)
    (state,), _ = checkpoints(task, 1)
    model = task.make_model(0)
    model.load_state_dict(state)
    model.eval()
    train_set, test_set = task.train_data(), task.test_data()
    train = DataLoader(train_set, batch_size=args.batch)
    test = DataLoader(test_set, batch_size=args.batch)
    runs = {"ours": [], "kronfluence": []}
    for _ in range(args.reps):
        runs["ours"].append(ours(ak.EKFAC, model, train, test))
        runs["kronfluence"].append(kronfluence(model, train_set, test_set, args.batch))
    extra = {
        "ours K-FAC": ours(ak.KFAC, model, train, test),
        "ours empirical Fisher": ours(ak.EKFAC, model, train, test, fisher="empirical"),
        "kronfluence damping 1e-8": kronfluence(model, train_set, test_set, args.batch, damping=1e-8),
    }
    peer = runs["kronfluence"][-1][0]
    peer_total = _totals(runs["kronfluence"])
    flops = algorithm_flops(model, train, len(train_set), len(test_set), runs["ours"][-1][3])
    for name, results in list(runs.items()) + [(k, [v]) for k, v in extra.items()]:
        r = lds_of(results[-1][0], gt)
        rows.append(dict(model="digits-mlp", impl=name, **_times(results, peer_total),
                         lds=f"{r.mean:.3f}", ci=f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
                         corr=f"{_corr(results[-1][0], peer):.3f}", flops=flops if name == "ours" else None))
        print(rows[-1], flush=True)


def _totals(results) -> tuple[float, float]:
    """Median (wall, cpu) fit + score seconds of runs (scores, (fit wall, cpu), (score wall, cpu))."""
    return (statistics.median(f[0] + s[0] for _, f, s, *_ in results),
            statistics.median(f[1] + s[1] for _, f, s, *_ in results))


def _times(results, peer_total) -> dict:
    fit = statistics.median(r[1][0] for r in results)
    score = statistics.median(r[2][0] for r in results)
    wall, cpu = _totals(results)
    return dict(fit_s=f"{fit:.2f}", score_s=f"{score:.2f}", total_s=f"{wall:.2f}", cpu_s=f"{cpu:.2f}",
                speedup=f"{peer_total[1] / cpu:.1f}", speedup_wall=f"{peer_total[0] / wall:.1f}")


def self_influence(args, rows_si):
    """Recovery of flipped labels among the top 5% self-influence examples, ours and kronfluence."""
    task = ak.tasks.get("digits-mlp")
    x, y = task.train_data().tensors
    gen = np.random.default_rng(0)
    n = len(y)
    flipped = np.sort(gen.choice(n, size=n // 20, replace=False))
    y_flip = y.clone()
    y_flip[flipped] = torch.from_numpy((y[flipped].numpy() + gen.integers(1, 10, len(flipped))) % 10)
    model = task.make_model(0)
    from attrkernels.tasks.training import split_seed, train_classifier

    train_classifier(model, task.task, (x, y_flip), None, task.recipe,
                     torch.Generator().manual_seed(split_seed(0)[1]))
    model.eval()
    train_set = TensorDataset(x, y_flip)
    train = DataLoader(train_set, batch_size=args.batch)
    top = n // 20
    clock = Clock()
    ours_si = ak.EKFAC(model, ak.tasks.Classification(), verbose=False).fit(train).self_influence(train)
    ours_s = clock.lap()[0]
    peer_si, fit, score = kronfluence(model, train_set, None, args.batch, self_scores=True)
    for name, values, seconds in (("ours", ours_si, ours_s), ("kronfluence", peer_si, fit[0] + score[0])):
        found = np.intersect1d(torch.topk(values, top).indices.numpy(), flipped).size
        rows_si.append(dict(impl=name, flipped=len(flipped), top=top, recovered=found,
                            fraction=f"{found / len(flipped):.2f}", seconds=f"{seconds:.2f}"))
        print(rows_si[-1], flush=True)


def cnn(args, rows):
    torch.manual_seed(0)
    model = resnet9(10, width=32).eval()
    gen = torch.Generator().manual_seed(0)
    train_set = TensorDataset(torch.randn(args.cnn_train, 3, 32, 32, generator=gen),
                              torch.randint(0, 10, (args.cnn_train,), generator=gen))
    test_set = TensorDataset(torch.randn(args.cnn_test, 3, 32, 32, generator=gen),
                             torch.randint(0, 10, (args.cnn_test,), generator=gen))
    train = DataLoader(train_set, batch_size=args.batch)
    test = DataLoader(test_set, batch_size=args.batch)
    results = {"ours": ours(ak.EKFAC, model, train, test)}
    results["kronfluence"] = kronfluence(model, train_set, test_set, args.batch)
    flops = algorithm_flops(model, train, args.cnn_train, args.cnn_test, results["ours"][3])
    params = sum(p.numel() for p in model.parameters())
    peer_total = _totals([results["kronfluence"]])
    for name, result in results.items():
        rows.append(dict(model=f"resnet9-w32 ({params / 1e6:.2f} M params)", impl=name,
                         **_times([result], peer_total), corr=f"{_corr(result[0], results['kronfluence'][0]):.3f}",
                         flops=flops if name == "ours" else None))
        print(rows[-1], flush=True)


def kernels(rows_k):
    """Our factor kernels at the ResNet-9's shapes (B = 64) vs the matmul peak and vs the plain
    torch formulation: is a custom (C++ / Triton) kernel worth it?"""
    def clock(fn, reps=3):
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def row(kernel, shape, seconds, flops=None, note=""):
        rows_k.append(dict(kernel=kernel, shape=shape, ms=f"{seconds * 1e3:.1f}", seconds=seconds, flops=flops,
                           note=note))

    B = 64
    peak = matmul_peak_gflops(torch.device("cpu"), n=2048)
    gen = torch.Generator().manual_seed(0)
    # activation factor of a wide unfolded layer: one GEMM vs the blocked symmetric update
    A = torch.randn(B * 16, 2304, generator=gen)
    flops = 2 * A.shape[0] * A.shape[1] ** 2
    t_gemm = clock(lambda: torch.zeros(2304, 2304).addmm_(A.T, A))
    t_ours = clock(lambda: covariance(A))
    row("activation factor, one GEMM (torch addmm)", "n=1024 d=2304", t_gemm, flops)
    row("activation factor, blocked symmetric update (ours)", "n=1024 d=2304", t_ours,
        note=f"{t_gemm / t_ours:.1f}x faster than addmm (half the FLOPs)")
    # stride-1 convolutions: unfolded GEMM vs shifted correlations
    for c_in, hw in ((32, 32), (64, 16), (128, 8), (256, 4)):
        conv = torch.nn.Conv2d(c_in, c_in, 3, padding=1, bias=False)
        x = torch.randn(B, c_in, hw, hw, generator=gen)
        with Capture(make_plan(conv)) as cap:
            conv(x)
        U = cap.handlers[""]._unfold(x)
        flops = 2 * U.shape[0] * U.shape[1] * U.shape[2] ** 2
        t_gemm = clock(lambda: torch.zeros(U.shape[2], U.shape[2]).addmm_(U.reshape(-1, U.shape[2]).T,
                                                                            U.reshape(-1, U.shape[2])))
        t_shift = clock(lambda: conv_covariance(x, conv))
        shape = f"C={c_in} {hw}x{hw} 3x3"
        row("conv activation factor, unfolded GEMM (torch)", shape, t_gemm, flops)
        row("conv activation factor, shifted correlations (ours)", shape, t_shift,
            note=f"{t_gemm / t_shift:.1f}x faster{'' if conv_preferred(conv, x.shape) else ' (not used at this size)'}")
    # EK-FAC correction: how much of it a fused rotate-square-accumulate kernel could save
    for T, d_in, d_out in ((64, 1152, 256), (16, 2304, 256)):  # both sides rotated before the product
        A, D = torch.randn(B, T, d_in, generator=gen), torch.randn(B, T, d_out, generator=gen)
        (_, ba), (_, bs) = kron_eigh([torch.eye(d_in) + 0.1, torch.eye(d_out) + 0.1])
        ba, bs = ba.astype(torch.float32), bs.astype(torch.float32)
        total = clock(lambda: ekfac_correction(A, D, ba, bs))
        product = 2 * B * T * d_in * d_out
        flops = product + 2 * B * rotation_cost(T, ba, bs)
        rotations = clock(lambda: (ba.rotate(A), bs.rotate(D)))
        bound = max(0.0, total - rotations - product / (peak * 1e9))
        row("EK-FAC correction (torch: rotate, bmm, square, sum)", f"T={T} {d_out}x{d_in}", total, flops,
            note=f"a fused product-square-sum kernel could save at most {bound * 1e3:.0f} ms")
    for r in rows_k:
        print(r, flush=True)


def _corr(a, b) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits only")
    parser.add_argument("--reps", type=int, default=3, help="alternated runs per library on digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cnn-train", type=int, default=1000)
    parser.add_argument("--cnn-test", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    peaks = [(matmul_peak_gflops(device, n=2048), matmul_peak_gflops(device, n=2048, dtype=torch.float64))]
    rows, rows_si, rows_k = [], [], []
    digits(args, rows)
    self_influence(args, rows_si)
    if not args.quick:
        cnn(args, rows)
        kernels(rows_k)
    # a busy machine at the start or the end understates the peak: the larger of the two
    peaks.append((matmul_peak_gflops(device, n=2048), matmul_peak_gflops(device, n=2048, dtype=torch.float64)))
    peak32, peak64 = max(p for p, _ in peaks), max(p for _, p in peaks)
    for r in rows:
        flops = r.pop("flops")
        r["floor_s"] = f"{flops[0] / (peak32 * 1e9) + flops[1] / (peak64 * 1e9):.3f}" if flops else ""
    for r in rows_k:
        flops, seconds = r.pop("flops"), r.pop("seconds")
        if flops:
            r.update(gflops=f"{flops / seconds / 1e9:.0f}", pct_peak=f"{100 * flops / seconds / 1e9 / peak32:.0f}")

    info = provenance(device)
    from importlib.metadata import version

    info["kronfluence"] = version("kronfluence")
    stem = RESULTS / f"ekfac_cpu{'_quick' if args.quick else ''}"
    columns = ["model", "impl", "fit_s", "score_s", "total_s", "cpu_s", "speedup", "speedup_wall", "lds", "ci",
               "corr", "floor_s"]
    intro = (f"EK-FAC benchmark on {info['device']} ({info['cores']} cores, {args.threads} torch thread(s)), "
             f"{info['date']}, commit {info['commit']}, kronfluence {info['kronfluence']}.\n"
             f"fp32 matmul peak {peak32:.1f} GFLOP/s, fp64 {peak64:.1f} GFLOP/s. Batch size {args.batch}; "
             f"digits times are medians of {args.reps} alternated runs. `*_s` are wall seconds, `cpu_s` the "
             f"process CPU seconds of fit + score; `speedup` = kronfluence EK-FAC's CPU time / that row's "
             f"(CPU time does not count the time other processes held the cores), `speedup_wall` the same "
             f"in wall time; `corr` = Pearson correlation with kronfluence's scores; `floor_s` = FLOPs of "
             f"our algorithm / peak.")
    outro = ("\nSelf-influence on digits with 5% of the training labels flipped: flipped examples among "
             "the top 5% (fit + self-influence seconds).\n\n"
             + markdown_table(rows_si, ["impl", "flipped", "top", "recovered", "fraction", "seconds"]) + "\n")
    outro += NOTES
    if rows_k:
        outro += ("\nFactor kernels at the ResNet-9's shapes (B = 64, one thread; best of 3). The last column of "
                  "the correction rows bounds what a fused kernel could gain: its time minus the rotations "
                  "minus the product's FLOPs at peak.\n\n"
                  + markdown_table(rows_k, ["kernel", "shape", "ms", "gflops", "pct_peak", "note"]) + "\n")
    write_results(stem, rows, columns, info, intro,
                  {"matmul_peak_gflops_fp32": f"{peak32:.1f}", "matmul_peak_gflops_fp64": f"{peak64:.1f}"}, outro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
