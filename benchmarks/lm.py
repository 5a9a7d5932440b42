"""GPT-2-small: EK-FAC against kronfluence, and featurization against the plain per-example
gradient + projection, in one run on one model and one data set.

Model: ``transformers.GPT2LMHeadModel(GPT2Config())`` with random initialisation (torch seed 0):
12 blocks of width 768, 12 heads, vocabulary 50257, 124 M parameters, tied LM head, dropout off,
eager attention (so ``torch.func.vmap`` of the baseline batches it). Data: non-overlapping
windows of ``--length`` (128) UTF-8 bytes of Python's help texts (``pydoc_data.topics``) as token
ids; the first ``--train`` windows train, the next ``--test`` query. Task:
``ak.tasks.LanguageModeling`` (per-sequence summed token loss; measurement log p).

Tracked: the 48 ``Conv1D`` projections (attention c_attn / c_proj, MLP c_fc / c_proj; weights
and biases, 85 M parameters). The tied wte / lm_head, wpe and the LayerNorms are left out on
both sides.

Part 1, EK-FAC fit + pairwise scores. Ours: ``ak.EKFAC(params=Conv1D weights and biases)`` on
the Conv1D model. kronfluence: its EK-FAC on the Conv1D -> nn.Linear copy
(``attrkernels.integrations.hf``; its logits are checked against the original's), tracking the
same 48 modules. Both: true Fisher (every target token drawn from the model's softmax, seeded),
damping 0.1 x the mean eigenvalue of each layer (ours ``damping=None``, kronfluence
``damping_factor=None``), the same batch size, and eigendecompositions in the same precision: float64
(both libraries' default) and, with ``--eigh 64,32``, float32 as well (kronfluence's
``eigendecomposition_dtype``, our ``eigh_dtype``), each pair compared at its precision. Each library runs in
its own subprocess, which reports its wall and CPU seconds and its peak resident memory
(``ru_maxrss``); the score matrices are compared (Pearson, Spearman). ``floor`` = the FLOPs of our
algorithm per stage at this machine's fp32 / fp64 matmul peak (see ``ekfac_flops``).

Part 2, featurization (k = ``--k``, the per-sequence loss gradient of the tracked parameters):
ours dense (exact sketch, Rademacher), ours factored (per-layer Kronecker projections), and the
baseline: ``torch.func.vmap(grad)`` per-example gradients, then a matmul with a materialised
Gaussian projection generated in row chunks of ``--chunk`` rows (P itself, p x k, is 174 GB at
k = 512: it cannot be kept). Sequences/s (median over timed batches after a warm-up; the baseline, whose every call
generates all of P, one batch without a warm-up), peak extra
resident memory, and each stage's FLOP floor beside the time: per-example gradients
(forward, input-gradient and weight-gradient GEMMs of the linear layers and attention), the
sketch 2 p k per sequence, at the fp32 matmul peak measured right before each batch.

    python -m benchmarks.lm               # GPT-2-small, 200 x 24 sequences (see --help for the sizes)
    python -m benchmarks.lm --parts ekfac --train 32 --test 8   # a smaller EK-FAC run (~20 minutes)
    python -m benchmarks.lm --parts ekfac --eigh 64,32   # EK-FAC at both eigendecomposition precisions
    python -m benchmarks.lm --quick       # a 2-block width-64 GPT-2, well under a minute (CI)

Sizes: 200 training sequences x 24 queries by default (the few hundred x few dozen the LM issue
asks for): on one core of the Intel Xeon ~18 minutes for ours and ~50 for kronfluence with the
empirical Fisher, each within 24 GiB (our spill to disk on: its captures, 75 MB a sequence, do
not fit in memory beside the factors). The 96 float64 eigendecompositions (4.1 TFLOP, ~4 minutes
for either library) are a fixed cost: at 32 x 8 they are 60% of our time.

Writes benchmarks/results/lm_gpt2_small.{md,csv} (``--quick``: lm_quick.*; ``--tag T``: lm_T.*).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import attrkernels as ak
from attrkernels.integrations.hf import conv1d_names, conv1d_params, conv1d_to_linear

from .common import RESULTS, markdown_table, matmul_peak_gflops, peak_rss, provenance, reset_peak_rss, write_results
from .ekfac import EIGH_FLOPS, Clock, kept_form_flops, kronfluence, rotation_flops

WORKERS = ("ours", "kronfluence", "ours-eigh32", "kronfluence-eigh32")
SIZES = {
    "default": dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, length=128, train=200, test=24, batch=8,
                    k=512, feat_batch=4, feat_batches=2, chunk=1 << 18),
    "quick": dict(n_layer=2, n_embd=64, n_head=4, vocab=1000, length=32, train=32, test=8, batch=8,
                  k=256, feat_batch=4, feat_batches=2, chunk=1 << 14),
}


def build_model(a) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=a.vocab, n_positions=max(1024, a.length), n_embd=a.n_embd, n_layer=a.n_layer,
                        n_head=a.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def windows(a, count: int, start: int = 0) -> torch.Tensor:
    """``count`` windows [count, length] of the help texts' bytes, from window ``start``."""
    from attrkernels.tasks.text_lm import byte_windows, topic_texts

    ids = byte_windows(topic_texts(), a.length)
    if start + count > len(ids):
        raise ValueError(f"--train + --test must be at most {len(ids)} windows of {a.length} bytes")
    return torch.from_numpy(ids[start:start + count].astype(np.int64))


def datasets(a):
    return (torch.utils.data.TensorDataset(windows(a, a.train)),
            torch.utils.data.TensorDataset(windows(a, a.test, a.train)))


# ---------------------------------------------------------------------------------------------
# Part 1 worker (one library per subprocess, so each has its own peak RSS)


def worker(a) -> None:
    torch.set_num_threads(a.threads)
    model = build_model(a)
    train_set, test_set = datasets(a)
    task = ak.tasks.LanguageModeling()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    info = {}
    library, _, precision = a.worker.partition("-eigh")
    eigh_dtype = torch.float32 if precision == "32" else torch.float64
    if library == "ours":
        from attrkernels.methods.ekfac import fitting

        loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=a.batch)  # noqa: E731
        eigen, stages = fitting.eigen, {}

        def timed_eigen(*args, **kwargs):  # the eigendecomposition stage's wall seconds
            t0 = time.perf_counter()
            eigen(*args, **kwargs)
            stages["eigendecomposition"] = time.perf_counter() - t0

        fitting.eigen = timed_eigen
        info["stages"] = stages
        clock = Clock()
        m = ak.EKFAC(model, task, params=conv1d_params(model), eigh_dtype=eigh_dtype, fisher=a.fisher,
                     spill_dir=a.out if a.spill == "on" else None, verbose=False)
        for stage in ("covariances", "correction"):  # the factor passes' wall seconds
            def timed(*args, _run=getattr(m.passes, stage), _stage=stage, **kwargs):
                t0 = time.perf_counter()
                out = _run(*args, **kwargs)
                stages[_stage] = time.perf_counter() - t0
                return out

            setattr(m.passes, stage, timed)
        m.fit(loader(train_set))
        fit = clock.lap()
        print(f"ours fit (wall, cpu s): {fit}", flush=True)
        scores = m.score(loader(test_set), train=loader(train_set))
        score = clock.lap()
    else:
        linear = conv1d_to_linear(model)
        probe = train_set.tensors[0][:2]
        with torch.no_grad():
            info["logit_max_abs_diff"] = (linear(probe).logits - model(probe).logits).abs().max().item()
        modules = conv1d_names(model)
        del model
        stages = {}
        scores, fit, score = kronfluence(linear, train_set, test_set, a.batch, task=task, modules=modules,
                                         query_batch=a.kf_query_batch or a.test, stages=stages,
                                         eigh_dtype=eigh_dtype, fisher=a.fisher)
        info["stages"] = stages
    np.save(Path(a.out) / f"{a.worker}.npy", scores.numpy())
    info.update(fit_s=fit[0], fit_cpu=fit[1], score_s=score[0], score_cpu=score[1], base_rss=base,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    (Path(a.out) / f"{a.worker}.json").write_text(json.dumps(info))


def run_worker(name: str, argv: list, out: str) -> tuple[dict, np.ndarray]:
    """The worker's (times and memory, scores); a finished worker's files in ``out`` are reused."""
    if not (Path(out) / f"{name}.json").exists():
        cmd = [sys.executable, "-m", "benchmarks.lm", *argv, "--worker", name, "--out", out]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads((Path(out) / f"{name}.json").read_text()), np.load(Path(out) / f"{name}.npy")


# ---------------------------------------------------------------------------------------------
# FLOP counts


def layer_dims(model) -> list[tuple[int, int]]:
    """(d_in including the bias column, d_out) of every tracked Conv1D."""
    return [(m.weight.shape[0] + 1, m.weight.shape[1]) for m in map(model.get_submodule, conv1d_names(model))]


def pass_flops(a, dims) -> float:
    """One sequence's forward + input-gradient backward: every linear layer (the tracked ones and
    the LM head) and the two attention products of each block, twice (forward and backward)."""
    T = a.length
    linear = sum((d_in - 1) * d_out for d_in, d_out in dims) + a.vocab * a.n_embd
    return 2 * (2 * T * linear + 4 * T * T * a.n_embd * a.n_layer)


def ekfac_flops(a, dims) -> dict:
    """fp32 FLOPs of our EK-FAC per stage (fp64 for the eigendecompositions), n = --train, q = --test,
    for each layer (d_in = i with the bias column, d_out = o, T tokens), as it runs with all its
    captures kept (``methods.ekfac.replay``; with fewer kept it runs more model passes, so this
    is a lower bound): over the training data one forward pass and three backward passes (the
    covariances' labels, the correction's, the training loss for the scores; one with
    ``--fisher empirical``), each half of ``pass_flops``; the correction and the scores then run
    no model pass:

    covariances: n x (passes + T (i^2 + o^2))        (symmetric products: half the GEMM)
    eigendecompositions: 4.7 (i^3 + o^3)             (float64)
    correction: n x (rot = min(rotate A and D then form, form G then rotate) + square)
    scores, true Fisher: q x (pass + form G_q) + n x form G_i + n q 2 i o, plus the cheaper of
            preconditioning each query in parameter space (q x 4 i o (i + o)) and rotating both
            sides into the eigenbasis (q x 2 i o (i + o) + n x 2 T (i^2 + o^2));
    scores, empirical Fisher: the correction keeps each R_i (or, where T (i + o) < i o, its
            rotated positions, formed again: n x 2 T i o), so q x (pass + rot) + n q 2 i o.
    """
    T, n, q, p = a.length, a.train, a.test, pass_flops(a, dims)
    passes = 2 * p if a.fisher == "true" else p
    cov = n * (passes + sum(T * (i * i + o * o) for i, o in dims))
    eig = sum(EIGH_FLOPS * (i ** 3 + o ** 3) for i, o in dims)
    rot = sum(rotation_flops(T, i, o) + 2 * i * o for i, o in dims)
    lam = n * rot
    if a.fisher == "empirical":
        score = q * p + sum(q * rotation_flops(T, i, o) + n * kept_form_flops(T, i, o) + 2 * q * n * i * o
                            for i, o in dims)
    else:
        score = q * p + sum(2 * T * i * o * (q + n) + 2 * q * n * i * o
                            + min(4 * q * i * o * (i + o), 2 * q * i * o * (i + o) + 2 * n * T * (i * i + o * o))
                            for i, o in dims)
    return {"fit": cov + lam, "eigh64": eig, "score": score}


def grad_flops(a, dims) -> float:
    """Per-example gradient of one sequence: the pass plus the weight-gradient GEMMs 2 T d_in d_out."""
    return pass_flops(a, dims) + sum(2 * a.length * (i - 1) * o for i, o in dims)


# ---------------------------------------------------------------------------------------------
# Part 2: featurization


def baseline_featurizer(model, names, k, chunk):
    """torch.func per-example gradients of the tracked parameters, then g @ P with P (p x k,
    Gaussian) generated in chunks of ``chunk`` rows from a fixed seed (same P every batch)."""
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    frozen = {n: p.detach() for n, p in params.items() if n not in names}

    def loss(tracked, ids):  # one sequence's summed next-token cross-entropy
        logits = functional_call(model, {**frozen, **tracked}, (ids[None],)).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:], reduction="sum")

    per_example = vmap(grad(loss), in_dims=(None, 0))

    def featurize(batch):
        (ids,) = batch
        grads = per_example({n: params[n].detach() for n in names}, ids)
        flat = torch.cat([grads[n].reshape(ids.shape[0], -1) for n in names], 1)
        del grads
        out = torch.zeros(ids.shape[0], k)
        gen = torch.Generator().manual_seed(0)
        for r in range(0, flat.shape[1], chunk):
            rows = min(chunk, flat.shape[1] - r)
            out.addmm_(flat[:, r:r + rows], torch.randn(rows, k, generator=gen))
        return out / k ** 0.5
    return featurize


def featurization(a, rows) -> None:
    model = build_model(a)
    names = conv1d_params(model)
    dims = layer_dims(model)
    p = sum(model.get_parameter(n).numel() for n in names)
    task = ak.tasks.LanguageModeling()
    ids = windows(a, 1 + a.feat_batch * a.feat_batches)
    warm = (ids[:1],)
    batches = [(ids[1 + i * a.feat_batch:1 + (i + 1) * a.feat_batch],) for i in range(a.feat_batches)]
    impls = {"ours dense": ak.Featurizer(model, task.loss, a.k, params=names),
             "ours factored": ak.Featurizer(model, task.loss, a.k, params=names, mode="factored"),
             "per-example grad + projection (torch.func vmap, materialised P chunks)":
                 baseline_featurizer(model, names, a.k, a.chunk)}
    g_flops, s_flops = grad_flops(a, dims), 2 * p * a.k
    n = 2048
    x, y = torch.randn(n, n), torch.randn(n, n)
    for label, fn in impls.items():
        base = reset_peak_rss()
        baseline = label.startswith("per-example")
        try:
            if not baseline:  # the baseline's first call is a full one: it regenerates all of P
                fn(warm)
            times, peaks = [], []
            for b in batches[:1] if baseline else batches:
                t0 = time.perf_counter()
                torch.mm(x, y)
                peaks.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
                t0 = time.perf_counter()
                fn(b)
                times.append(time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001  (an implementation failing is a result)
            rows.append(dict(impl=label, note=f"failed: {type(err).__name__}: {err}"[:160]))
            print(rows[-1], flush=True)
            continue
        t, peak = statistics.median(times), statistics.median(peaks)
        grad_s, sketch_s = a.feat_batch * g_flops / (peak * 1e9), a.feat_batch * s_flops / (peak * 1e9)
        dense = label == "ours dense" or label.startswith("per-example")
        floor = grad_s + (sketch_s if dense else 0.0)
        rows.append(dict(impl=label, seq_per_s=f"{a.feat_batch / t:.2f}", batch_s=f"{t:.2f}",
                         peak_mem_mb=f"{(peak_rss() - base) / 2 ** 20:.0f}", grad_floor_s=f"{grad_s:.2f}",
                         sketch_floor_s=f"{sketch_s:.2f}" if dense else "", vs_floor=f"{t / floor:.2f}",
                         mm_gflops=f"{peak:.0f}", note="" if dense else "floor: gradient pass only"))
        print(rows[-1], flush=True)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2 (2 blocks, width 64): CI")
    for key, val in SIZES["default"].items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default {val}")
    parser.add_argument("--kf-query-batch", type=int, default=None,
                        help="queries kronfluence preconditions at once (default: all --test)")
    parser.add_argument("--parts", default="ekfac,featurize")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None, help="results file lm_<tag> (default gpt2_small, quick with --quick)")
    parser.add_argument("--workdir", default=None,
                        help="folder of the EK-FAC workers' results (default: a temporary one); results of "
                             "finished workers found there are reused (e.g. workers started by hand with "
                             "--worker ours|kronfluence --out DIR)")
    parser.add_argument("--eigh", default="64", help="precisions of the eigendecompositions to run, each for "
                        "both libraries: 64, 32 or 64,32 (kronfluence's eigendecomposition_dtype, our eigh_dtype)")
    parser.add_argument("--fisher", choices=("true", "empirical"), default="true",
                        help="both libraries' Fisher: true (their default: labels sampled from the model) or "
                             "empirical (the dataset's next tokens; our fit + score then makes one backward pass "
                             "over the training data instead of three)")
    parser.add_argument("--spill", choices=("on", "off"), default="on",
                        help="our EK-FAC keeps the batches beyond its replay budget (a quarter of the memory "
                             "available) in an unlinked file in the work folder (EKFAC(spill_dir=...)) instead of "
                             "running the model on them again at the correction and the scores (default on)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    for key, val in SIZES["quick" if a.quick else "default"].items():
        if getattr(a, key) is None:
            setattr(a, key, val)
    if a.worker:
        worker(a)
        return 0
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    peak32, peak64 = matmul_peak_gflops(cpu, n=2048), matmul_peak_gflops(cpu, n=2048, dtype=torch.float64)
    dims = layer_dims(build_model(a))
    rows_e, rows_f, extra = [], [], {}
    if "ekfac" in a.parts:
        passthrough = ["--quick"] * a.quick + [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in SIZES["default"]] \
            + [f"--threads={a.threads}", f"--fisher={a.fisher}", f"--spill={a.spill}"] \
            + ([f"--kf-query-batch={a.kf_query_batch}"] if a.kf_query_batch else [])
        with tempfile.TemporaryDirectory() as tmp:
            folder = a.workdir or tmp
            Path(folder).mkdir(parents=True, exist_ok=True)
            precisions = a.eigh.split(",")
            names = [f"{lib}{'' if q == '64' else '-eigh32'}" for q in precisions for lib in ("ours", "kronfluence")]
            results = {name: run_worker(name, passthrough, folder) for name in names}
        # the peaks again after the workers: the higher of the two (a busy minute lowers one)
        peak32 = max(peak32, matmul_peak_gflops(cpu, n=2048))
        peak64 = max(peak64, matmul_peak_gflops(cpu, n=2048, dtype=torch.float64))
        flops = ekfac_flops(a, dims)
        from scipy.stats import spearmanr

        for q in precisions:
            tag = "" if q == "64" else "-eigh32"
            (info_o, ours_s), (kf_info, kf_s) = results["ours" + tag], results["kronfluence" + tag]
            kf_total = kf_info["fit_s"] + kf_info["score_s"]
            kf_cpu = kf_info["fit_cpu"] + kf_info["score_cpu"]
            for name, info in (("ours", info_o), ("kronfluence", kf_info)):
                total, cpu_s = info["fit_s"] + info["score_s"], info["fit_cpu"] + info["score_cpu"]
                rows_e.append(dict(impl=name, eigh=f"float{q}", fit_s=f"{info['fit_s']:.1f}",
                                   eigh_s=f"{info['stages']['eigendecomposition']:.1f}",
                                   score_s=f"{info['score_s']:.1f}", total_s=f"{total:.1f}", cpu_s=f"{cpu_s:.1f}",
                                   speedup_wall=f"{kf_total / total:.2f}", speedup_cpu=f"{kf_cpu / cpu_s:.2f}",
                                   peak_rss_gib=f"{info['peak_rss'] / 2 ** 30:.2f}",
                                   model_rss_gib=f"{info['base_rss'] / 2 ** 30:.2f}"))
            eig_s = flops["eigh64"] / (peak64 if q == "64" else peak32) / 1e9
            rows_e.append(dict(impl="floor (our algorithm's FLOPs at peak)", eigh=f"float{q}",
                               fit_s=f"{flops['fit'] / peak32 / 1e9 + eig_s:.1f}", eigh_s=f"{eig_s:.1f}",
                               score_s=f"{flops['score'] / peak32 / 1e9:.1f}",
                               total_s=f"{(flops['fit'] + flops['score']) / peak32 / 1e9 + eig_s:.1f}"))
            extra[f"ours_fit_stages_s_eigh{q}"] = json.dumps({k: round(v, 1) for k, v in info_o["stages"].items()})
            extra[f"kronfluence_fit_stages_s_eigh{q}"] = json.dumps({k: round(v, 1)
                                                                    for k, v in kf_info["stages"].items()})
            corr = float(np.corrcoef(ours_s.ravel(), kf_s.ravel())[0, 1])
            rho = float(spearmanr(ours_s.ravel(), kf_s.ravel())[0])
            per_query = float(np.mean([spearmanr(ours_s[:, j], kf_s[:, j])[0] for j in range(ours_s.shape[1])]))
            extra[f"scores_ours_vs_kronfluence_eigh{q}"] = (f"Pearson {corr:.4f}, Spearman {rho:.4f}, mean per-query "
                                                           f"Spearman {per_query:.4f}")
        if len(precisions) > 1:
            o64, o32 = results["ours"][1], results["ours-eigh32"][1]
            extra["scores_ours_eigh32_vs_eigh64"] = (f"Pearson {np.corrcoef(o64.ravel(), o32.ravel())[0, 1]:.6f}, "
                                                     f"max |diff| / max |score| "
                                                     f"{np.abs(o64 - o32).max() / np.abs(o64).max():.2e}")
        extra.update(linear_copy_logit_max_abs_diff=f"{kf_info['logit_max_abs_diff']:.2e}",
                     ekfac_flops=json.dumps({k: f"{v:.3e}" for k, v in flops.items()}))
        for r in rows_e:
            print(r, flush=True)
        print(extra, flush=True)
    if "featurize" in a.parts:
        featurization(a, rows_f)
    peak32 = max(peak32, matmul_peak_gflops(cpu, n=2048))
    info = provenance(cpu)
    from importlib.metadata import version

    info.update(kronfluence=version("kronfluence"), transformers=version("transformers"),
                load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()))
    p = sum(i * o for i, o in dims)
    intro = (f"GPT-2 ({a.n_layer} blocks, width {a.n_embd}, vocabulary {a.vocab}, sequence length {a.length}), "
             f"random init; tracked: the {len(dims)} Conv1D projections ({p / 1e6:.1f} M parameters with biases); "
             f"{a.train} training sequences x {a.test} queries, batch {a.batch}, {a.threads} torch thread(s), "
             f"{a.fisher} Fisher, our spill to disk {a.spill}. "
             f"{info['device']} ({info['cores']} cores), {info['date']}, commit {info['commit']}, kronfluence "
             f"{info['kronfluence']}, transformers {info['transformers']}; load average at the end "
             f"{info['load_average']}. fp32 matmul peak {peak32:.1f} GFLOP/s, fp64 {peak64:.1f} GFLOP/s.\n\n"
             "EK-FAC fit + pairwise scores, each library in its own process, with the eigendecompositions in "
             "the precision of column `eigh` (kronfluence's eigendecomposition_dtype, our eigh_dtype); "
             "`speedup_*` = kronfluence's total at the same precision / that row's; `eigh_s` = the "
             "eigendecomposition stage; `peak_rss_gib` = the process's peak resident memory (`model_rss_gib`: "
             "after building the model and data).")
    if extra:
        intro += " " + "; ".join(f"{k}: {v}" for k, v in extra.items() if k.startswith(("scores_", "kronfluence_", "ours_")))
        intro += (f"; the Linear copy's logits differ from the Conv1D model's by at most "
                  f"{extra['linear_copy_logit_max_abs_diff']}.")
    outro = ""
    if rows_f:
        outro = (f"\nFeaturization, k = {a.k}, batches of {a.feat_batch} sequences (median of {a.feat_batches} "
                 "after a warm-up sequence; the baseline, which generates all of P at every call: one batch, no "
                 "warm-up). Floors at the fp32 matmul peak measured right before each batch "
                 "(`mm_gflops`): `grad_floor_s` = per-example gradient GEMMs (forward, input and weight "
                 "gradients, attention), `sketch_floor_s` = 2 p k per sequence; `vs_floor` = time / their sum.\n\n"
                 + markdown_table(rows_f, ["impl", "seq_per_s", "batch_s", "peak_mem_mb", "grad_floor_s",
                                           "sketch_floor_s", "vs_floor", "mm_gflops", "note"]) + "\n")
    stem = RESULTS / f"lm_{a.tag or ('quick' if a.quick else 'gpt2_small')}"
    write_results(stem, rows_e, ["impl", "eigh", "fit_s", "eigh_s", "score_s", "total_s", "cpu_s", "speedup_wall",
                                 "speedup_cpu", "peak_rss_gib", "model_rss_gib"], info, intro,
                  {**extra, "matmul_peak_gflops_fp32": f"{peak32:.1f}", "matmul_peak_gflops_fp64": f"{peak64:.1f}"},
                  outro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
