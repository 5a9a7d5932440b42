"""The text-lm frontier: LDS and cost of TRAK, EK-FAC, K-FAC, IF-CG, TracIn and kronfluence's EK-FAC
(the peer) on the byte-level GPT-2 fine-tuned on Python's help texts, on the same checkpoints.

Checkpoints: the full-data fine-tunes of seeds 0, 1, 2 (``M`` of them) and, for TracIn, the 3
end-of-epoch checkpoints of the seed-0 fine-tune with their learning rates, all from the
checkpoint cache (``runs/ckpt/text-lm``, shared with the frontier). ``train_s`` = their training
seconds; ``method_s`` / ``cpu_s`` = the method's fit + score wall / process-CPU seconds in this
run (CPU seconds leave out the time other processes held the cores), on ``--threads`` (1) torch
threads for ours and the peer alike.

Methods. "Conv1D layers" = the weights and biases of the 8 attention / MLP projections (the
parameters EK-FAC and K-FAC factor; the tied wte / lm_head, wpe and LayerNorms left out), for
every method. kronfluence runs its EK-FAC on the Conv1D -> nn.Linear copy of
each checkpoint (``attrkernels.integrations.hf``, same logits) tracking the same 8 modules, with
the same true Fisher (tokens sampled from the model, seeded), the same damping rule (0.1 x each
layer's mean eigenvalue) and the same batch size; its scores are averaged over checkpoints like
ours. Both libraries' EK-FAC also run with the empirical Fisher (the dataset's next tokens instead
of sampled ones; ours ``fisher="empirical"``, kronfluence's ``use_empirical_fisher``), with which
ours makes one forward and one backward pass over the training data for the covariances, the
correction and the scores together. IF-CG (with ``--ifcg`` only) solves with the Gauss-Newton curvature under the math SDPA
backend (CPU flash attention has no forward-mode AD), 4 vectors per vmapped product (the
default 32 held 14 GB), ``CG_ITERATIONS`` block-CG iterations and damping 0.1 x the mean eigenvalue of the empirical Fisher (``fisher_damping``; not tuned against
the ground truth). TRAK on all parameters (its default) is left out: the position embedding is
looked up without the batch dimension and goes to the slow torch.func path (its quick LDS was
below the Conv1D-layer TRAK's, benchmarks/results/text_lm_quick.md at d14e1d4).

LDS (``ak.lds``) raw and centred (each subset's mean over the test sequences removed from its
outputs and predictions), with bootstrap 95% CIs over test sequences.

    python -m benchmarks.text_lm --protocol quick      # builds the quick ground truth (~5 min)
    python -m benchmarks.text_lm                       # default protocol (100 subsets x 4 seeds)
    python -m benchmarks.text_lm --protocol quick,default --no-build   # LDS on the finished ones only

Each method runs once: its scores and times are cached in <runs>/text-lm-scores/ (keyed on the
task config and the label), and every protocol's LDS reads them. Writes
benchmarks/results/text_lm_<protocol>.{csv,md,png}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

import attrkernels as ak
from attrkernels.eval import GroundTruth, build_ground_truth
from attrkernels.eval.checkpoints import CheckpointCache
from attrkernels.eval.report import plot
from attrkernels.integrations.hf import conv1d_names, conv1d_params, conv1d_to_linear
from attrkernels.kernels.cg import CGConvergenceWarning
from attrkernels.store import atomic_write

from .common import RESULTS, provenance, write_results
from .ekfac import kronfluence

BATCH = 50
CG_ITERATIONS = 10


def fisher_damping(model, task, params, train) -> float:
    """0.1 x the mean eigenvalue of the empirical Fisher on ``params`` (its trace / p, the sum of
    the per-sequence squared gradient norms / p): EK-FAC's damping rule applied to the whole
    curvature, so IF-CG's damping is not tuned against the ground truth."""
    grads = ak.capture.Gradients(model, task.loss, params=params)
    total, p = 0.0, 0
    for batch in train:
        g = grads(batch)
        total, p = total + float(g.double().pow(2).sum()), g.shape[1]
    return 0.1 * total / p


def configs(bench, train, test, with_ifcg: bool = False) -> list:
    """(family, label, (kind, count), run(states, rates) -> scores [n_train, n_test])."""
    layers = conv1d_params(bench.make_model(0))

    def model():
        return bench.make_model(0).eval()

    def trak(k, params=None):
        return lambda states, rates: ak.TRAK(model(), bench.task, k=k, params=params, verbose=False) \
            .fit(train, states).score(test)

    def factored(cls, fisher="true"):
        return lambda states, rates: cls(model(), bench.task, params=layers, fisher=fisher, verbose=False) \
            .fit(train, states).score(test, train=train)

    def ifcg(states, rates):
        m = model()
        m.load_state_dict(states[0])
        # the math SDPA backend: CPU flash attention has no forward-mode AD, which the
        # Gauss-Newton products need (the same function, another kernel)
        with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH):
            warnings.simplefilter("ignore", CGConvergenceWarning)
            return ak.InfluenceCG(m, bench.task, damping=fisher_damping(m, bench.task, layers, train),
                                  curvature="gauss-newton", params=layers, max_iter=CG_ITERATIONS,
                                  hvp_chunk=4, verbose=False).fit(train, states).score(test)

    def tracin(states, rates):
        return ak.TracIn(model(), bench.task, params=layers, verbose=False) \
            .fit(train, states, learning_rates=rates).score(test)

    def peer(fisher="true"):
        def run(states, rates):
            total = 0
            for state in states:
                m = model()
                m.load_state_dict(state)
                total = total + kronfluence(conv1d_to_linear(m), bench.train_data(), bench.test_data(), BATCH,
                                            task=bench.task, modules=conv1d_names(m), fisher=fisher)[0]
            return total / len(states)
        return run

    out = [("EK-FAC", "EK-FAC M=1", ("models", 1), factored(ak.EKFAC)),
           ("kronfluence (peer)", "kronfluence EK-FAC M=1 (Linear copy)", ("models", 1), peer()),
           ("EK-FAC", "EK-FAC empirical Fisher M=1", ("models", 1), factored(ak.EKFAC, "empirical")),
           ("kronfluence (peer)", "kronfluence EK-FAC empirical Fisher M=1 (Linear copy)", ("models", 1),
            peer("empirical"))]
    out += [("TRAK", f"TRAK k=512 M={M} (Conv1D layers)", ("models", M), trak(512, layers)) for M in (1, 3)]
    out.append(("K-FAC", "K-FAC M=1", ("models", 1), factored(ak.KFAC)))
    out.append(("TracIn", "TracIn C=3", ("trajectory", 3), tracin))  # one checkpoint per epoch (3 epochs)
    if with_ifcg:
        out.append(("IF", f"IF-CG Gauss-Newton ({CG_ITERATIONS} iterations) M=1", ("models", 1), ifcg))
    return out


def write(rows, gt, protocol) -> None:
    m, r = gt.masks.shape[0], gt.outputs.shape[1]
    info = provenance()
    stem = RESULTS / f"text_lm_{protocol}"
    plot(rows, stem.with_suffix(".png"), f"text-lm ({protocol} protocol): LDS vs cost on {info['device']}")
    write_results(stem, rows, ["method", "LDS", "CI", "centred", "centred_CI", "train_s", "method_s", "cpu_s"],
                  info, f"text-lm, {protocol} ground truth ({m} subsets x {r} seeds), {info['device']} "
                  f"({info['cores']} cores), {info['date']}, commit {info['commit']}, load average "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}. LDS raw and centred with bootstrap 95% CIs; "
                  "`train_s` = the checkpoints' training seconds (cached), `method_s` / `cpu_s` = fit + score "
                  "wall / process-CPU seconds in this run.")


def method_scores(label, run, cache, kind, count, folder: Path, key: str) -> dict:
    """{scores, train_s, method_s, cpu_s} of one method, computed once and cached in ``folder``
    (the scores do not depend on the ground truth, so every protocol's LDS reads the same run)."""
    path = folder / (label.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "") + ".pt")
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return saved
    if kind == "models":
        states, seconds = cache.models(count)
        rates, train_s = None, sum(seconds)
    else:
        states, train_s = cache.trajectory(count)  # Checkpoint objects: TracIn reads their lr
        rates = [c.lr for c in states]
    wall, cpu = time.perf_counter(), time.process_time()
    scores = run(states, rates)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    saved = {"key": key, "scores": scores.float(), "train_s": train_s, "method_s": wall, "cpu_s": cpu}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(saved, f))
    return saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="default", help="quick, default, or both (quick,default)")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--only", default=None, help="comma-separated substrings of labels to run")
    parser.add_argument("--ifcg", action="store_true",
                        help="add IF-CG (not run by default: 100 right-hand sides x CG_ITERATIONS full-data "
                             "Gauss-Newton products, the costliest method here)")
    parser.add_argument("--no-build", action="store_true",
                        help="use a ground truth only when it is complete; never train its models")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one: the model is small, and a second thread spins at barriers "
                             "whenever another process holds a core)")
    args = parser.parse_args(argv)
    protocols = args.protocol.split(",")
    if not set(protocols) <= {"quick", "default"}:
        parser.error(f"--protocol: quick, default or quick,default, got {args.protocol!r}")
    torch.set_num_threads(args.threads)
    bench = ak.tasks.get("text-lm")
    cache = CheckpointCache(bench, args.runs)
    train, test = DataLoader(bench.train_data(), batch_size=BATCH), DataLoader(bench.test_data(), batch_size=BATCH)
    chosen = configs(bench, train, test, args.ifcg)
    if args.only:
        chosen = [c for c in chosen if any(s in c[1] for s in args.only.split(","))]
    folder = Path(args.runs) / "text-lm-scores"
    results = []
    for family, label, (kind, count), run in chosen:
        key = f"{bench.config_hash()}:{label}:{BATCH}:{CG_ITERATIONS}"
        results.append((family, label, method_scores(label, run, cache, kind, count, folder, key)))
        r = results[-1][2]
        print(f"{label}: method {r['method_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU", flush=True)
    for protocol in protocols:
        directory = Path(args.runs) / "gt" / f"text-lm-{protocol}"
        if args.no_build:
            gt = GroundTruth.load(directory) if (directory / "meta.json").exists() else None
            if gt is None or not gt.complete:
                print(f"{directory}: ground truth missing or incomplete; no LDS for {protocol} (--no-build)")
                continue
        else:
            gt = build_ground_truth(bench, directory, protocol)
        rows = []
        for family, label, r in results:
            raw = ak.lds(r["scores"], gt.masks, gt.outputs)
            centred = ak.lds(r["scores"], gt.masks, gt.outputs, centre=True)
            # a run paused while other benchmarks held the machine: method_s is its CPU time (one thread)
            shown = label + (" [CPU time: run paused]" if "wall_with_pause_s" in r else "")
            rows.append(dict(family=family, label=label, lds=raw.mean, ci_low=raw.ci_low, ci_high=raw.ci_high,
                             cost_s=r["train_s"] + r["method_s"], method=shown, LDS=f"{raw.mean:.3f}",
                             CI=f"[{raw.ci_low:.3f}, {raw.ci_high:.3f}]", centred=f"{centred.mean:.3f}",
                             centred_CI=f"[{centred.ci_low:.3f}, {centred.ci_high:.3f}]",
                             train_s=f"{r['train_s']:.1f}", method_s=f"{r['method_s']:.1f}",
                             cpu_s=f"{r['cpu_s']:.1f}"))
        write(rows, gt, protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
