"""Step ``featurize`` of the GPU check: dense featurisation of ResNet-9 and GPT-2-small against
torch.func per-example gradients and a materialised projection.

Models (random weights, random inputs; BatchNorm in eval mode):
  resnet9      ``attrkernels.tasks.resnet9`` (width 64, 6.6 M parameters), 32 x 32 x 3 inputs,
               f = correct-class margin, batch 64, k = 2048.
  gpt2-small   12 layers, width 768, 12 heads, vocabulary 50,257, 128 tokens, output head not
               tied to the embedding (124 M + 39 M parameters), f = mean next-token loss,
               batch 8, k = 1024. ``transformers.GPT2LMHeadModel`` when it imports, else a
               plain-torch model of the same shape (the note says which).

Correctness, TF32 off: ours (``ak.Featurizer``, dense, Rademacher) at k = 128 against the
torch.func per-example gradients (``vmap(grad(f))``) times P materialised with
``ak.sketch_matrix`` in blocks of rows, in float64; and ours at the timed k against
``ak.sketch`` of the same torch.func gradients. Tolerance 1e-4 of the largest feature.

Throughput (torch's default precision settings): examples/s of ours (with its default
``memory_budget``, and with 1 GiB blocks), and of the baseline
"torch.func gradients [B, p], then G @ P" with P [p, k] float32 materialised beforehand (not
timed) where it fits in 60 GB, else "torch.func gradients, then ak.sketch(G)"; the median of 3
batches after a warm-up batch, and the peak GPU memory of each.

    python -m benchmarks.gpu.featurize --out DIR [--device cuda] [--smoke]

Writes featurize.csv / .json / .md.
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import attrkernels as ak
from attrkernels.tasks.resnet9 import resnet9

from .common import parse, rel_err, time_left, write_table

CHECK_K = 128
TOL = 1e-4
P_BUDGET = 60 * 2**30
BIG_BUDGET = 1 << 30  # a GPU-sized per-example-gradient block, next to the default


# ---------------------------------------------------------------------------------------------
# Models


class GPT2Shaped(nn.Module):
    """GPT-2's shape in plain torch (pre-norm blocks, causal SDPA, GELU MLP, untied head)."""

    def __init__(self, vocab=50257, positions=1024, d=768, layers=12, heads=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(positions, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))


class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class HFLogits(nn.Module):
    """transformers' GPT2LMHeadModel returning the logits tensor."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import GPT2LMHeadModel

        self.model = GPT2LMHeadModel(cfg)

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def gpt2(smoke: bool):
    shape = dict(vocab=101, positions=64, d=64, layers=2, heads=4) if smoke else {}
    full = dict(dict(vocab=50257, positions=1024, d=768, layers=12, heads=12), **shape)
    try:
        from transformers import GPT2Config

        cfg = GPT2Config(vocab_size=full["vocab"], n_positions=full["positions"], n_embd=full["d"],
                         n_layer=full["layers"], n_head=full["heads"], tie_word_embeddings=False,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=full["vocab"] - 1, eos_token_id=full["vocab"] - 1)
        try:
            cfg._attn_implementation = "eager"  # vmap of torch.func and the capture hooks: plain ops
        except Exception:  # noqa: BLE001
            pass
        return HFLogits(cfg), f"transformers {__import__('transformers').__version__} GPT2LMHeadModel"
    except ImportError:
        return GPT2Shaped(**full), "plain-torch GPT-2 shape (transformers not installed)"


def lm_loss(logits, ids):
    """Per-sequence mean next-token cross-entropy, [B]."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1), reduction="none")
    return ce.reshape(B, T - 1).mean(1)


def models(smoke: bool, device: str):
    """(name, model, output_fn(model, batch) -> [B], per-example f(logits1, batch1) -> scalar,
    batches, k, note)."""
    out = []
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    B, hw, w, k = (4, 16, 8, 64) if smoke else (64, 32, 64, 2048)
    net = resnet9(10, width=w)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    count = 2 if smoke else 4  # a warm-up batch, then the timed ones
    batches = [(torch.randn(B, 3, hw, hw, generator=g).to(device),
                torch.randint(0, 10, (B,), generator=g).to(device)) for _ in range(count)]
    task = ak.tasks.Classification()
    out.append(("resnet9", net.to(device).eval(), task.measure,
                lambda logits, batch: ak.tasks.margin(logits, batch[1]), batches, k, f"width {w}"))
    B, T, k = (3, 16, 64) if smoke else (8, 128, 1024)
    lm, note = gpt2(smoke)
    vocab = 101 if smoke else 50257
    batches = [(torch.randint(0, vocab, (B, T), generator=g).to(device),) for _ in range(count)]
    out.append(("gpt2-small", lm.to(device).eval(), lambda model, batch: lm_loss(model(batch[0]), batch[0]),
                lambda logits, batch: lm_loss(logits, batch[0]), batches, k, note))
    return out


# ---------------------------------------------------------------------------------------------
# The baseline


def per_example_grads(model, f, batch) -> torch.Tensor:
    """torch.func per-example gradients [B, p] in ``model.named_parameters()`` order."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(params, *example):
        batch1 = tuple(t.unsqueeze(0) for t in example)
        return f(functional_call(model, (params, buffers), (batch1[0],)), batch1)[0]

    grads = vmap(grad(one), in_dims=(None,) + (0,) * len(batch))(params, *batch)
    B = batch[0].shape[0]
    return torch.cat([grads[n].reshape(B, -1) for n in params], dim=1)


def project_materialised(G, k, device, block_rows=1 << 21) -> torch.Tensor:
    """G @ P in float64 with P = ak.sketch_matrix(p, k) generated block by block."""
    p = G.shape[1]
    acc = torch.zeros(G.shape[0], k, dtype=torch.float64, device=device)
    for r0 in range(0, p, block_rows):
        r1 = min(p, r0 + block_rows)
        P = ak.sketch_matrix(p, k, seed=0, kind="rademacher", rows=slice(r0, r1), device=device)
        acc += G[:, r0:r1].double() @ P.double()
    return acc


def peak_mb(device, fn):
    if device != "cuda":
        return fn(), ""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, round((torch.cuda.max_memory_allocated() - base) / 2**20)


def timed(fn, batches, device):
    """(median seconds per batch after a warm-up batch, peak extra GPU MiB)."""
    fn(batches[0])
    times, peak = [], 0
    for b in batches[1:]:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, mb = peak_mb(device, lambda: fn(b))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = max(peak, mb or 0)
    times.sort()
    return times[len(times) // 2], peak


def main() -> int:
    args = parse(__doc__)
    dev = args.device
    rows, stopped = [], ""
    meta = {"device": dev, "smoke": args.smoke}

    def flush():
        intro = (f"Dense featurisation on {dev}{' (smoke: tiny models)' if args.smoke else ''}: ours "
                 f"(ak.Featurizer, dense, Rademacher) against torch.func per-example gradients and a "
                 f"materialised P. Correctness rows: relative error (max |diff| / max |ref|), tolerance "
                 f"{TOL:g}, TF32 off. Timing rows: examples/s, median of 3 batches after a warm-up, torch's "
                 f"default precision settings; `peak_mb`: peak extra GPU memory. {stopped}")
        write_table(args.out, "featurize", rows,
                    ["model", "params", "batch", "k", "row", "value", "ok", "peak_mb", "note"], intro, meta)

    failed = False
    for name, model, output_fn, f, batches, k, note in models(args.smoke, dev):
        p = sum(q.numel() for q in model.parameters() if q.requires_grad)
        B = batches[0][0].shape[0]
        base = dict(model=name, params=p, batch=B)
        print(f"{name}: {p:,} parameters, batch {B}, k {k} ({note})", flush=True)
        if time_left() < 30:
            stopped = f"stopped before {name}: {time_left():.0f} s left"
            break
        # --- correctness, TF32 off
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        small = tuple(t[:2] for t in batches[0])
        try:
            G = per_example_grads(model, f, small)
            want = project_materialised(G, CHECK_K, dev)
            got = ak.Featurizer(model, output_fn, CHECK_K, seed=0)(small)
            err = rel_err(got, want)
            rows.append(dict(base, batch=2, k=CHECK_K, row="ours vs torch.func @ materialised P",
                             value=err, ok="yes" if err < TOL else "NO", note=note))
            got = ak.Featurizer(model, output_fn, k, seed=0)(small)
            err = rel_err(got, ak.sketch(G, k, seed=0))
            rows.append(dict(base, batch=2, k=k, row="ours vs ak.sketch(torch.func G)", value=err,
                             ok="yes" if err < TOL else "NO"))
            del G
        except Exception as e:  # noqa: BLE001  (record it and go on to the timing)
            rows.append(dict(base, k=CHECK_K, row="correctness", ok="NO", note=f"{type(e).__name__}: {e}"[:300]))
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        failed |= any(r["ok"] == "NO" for r in rows if r["model"] == name)
        flush()
        if dev == "cuda":
            torch.cuda.empty_cache()
        # --- throughput
        if time_left() < 20:
            stopped = f"stopped before timing {name}: {time_left():.0f} s left"
            break
        fz = ak.Featurizer(model, output_fn, k, seed=0)
        t, mb = timed(fz, batches, dev)
        rows.append(dict(base, k=k, row="ours dense: examples/s", value=round(B / t, 1), peak_mb=mb,
                         note=f"default memory_budget {getattr(fz, 'memory_budget', 0) >> 20} MiB"))
        flush()
        if dev == "cuda" and time_left() > 40:  # the default block size was set on a CPU
            big = ak.Featurizer(model, output_fn, k, seed=0, memory_budget=BIG_BUDGET)
            tg, mbg = timed(big, batches, dev)
            rows.append(dict(base, k=k, row=f"ours dense, memory_budget {BIG_BUDGET >> 20} MiB: examples/s",
                             value=round(B / tg, 1), peak_mb=mbg, note=f"{t / tg:.2f}x the default's speed"))
            del big
            flush()
        if p * k * 4 <= P_BUDGET:
            P = torch.randn(p, k, device=dev)
            label = "torch.func + G @ P (P materialised): examples/s"
            base_fn = lambda b: per_example_grads(model, f, b) @ P  # noqa: E731
        else:
            P = None
            label = f"torch.func + ak.sketch(G) (P would take {p * k * 4 / 2**30:.0f} GiB): examples/s"
            base_fn = lambda b: ak.sketch(per_example_grads(model, f, b), k, seed=0)  # noqa: E731
        if time_left() < 15:
            stopped = f"stopped before the baseline of {name}: {time_left():.0f} s left"
            break
        try:
            tb, mbb = timed(base_fn, batches, dev)
            rows.append(dict(base, k=k, row=label, value=round(B / tb, 1), peak_mb=mbb,
                             note=f"ours is {tb / t:.1f}x faster" if tb > t else f"ours is {t / tb:.1f}x slower"))
        except Exception as e:  # noqa: BLE001  (vmap running out of memory is a result)
            rows.append(dict(base, k=k, row=label, note=f"failed: {type(e).__name__}: {e}"[:300]))
        del P, fz
        flush()
        del model, batches
        if dev == "cuda":
            torch.cuda.empty_cache()
    flush()
    return 1 if failed and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
