"""Featurizer throughput and memory: ours (dense, factored) vs traker's featurizer, same run.

Three models on random inputs, k = 2048, per-example gradients of the correct-class margin:
  mlp          784-1024-512-10 MLP (1.33 M parameters)
  resnet9      ResNet-9 of width 32 on 32x32x3 inputs (BatchNorm in eval mode, 1.65 M parameters)
  transformer  2 pre-norm blocks with F.scaled_dot_product_attention, d = 128, 64 tokens
  mha          the same shape from torch's nn.TransformerEncoder (nn.MultiheadAttention inside,
               causal mask, sinusoidal positions); also ``ours-dense, MHA via torch.func``: the
               attention's parameters forced to the torch.func fallback, as before the
               MultiheadAttention handler
Implementations:
  ours-dense      ak.Featurizer(mode="dense"), Rademacher (exact sketch of the gradient)
  ours-factored   ak.Featurizer(mode="factored") (LoGra-style Kronecker projection)
  traker          traker.TRAKer.featurize with its CPU defaults (vmap per-example gradients,
                  BasicProjector, Gaussian)
  traker+ours-P   traker.TRAKer.featurize with our projector (SketchProjector): the same
                  features as ours-dense (checked, up to traker's 1/sqrt(p) normalisation)
Reports examples/s (median over batches after a warm-up batch), the peak extra resident memory
of the featurisation, the ratio to ours-dense, and two floors at the fp32 matmul peak measured
in the same run; for ours-dense also the ratios with each batch timed right after its own peak
measurement (``*_paired``, robust to other jobs on the machine):

  sketch floor  2 p k FLOPs per example (the exact sketch of a p-vector, P generated for free).
  full floor    2 p k plus the GEMM FLOPs every dense featurizer must do to get the per-example
                gradients, per example, summed over the Linear and Conv layers (T positions per
                example: 1 for an MLP layer, the output pixels of a convolution, the tokens of a
                transformer layer; d_in = C_in / groups * prod(kernel) for a convolution):
                  forward                      2 T d_in d_out
                  input gradient (backward)    2 T d_in d_out, except where the layer's input
                                               needs no gradient (the first layer on the data)
                  per-example weight gradient  2 T d_in d_out
                Everything else is left out (attention's score products, norms, activations,
                pooling, the batch gradient our consistency check asks autograd for), so this
                floor is below the true minimum and the ratio to it errs high. For ResNet-9
                (w = 32) the three GEMM terms add 8.4% to 2 p k at k = 2048; for the MLP 0.1%.

    python -m benchmarks.featurize [--batch 32] [--batches 3] [--threads N]

Writes benchmarks/results/featurize_cpu_b<batch>.csv and .md (``_t<N>`` appended with
--threads: on a machine shared with another job, one thread keeps a core to itself where two
would wait on each other at every parallel operation).
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import attrkernels as ak
from attrkernels.tasks.resnet9 import resnet9

from .common import RESULTS, matmul_peak_gflops, peak_rss, provenance, reset_peak_rss, write_results

K = 2048


class Transformer(nn.Module):
    def __init__(self, vocab=1000, d=128, heads=4, T=64, blocks=2, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x).mean(1))


class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TorchTransformer(nn.Module):
    """``Transformer``'s shape from torch's own layers: nn.TransformerEncoder (pre-norm, GELU),
    fixed sinusoidal positions (a buffer: no parameter outside a module)."""

    def __init__(self, vocab=1000, d=128, heads=4, T=64, blocks=2, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        pos = torch.arange(T)[:, None] / 10000 ** (torch.arange(0, d, 2) / d)
        self.register_buffer("pos", torch.cat([pos.sin(), pos.cos()], 1))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.enc = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        T = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
        x = self.enc(self.emb(idx) + self.pos[:T], mask=mask, is_causal=True)
        return self.head(self.ln(x).mean(1))


def make(name, batch, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
        xs = [torch.randn(batch, 784, generator=g) for _ in range(count)]
    elif name == "resnet9":
        model = resnet9(10, width=32)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        xs = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(count)]
    else:
        model = Transformer() if name == "transformer" else TorchTransformer()
        xs = [torch.randint(0, 1000, (batch, 64), generator=g) for _ in range(count)]
    model.eval()
    batches = [(x, torch.randint(0, 10, (batch,), generator=g)) for x in xs]
    return model, batches


def required_gemm_flops(model, batch) -> int:
    """Per-example FLOPs of the forward, input-gradient and per-example weight-gradient GEMMs
    of the Linear and Conv layers (the full floor's terms besides 2 p k; see the docstring)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.MultiheadAttention):  # in_proj (3 d x d) and out_proj (d x d), T tokens
            d = module.embed_dim
            total += 3 * 2 * inputs[0].shape[1] * 4 * d * d
            return
        if isinstance(module, nn.Linear):
            d_in, d_out = module.in_features, module.out_features
        else:
            d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
            d_out = module.out_channels
        T = output[0].numel() // d_out
        total += (3 if inputs[0].requires_grad else 2) * 2 * T * d_in * d_out

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention))]
    try:
        with torch.enable_grad():
            model(batch[0][:1])
    finally:
        for h in handles:
            h.remove()
    return total


def timed_turns(fns, batches):
    """{name: (median seconds per batch, peak extra resident bytes) or the exception it raised}.

    Each implementation's warm-up batch runs alone (its resident-memory high-water mark); then
    the implementations take turns on each timed batch, so a change in the load of a shared
    machine hits all of them alike instead of whichever ran at that moment."""
    out, mem = {}, {}
    for name, fn in fns.items():
        gc.collect()
        base = reset_peak_rss()
        try:
            fn(batches[0])
        except Exception as err:  # noqa: BLE001  (a peer failing on a model is a result)
            out[name] = err
            continue
        mem[name] = peak_rss() - base
    times = {name: [] for name in mem}
    for b in batches[1:]:
        for name in times:
            t0 = time.perf_counter()
            fns[name](b)
            times[name].append(time.perf_counter() - t0)
    out.update({name: (statistics.median(times[name]), mem[name]) for name in times})
    return out


def timed_paired(fn, batches, flops_per_batch, n=4096):
    """Median over batches of (batch time) / (its floor at a peak measured just before it).

    The floor of each batch is flops_per_batch at the fp32 matmul peak (torch.mm n x n) measured
    right before that batch, so other jobs on a shared machine slow both alike."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    fn(batches[0])
    ratios = []
    for bt in batches[1:] + batches[1:]:
        t0 = time.perf_counter()
        torch.mm(a, b)
        peak = 2 * n**3 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        fn(bt)
        ratios.append((time.perf_counter() - t0) / (flops_per_batch / peak))
    return statistics.median(ratios)


def traker_featurizer(model, n, projector=None):
    from trak import TRAKer

    tmp = tempfile.mkdtemp(prefix="bench-traker-")
    tr = TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=tmp, device="cpu",
                proj_dim=K, use_half_precision=False, projector=projector, logging_level=logging.ERROR)
    tr.load_checkpoint(model.state_dict(), model_id=0)
    return tr


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="timed batches (after one warm-up)")
    parser.add_argument("--models", default="mlp,resnet9,transformer,mha")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops(torch.device("cpu"))
    task = ak.tasks.Classification()
    rows = []
    for name in args.models.split(","):
        model, batches = make(name, args.batch, args.batches + 1)
        p = sum(q.numel() for q in model.parameters())
        floor = 2 * p * K / (peak * 1e9)
        full_flops = 2 * p * K + required_gemm_flops(model, batches[0])
        full_floor = full_flops / (peak * 1e9)
        dense = ak.Featurizer(model, task.measure, K, seed=0)
        impls = {"ours-dense": dense, "ours-factored": ak.Featurizer(model, task.measure, K, seed=0, mode="factored")}
        attention = [n for n, _ in model.named_parameters() if ".self_attn." in n]
        if attention:  # the same features with the attention's parameters through torch.func
            impls["ours-dense, MHA via torch.func"] = ak.Featurizer(model, task.measure, K, seed=0, fallback=attention)
        n = args.batch * len(batches)
        trakers, results = {}, {}
        for impl, projector in (("traker", None), ("traker+ours-P", ak.SketchProjector(p, K, seed=0))):
            try:
                trakers[impl] = traker_featurizer(model, n, projector)
            except Exception as err:  # noqa: BLE001
                results[impl] = err
                continue
            impls[impl] = (lambda tr: lambda b: tr.featurize(batch=b, num_samples=b[0].shape[0]))(trakers[impl])
        results.update(timed_turns(impls, batches))
        paired = timed_paired(dense, batches, 2 * p * K * args.batch)
        tr = trakers.get("traker+ours-P")
        if tr is not None and not isinstance(results["traker+ours-P"], Exception):  # same P: same features
            got = torch.as_tensor(tr.saver.current_store["grads"][:args.batch]) * float(tr.normalize_factor)
            want = ak.Featurizer(model, task.measure, K, seed=ak.derive_seed(0, 0))(batches[0])
            results["traker+ours-P check"] = (got - want).abs().max().item() / want.abs().max().item()
        dense_t = results["ours-dense"][0]
        for impl in ("ours-dense", "ours-factored", "ours-dense, MHA via torch.func", "traker", "traker+ours-P"):
            if impl not in results:
                continue
            res = results[impl]
            r = dict(model=name, params=p, batch=args.batch, impl=impl)
            if isinstance(res, Exception):
                r["note"] = f"failed: {type(res).__name__}: {res}"[:120]
            else:
                t, mem = res
                r.update(examples_per_s=f"{args.batch / t:.1f}", peak_mem_mb=f"{mem / 2**20:.0f}",
                         vs_dense=f"{t / dense_t:.2f}", dense_floor_ex_s=f"{1 / floor:.1f}",
                         vs_floor=f"{t / (floor * args.batch):.2f}", full_floor_ex_s=f"{1 / full_floor:.1f}",
                         vs_full_floor=f"{t / (full_floor * args.batch):.2f}")
                if impl == "ours-dense":  # both floors at the same paired peaks: ratios scale by FLOPs
                    r["vs_floor_paired"] = f"{paired:.2f}"
                    r["vs_full_floor_paired"] = f"{paired * 2 * p * K / full_flops:.2f}"
                if impl + " check" in results:
                    r["note"] = f"max rel diff to ours-dense {results[impl + ' check']:.1e}"
            rows.append(r)
            print(r, flush=True)
        del model, batches, impls
    info = provenance(torch.device("cpu"))
    columns = ["model", "params", "batch", "impl", "examples_per_s", "peak_mem_mb", "vs_dense",
               "dense_floor_ex_s", "vs_floor", "vs_floor_paired", "full_floor_ex_s", "vs_full_floor",
               "vs_full_floor_paired", "note"]
    intro = (f"Featurizer benchmark, k = {K}, batch {args.batch}, on {info['device']} ({info['cores']} cores, "
             f"{torch.get_num_threads()} threads), "
             f"{info['date']}, commit {info['commit']}. Matmul peak {peak:.1f} GFLOP/s. `vs_dense` = time / "
             "ours-dense time (above 1 = slower); `dense_floor_ex_s` = peak / (2 p k); `vs_floor` = time / "
             "that floor; `vs_floor_paired` (ours-dense) = median over batches of time / floor at a "
             "peak measured just before each batch (robust to other jobs on the machine); "
             "`full_floor_ex_s`, `vs_full_floor`, `vs_full_floor_paired`: the same with the full floor, "
             "2 p k plus the forward, input-gradient and per-example weight-gradient GEMM FLOPs of the "
             "Linear / Conv layers (see benchmarks/featurize.py).")
    suffix = f"_t{args.threads}" if args.threads else ""
    write_results(RESULTS / f"featurize_cpu_b{args.batch}{suffix}", rows, columns, info, intro,
                  {"matmul_peak_gflops": f"{peak:.1f}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
