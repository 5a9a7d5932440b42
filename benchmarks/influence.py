"""Influence functions: batched HVPs and block CG against per-query CG, dattri and autograd; LDS on digits.

Part 1, kernels (an MLP 64-384-256-10, 126,090 parameters, trained on the digits training set;
the Hessian of the mean loss over its first ``--examples`` training examples; damping 0.05, the
value our not-positive-definite error suggests for this Hessian (its smallest eigenvalue is about
-0.017); right-hand sides = the margin gradients of the 300 test examples). Everything runs
twice: streaming the N examples in loader batches of ``--batch``, and on all N at once.

  hvp     the damped Hessian times 300 vectors: ours (one vmapped forward-over-reverse pass),
          plain torch.autograd double backward (per batch, the gradient graph built once and
          one backward through it per vector) and, on all N at once, dattri's ``hvp_at_x``
          (reverse-over-reverse, vmapped over the vectors, as its IF-CG uses it); median of 3
          for ours and dattri.
  solve   time to the relative residual ``--tol`` for all 300 queries: block CG (ours, all
          columns share each pass) and one CG per query (ours: ``block_cg`` on one column, timed
          on ``--per-query`` queries and scaled to 300); dattri's ``ihvp_at_x_cg`` vmapped over
          the 300 queries on all N examples at once. dattri's CG has no stopping test (its
          ``tol`` is unused), so it runs the largest number of iterations per-query CG needed,
          and the relative residual it reached is measured with one more pass.
  Floors: FLOPs / peak with (6 + 12 w) N p FLOPs per pass of w vectors over N examples (primal
  pass once, forward and backward tangent per vector).

Part 2, LDS on ``digits-mlp`` (1,000 train / 300 test, ground truth of benchmarks/setup_task),
one checkpoint (the model trained on all data with seed 0, shared by every row), damping 1e-2
(the issue's setting), Hessian unless the row says Gauss-Newton. dattri's IFAttributorCG runs
with its defaults (max_iter 10), the training set in one batch (its CG reruns per pair of
train and test batches, so this is its fastest setting), loss = mean cross-entropy and target
= minus the margin, so that its scores have our sign. TracIn uses 10 checkpoints along the
seed-0 training run with their learning rates (the checkpoint training is not timed).
Method rows time fit + score; ``x_dattri`` = dattri's time / this row's.

Times. ``cpu_s`` is the CPU time of the benchmark process (``time.process_time``) with
``--threads`` torch threads (default 1), ``wall_s`` the wall time. This 2-core machine is shared:
other jobs stretch wall times by 2-10x from one minute to the next, while CPU time of a
single-threaded run barely moves, so every ratio (``x_ours``, ``x_dattri``) divides CPU times
measured in the same run. The floor is FLOPs / the fp32 matmul peak on the same threads.

    python -m benchmarks.influence            # about 25 minutes on 2 busy cores
    python -m benchmarks.influence --quick    # part 1 without dattri's solve, part 2 without explicit and LiSSA

Writes benchmarks/results/influence_cpu.csv and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import attrkernels as ak
from attrkernels.capture import make_plan
from attrkernels.kernels.cg import CGConvergenceWarning, block_cg
from attrkernels.methods.influence import Curvature
from attrkernels.tasks import Classification, margin
from attrkernels.tasks.training import Recipe, train_classifier

from .common import RESULTS, matmul_peak_gflops, peak_rss, provenance, reset_peak_rss, write_results
from .frontier_configs import DIGITS_DAMPING
from .setup_task import checkpoints, ground_truth, lds_of, loaders

DEVICE = torch.device("cpu")
KERNEL_DAMPING = 0.05
COLUMNS = ["part", "impl", "setting", "cpu_s", "wall_s", "x_ours", "x_dattri", "floor_s", "steps", "hvp_columns",
           "residual", "lds", "ci", "memory", "note"]


# ---------------------------------------------------------------------------------------------
# Part 1: kernels on a 126k-parameter MLP
def kernel_problem(examples: int, batch_size: int):
    task = ak.tasks.get("digits-mlp")
    x, y = task.train_data().tensors
    xt, yt = task.test_data().tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 384), nn.ReLU(), nn.Linear(384, 256), nn.ReLU(), nn.Linear(256, 10))
    train_classifier(model, Classification(), (x, y), None,
                     Recipe(epochs=20, batch_size=128, lr=0.05, weight_decay=5e-3), torch.Generator().manual_seed(0))
    model.eval()
    G = ak.Featurizer(model, Classification().measure, 1).gradients((xt, yt)).T.contiguous()  # [p, 300]
    batch = (x[:examples], y[:examples])
    loader = [(x[i:min(i + batch_size, examples)], y[i:min(i + batch_size, examples)])
              for i in range(0, examples, batch_size)]
    return model, batch, loader, G


def timed(fn):
    """(fn(), CPU seconds of this process, wall seconds)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def median_cpu(fn, reps: int = 3) -> float:
    return float(np.median([timed(fn)[1] for _ in range(reps)]))


def dattri_parts(model, batch, damping):
    """dattri's hvp and CG closures (flat parameters) at the model's weights."""
    from dattri.func.hessian import hvp_at_x, ihvp_at_x_cg
    from dattri.func.utils import flatten_func, flatten_params

    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = flatten_params(params)

    def mean_loss(p, data):
        return F.cross_entropy(torch.func.functional_call(model, p, (data[0],)), data[1])

    loss = flatten_func(model)(mean_loss)
    at_x = lambda theta: loss(theta, batch)  # noqa: E731
    hvp = hvp_at_x(at_x, (flat,), mode="rev-rev", regularization=damping)
    return hvp, lambda iters: ihvp_at_x_cg(at_x, flat, max_iter=iters, mode="rev-rev",
                                           regularization=damping)


def autograd_double_backward(model, batch, V, damping):
    """(H + damping I) V by torch.autograd: the gradient graph once, one backward per vector."""
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    out = []
    for j in range(V.shape[1]):
        hv = torch.autograd.grad(flat, params, grad_outputs=V[:, j], retain_graph=True)
        out.append(torch.cat([h.reshape(-1) for h in hv]) + damping * V[:, j])
    return torch.stack(out, 1)


def add(rows: list, row: dict) -> None:
    """Append a finished row and print it (the run is long; a later crash keeps what was measured)."""
    rows.append(row)
    print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          file=sys.stderr)


def part_kernels(args, peak, rows):
    model, batch, loader, G = kernel_problem(args.examples, args.batch)
    p, V = G.shape
    N = batch[0].shape[0]
    loaders_ = {f"batches of {args.batch}": loader, "one batch": [batch]}
    ops = {name: Curvature(model, Classification(), make_plan(model), data, damping=KERNEL_DAMPING,
                           curvature="hessian") for name, data in loaders_.items()}
    work = lambda steps, columns: (6 * steps + 12 * columns) * N * p / (peak * 1e9)  # noqa: E731
    print(f"part 1: MLP with {p} parameters, Hessian over {N} examples, {V} right-hand sides", file=sys.stderr)
    dattri_hvp, dattri_cg = dattri_parts(model, batch, KERNEL_DAMPING)
    ops["one batch"].matvec(G)  # warm up torch.func and the allocator at full size

    # --- HVP throughput: 300 products, on the streamed loader and on all N examples at once
    for name, data in loaders_.items():
        op = ops[name]
        ours = op.matvec(G)
        t_ours = median_cpu(lambda: op.matvec(G))
        ref, t_auto, _ = timed(lambda: sum(autograd_double_backward(model, b, G, 0.0) * b[0].shape[0]
                                           for b in data) / N + KERNEL_DAMPING * G)
        rel = float((ours - ref).norm() / ref.norm())
        floor = work(1, V)
        add(rows, dict(part="hvp", impl="ours", setting=f"V={V}, vmapped fwd-over-rev, {name}", cpu_s=t_ours,
                       x_ours=1.0, floor_s=floor, hvp_columns=V, note=f"{V / t_ours:.0f} HVP/s"))
        if name == "one batch":
            t_dattri = median_cpu(lambda: torch.vmap(dattri_hvp)(G.T.contiguous()))
            add(rows, dict(part="hvp", impl="dattri", setting=f"hvp_at_x rev-rev, vmapped, {name}",
                           cpu_s=t_dattri, x_ours=t_dattri / t_ours, floor_s=floor, hvp_columns=V,
                           note=f"{V / t_dattri:.0f} HVP/s"))
        add(rows, dict(part="hvp", impl="torch.autograd", setting=f"double backward per vector, {name}",
                       cpu_s=t_auto, x_ours=t_auto / t_ours, floor_s=floor, hvp_columns=V,
                       note=f"{V / t_auto:.0f} HVP/s; ours vs it: rel. diff {rel:.1e}"))

    # --- solves to a fixed residual
    def residual_of(X):
        R = G - ops["one batch"].matvec(X)
        return R.norm(dim=0) / G.norm(dim=0)

    picks = torch.linspace(0, V - 1, args.per_query).round().long().tolist()
    for name, op in ops.items():
        block, t_block, w_block = timed(lambda: block_cg(op.matvec, G, tol=args.tol, max_iter=500))
        add(rows, dict(part="solve", impl="ours block CG", setting=f"{V} queries, tol {args.tol:g}, {name}",
                       cpu_s=t_block, wall_s=w_block, x_ours=1.0, floor_s=work(block.steps, block.columns),
                       steps=block.steps, hvp_columns=block.columns,
                       residual=f"{float(residual_of(block.x).max()):.1e}"))
        steps, t_single = [], 0.0
        for j in picks:
            one, t, _ = timed(lambda: block_cg(op.matvec, G[:, j:j + 1], tol=args.tol, max_iter=2000))
            steps.append(one.steps)
            t_single += t
        t_per_query = t_single / len(picks) * V
        total = float(np.mean(steps) * V)
        add(rows, dict(part="solve", impl="ours per-query CG",
                       setting=f"{V} queries (timed {len(picks)}, scaled), {name}", cpu_s=t_per_query,
                       x_ours=t_per_query / t_block, floor_s=work(total, total),
                       steps=f"{min(steps)}-{max(steps)} per query", hvp_columns=int(total),
                       residual=f"<= {args.tol:g}"))
    if not args.quick:
        iters = max(steps)
        X, t_d, w_d = timed(lambda: dattri_cg(iters)(G.T.contiguous()).T)  # it vmaps over the rows itself
        res = residual_of(X.contiguous())
        add(rows, dict(part="solve", impl="dattri ihvp_cg", setting=f"{V} queries vmapped, max_iter {iters}, one batch",
                       cpu_s=t_d, wall_s=w_d, x_ours=t_d / t_block, floor_s=work(iters + 1, (iters + 1) * V),
                       steps=iters + 1, hvp_columns=(iters + 1) * V,
                       residual=f"{float(res.max()):.1e} (median {float(res.median()):.1e})",
                       note="no stopping test; runs max_iter iterations plus one initial product"))


# ---------------------------------------------------------------------------------------------
# Part 2: LDS on digits-mlp
def dattri_if_cg(task, state):
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.task import AttributionTask

    model = task.make_model(0)
    model.load_state_dict(state)
    model.eval()

    def loss_func(params, data):
        return F.cross_entropy(torch.func.functional_call(model, params, (data[0],)), data[1])

    def target_func(params, data):
        return -margin(torch.func.functional_call(model, params, (data[0],)), data[1]).sum()

    train = DataLoader(task.train_data(), batch_size=len(task.train_data()), shuffle=False)
    test = DataLoader(task.test_data(), batch_size=len(task.test_data()), shuffle=False)
    c0, w0 = time.process_time(), time.perf_counter()
    attributor = IFAttributorCG(AttributionTask(loss_func=loss_func, model=model, checkpoints=state,
                                                target_func=target_func), device="cpu",
                                regularization=DIGITS_DAMPING)
    attributor.cache(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = attributor.attribute(train, test)
    return scores, time.process_time() - c0, time.perf_counter() - w0


def dattri_ifcg_scores(ctx, ckpts) -> torch.Tensor:
    """The frontier's dattri row: its IF-CG (defaults, damping 1e-2) per checkpoint, scores averaged."""
    return sum(dattri_if_cg(ctx.benchmark, state)[0] for state in ckpts) / len(ckpts)


def ours_method(make, train, test, ckpts, fit_kwargs=None):
    baseline = reset_peak_rss()

    def run():
        method = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CGConvergenceWarning)
            return method, method.fit(train, ckpts, **(fit_kwargs or {})).score(test)

    (method, scores), cpu, wall = timed(run)
    return method, scores, cpu, wall, peak_rss() - baseline


def part_digits(args, rows):
    task = ak.tasks.get("digits-mlp")
    gt = ground_truth(task, "default", verbose=False)
    (state,), _ = checkpoints(task, 1)
    train, test = loaders(task, batch_size=250)

    def lds_row(scores, **row):
        result = lds_of(scores, gt)
        row.update(part="digits", lds=f"{result.mean:.3f}", ci=f"[{result.ci_low:.3f}, {result.ci_high:.3f}]")
        add(rows, row)

    print("part 2: digits-mlp LDS", file=sys.stderr)
    d_scores, t_dattri, w_dattri = dattri_if_cg(task, state)
    lds_row(d_scores, impl="dattri IF-CG", setting="damping 1e-2, max_iter 10 (default)", cpu_s=t_dattri,
            wall_s=w_dattri,
            x_dattri=1.0, steps=11, hvp_columns=11 * 300)

    def cg_row(setting, **kw):
        method, scores, t, w, _ = ours_method(
            lambda: ak.InfluenceCG(task.make_model(0), task.task, damping=DIGITS_DAMPING, verbose=False, **kw),
            train, test, [state])
        info = method.info[0]
        lds_row(scores, impl="ours IF-CG", setting=setting, cpu_s=t, wall_s=w, x_dattri=t_dattri / t, steps=info.steps,
                hvp_columns=info.columns, residual=f"{float(info.residual_norms.median()):.1e} (median)")

    cg_row("max_iter 1", max_iter=1)
    cg_row("max_iter 3", max_iter=3)
    cg_row("tol 1e-4 (converged)", tol=1e-4, max_iter=200)
    cg_row("Gauss-Newton, max_iter 1", max_iter=1, curvature="gauss-newton")
    cg_row("Gauss-Newton, tol 1e-4", tol=1e-4, max_iter=200, curvature="gauss-newton")

    model, saved = task.train(None, 0, checkpoints=10)
    for k in (None, 2048):
        _, scores, t, w, _ = ours_method(lambda: ak.TracIn(task.make_model(0), task.task, k=k, verbose=False),
                                      train, test, saved)
        lds_row(scores, impl="ours TracIn", setting=f"10 checkpoints, {'exact' if k is None else f'k={k}'}",
                cpu_s=t, wall_s=w, x_dattri=t_dattri / t)
    if args.quick:
        return
    method, scores, t, w, _ = ours_method(
        lambda: ak.InfluenceLiSSA(task.make_model(0), task.task, damping=DIGITS_DAMPING, depth=50, verbose=False),
        train, test, [state])
    lds_row(scores, impl="ours IF-LiSSA", setting=f"depth 50, batch 250, scale {method.info[0].scale:.2f}",
            cpu_s=t, wall_s=w, x_dattri=t_dattri / t, steps=method.info[0].steps,
            residual=f"last update {float(method.info[0].change.median()):.1e}")
    method, scores, t, w, rss = ours_method(
        lambda: ak.InfluenceExplicit(task.make_model(0), task.task, damping=DIGITS_DAMPING, hvp_chunk=512,
                                     verbose=False), train, test, [state])
    lds_row(scores, impl="ours IF-explicit", setting=f"all {method.plan.total} parameters", cpu_s=t,
            wall_s=w,
            x_dattri=t_dattri / t,
            memory=f"packed {method.factors[0].nbytes / 1e9:.2f} GB, peak RSS +{rss / 1e9:.2f} GB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--examples", type=int, default=1000, help="training examples in the part-1 Hessian")
    parser.add_argument("--batch", type=int, default=100, help="loader batch size of the part-1 solves")
    parser.add_argument("--tol", type=float, default=1e-4, help="part-1 relative residual")
    parser.add_argument("--per-query", type=int, default=6, help="queries timed one at a time in part 1")
    parser.add_argument("--skip", choices=["kernels", "digits"], default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings are CPU seconds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops(DEVICE)
    rows: list = []
    if args.skip != "kernels":
        part_kernels(args, peak, rows)
    if args.skip != "digits":
        part_digits(args, rows)
    peak = max(peak, matmul_peak_gflops(DEVICE))
    for r in rows:
        for key in ("cpu_s", "wall_s", "floor_s"):
            if isinstance(r.get(key), float):
                r[key] = f"{r[key]:.2f}"
        for key in ("x_ours", "x_dattri"):
            if isinstance(r.get(key), float):
                r[key] = f"{r[key]:.1f}"
    info = provenance(DEVICE)
    intro = (f"Influence functions on {info['device']} ({info['torch_threads']} torch threads), {info['date']}, "
             f"commit {info['commit']}; fp32 matmul peak {peak:.0f} GFLOP/s on those threads. `cpu_s`: CPU "
             "seconds of the process (ratios use them: robust to the other jobs on this shared machine), "
             "`wall_s`: wall seconds.\n"
             "Part 1: MLP 64-384-256-10 (126,090 parameters), Hessian of the mean loss over "
             f"{args.examples} digits examples (streamed in batches of {args.batch}, or in one batch), "
             f"damping {KERNEL_DAMPING}, 300 queries; `x_ours` = its time / ours on the same data (block "
             "CG, or our HVP pass). Part 2: digits-mlp, damping "
             f"{DIGITS_DAMPING}, one checkpoint, LDS with 95% CI; `x_dattri` = dattri's time / this row's.")
    write_results(RESULTS / "influence_cpu", rows, COLUMNS, info, intro)


if __name__ == "__main__":
    main()
