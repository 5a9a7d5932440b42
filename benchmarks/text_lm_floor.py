"""The floor of EK-FAC fit + score on text-lm, beside our time and kronfluence's from the same run,
with the true Fisher (both libraries' default) and with the empirical Fisher.

On this task (a byte-level GPT-2 of width 64, 1,000 training sequences of 64 tokens, 100 queries)
the time goes to the Hugging Face model's own passes, not to GEMMs. The floor of any EK-FAC here:

* model passes (measured, ``model_s``): the forward pass over the training data with its autograd
  graph, once, and the backward passes from it to the tracked layers' outputs: three with the true
  Fisher (the covariance pass's sampled labels, the correction's independent sampled labels, the
  training gradients the scores need), one with the empirical Fisher (the dataset's labels serve all
  three), plus one forward + backward over the queries. Each pass is timed on its own, best of
  ``--reps``, on the first checkpoint of the frontier (same batches of ``BATCH``). Ours and
  kronfluence take turns ``--reps`` times (best of each, and the ratio of the medians): this
  machine's speed drifts by 30% within a minute when its host is busy.
* arithmetic (``gemm_s``), at the fp32 matmul peak measured in this run, for every tracked layer
  (d_in = i with the bias column, d_out = o), N = n T tokens, n training sequences, q queries,
  rot(T) = min(2 T (i^2 + o^2) + 2 T i o, 2 T i o + 2 i o (i + o)) (rotating one sequence's gradient):

      covariances   N (i^2 + o^2)                                 (symmetric products)
      correction    n rot(T)
      scores, true Fisher        2 (n + q) T i o  +  2 n q i o    (form each G, one inner product)
      scores, empirical Fisher   q rot(T)  +  2 n q i o           (the correction's rotated G_i;
                                 n 2 T i o more where it kept their positions, T (i + o) < i o)

  and the eigendecompositions at the fp64 peak (4.7 (i^3 + o^3), ``benchmarks.ekfac.EIGH_FLOPS``).

kronfluence runs the same model (its Conv1D -> Linear copy) with the same Fisher
(``use_empirical_fisher``) and needs the same passes; it runs three forward passes where the
floor has one. ``floor_share_for_3x`` = floor / (kronfluence / 3): above 1, 3x lies beyond the
floor; below 1, the fraction of the floor's speed a whole fit + score must reach for the issue's 3x
(``floor_share`` = floor / ours: the fraction ours reaches). ``speedup_vs_kf_true`` compares each
row's ours with kronfluence's default (true Fisher) EK-FAC.

    python -m benchmarks.text_lm_floor        # ~4 minutes on one core

Writes benchmarks/results/text_lm_floor.{md,csv}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader

import attrkernels as ak
from attrkernels.eval.checkpoints import CheckpointCache
from attrkernels.integrations.hf import conv1d_names, conv1d_params, conv1d_to_linear

from .common import RESULTS, matmul_peak_gflops, provenance, write_results
from .ekfac import EIGH_FLOPS, kept_form_flops, kronfluence, rotation_flops
from .text_lm import BATCH


def arithmetic_flops(dims, n: int, q: int, T: int, fisher: str = "true") -> tuple[float, float]:
    """(fp32 FLOPs of covariances + correction + scores, fp64 FLOPs of the eigendecompositions)."""
    N = n * T
    fp32 = 0.0
    for i, o in dims:
        rot = rotation_flops(T, i, o)
        fp32 += N * (i * i + o * o) + n * rot + 2 * n * q * i * o
        fp32 += q * rot + n * kept_form_flops(T, i, o) if fisher == "empirical" else 2 * (n + q) * T * i * o
    return fp32, sum(EIGH_FLOPS * (i ** 3 + o ** 3) for i, o in dims)


def pass_seconds(model, task, loader, fn, reps: int) -> tuple[float, float]:
    """(forward, backward) seconds of one pass over the loader: ``fn`` with the autograd graph,
    then autograd to the outputs of the tracked Conv1D layers; best of ``reps``."""
    modules = [model.get_submodule(n) for n in conv1d_names(model)]
    best_f = best_b = float("inf")
    for _ in range(reps):
        fwd = bwd = 0.0
        for (x,) in loader:
            outs = []
            hooks = [m.register_forward_hook(lambda mod, a, o: outs.append(o)) for m in modules]
            t0 = time.perf_counter()
            out = fn(model, (x,)).sum()
            t1 = time.perf_counter()
            torch.autograd.grad(out, outs)
            t2 = time.perf_counter()
            for h in hooks:
                h.remove()
            fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
        best_f, best_b = min(best_f, fwd), min(best_b, bwd)
    return best_f, best_b


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fishers", default="true,empirical", help="true, empirical or both")
    args = parser.parse_args(argv)
    fishers = args.fishers.split(",")
    if not fishers or not set(fishers) <= {"true", "empirical"}:
        parser.error(f"--fishers: true, empirical or true,empirical, got {args.fishers!r}")
    torch.set_num_threads(args.threads)
    bench = ak.tasks.get("text-lm")
    states, _ = CheckpointCache(bench, args.runs).models(1)
    train, test = DataLoader(bench.train_data(), batch_size=BATCH), DataLoader(bench.test_data(), batch_size=BATCH)

    def model():
        m = bench.make_model(0).eval()
        m.load_state_dict(states[0])
        return m

    m = model()
    for p in m.parameters():
        p.requires_grad_(False)
    layers = conv1d_params(m)
    for name in layers:
        m.get_parameter(name).requires_grad_(True)
    fwd, bwd = pass_seconds(m, bench.task, train, bench.task.loss, args.reps)
    tfwd, tbwd = pass_seconds(m, bench.task, test, bench.task.measure, args.reps)
    dims = [(mod.weight.shape[0] + 1, mod.weight.shape[1]) for mod in map(m.get_submodule, conv1d_names(m))]
    cpu = torch.device("cpu")
    peak32, peak64 = matmul_peak_gflops(cpu, 2048), matmul_peak_gflops(cpu, 2048, torch.float64)

    times = {(f, label): [] for f in fishers for label in ("ours", "kronfluence")}
    for _ in range(args.reps):  # ours and kronfluence take turns, so a change in the machine's speed hits both
        for fisher, label in times:
            t0 = time.perf_counter()
            if label == "ours":
                ak.EKFAC(model(), bench.task, params=layers, fisher=fisher, verbose=False) \
                    .fit(train, states).score(test, train=train)
            else:
                mm = model()
                kronfluence(conv1d_to_linear(mm), bench.train_data(), bench.test_data(), BATCH, task=bench.task,
                            modules=conv1d_names(mm), fisher=fisher)
            times[fisher, label].append(time.perf_counter() - t0)
    best = {key: min(t) for key, t in times.items()}
    kf_true = best.get(("true", "kronfluence"))
    rows, flops = [], {}
    for fisher in fishers:
        backward_passes = 3 if fisher == "true" else 1
        model_s = fwd + backward_passes * bwd + tfwd + tbwd
        fp32, fp64 = flops[fisher] = arithmetic_flops(dims, len(bench.train_data()), len(bench.test_data()),
                                                      bench.length, fisher)
        gemm_s = fp32 / (peak32 * 1e9) + fp64 / (peak64 * 1e9)
        floor = model_s + gemm_s
        ours, kf = best[fisher, "ours"], best[fisher, "kronfluence"]
        medians = statistics.median(times[fisher, "kronfluence"]) / statistics.median(times[fisher, "ours"])
        rows.append(dict(fisher=fisher, forward_s=f"{fwd:.2f}", backward_s=f"{bwd:.2f}",
                         backward_passes=backward_passes, test_pass_s=f"{tfwd + tbwd:.2f}",
                         model_s=f"{model_s:.2f}", gemm_s=f"{gemm_s:.2f}", floor_s=f"{floor:.2f}",
                         ours_s=f"{ours:.2f}", kronfluence_s=f"{kf:.2f}", speedup=f"{kf / ours:.2f}",
                         speedup_median=f"{medians:.2f}",
                         speedup_vs_kf_true="" if kf_true is None else f"{kf_true / ours:.2f}",
                         floor_share=f"{floor / ours:.2f}", floor_share_for_3x=f"{floor / (kf / 3):.2f}",
                         peak_fp32=f"{peak32:.0f}", peak_fp64=f"{peak64:.0f}"))
        print(rows[-1], flush=True)
    info = provenance()
    counts = "; ".join(f"{f}: {flops[f][0] / 1e9:.1f} GFLOP fp32" for f in fishers)
    write_results(RESULTS / "text_lm_floor", rows, list(rows[0]), info,
                  f"text-lm EK-FAC fit + score (1,000 x 100 sequences, first checkpoint, {args.threads} torch "
                  f"thread(s)), {info['device']}, {info['date']}, commit {info['commit']}. Floor = the model "
                  "passes any EK-FAC with that Fisher needs (one forward + `backward_passes` backward passes over "
                  "the training data, one of each over the queries; measured) + covariance, correction and score "
                  f"GEMMs at the matmul peak ({counts}) + eigendecompositions "
                  f"({flops[fishers[0]][1] / 1e9:.2f} GFLOP fp64). kronfluence runs the row's Fisher. "
                  f"`ours_s`, `kronfluence_s`: best of {args.reps}, all four taking turns; `speedup_median` from the "
                  "medians; `speedup_vs_kf_true` = kronfluence's true-Fisher (default) time / ours. `floor_share` = "
                  "floor / ours (the fraction of the floor's speed ours reaches); `floor_share_for_3x` = floor / "
                  "(kronfluence / 3), the fraction 3x needs (above 1: 3x lies beyond the floor).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
