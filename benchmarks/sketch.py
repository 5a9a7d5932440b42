"""Sketch kernel vs peers: x[B, p] @ P[p, k] with P random, same inputs, same run.

Implementations timed (median of up to 3 calls; one call when a call takes over 30 s; ours: 5
calls, each right after a torch.mm 4096^3, see `pct_peak_paired`):
  ours-<backend>   attrkernels.sketch (P generated on the fly, never stored)
  traker-basic     traker's BasicProjector.project, its defaults (block_size 100)
  dattri-basic     dattri's CPU projector (random_project), its defaults
  traker-cuda      traker's CudaProjector (fast_jl), GPU only, when installed
  torch-matrix     x @ P with P materialised once beforehand (generation not timed)

Each row reports GFLOP/s (2 B p k / time), the percentage of this machine's fp32 matmul peak
(torch.mm 4096^3, measured at the start and the end of the run; the larger), the floor max(FLOPs / peak, bytes / bandwidth) with
bytes = 4 (B p + B k) (x read, out written; P is generated, not moved), the peak extra resident
memory of the call, and each implementation's time relative to ours.

    python -m benchmarks.sketch --quick       # B = 32, p = 2^20, k = 1024 (about a minute)
    python -m benchmarks.sketch               # the full grid (about 20 minutes on 2 cores)

Writes benchmarks/results/sketch_<device>.csv and .md.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys

import torch

import attrkernels as ak

from .common import (RESULTS, bandwidth_gbs, matmul_peak_gflops, peak_rss, provenance,
                     reset_peak_rss, sync, time_call, time_paired_with_peak, write_results)

KINDS = ("rademacher", "gaussian")
PEER_KIND = {"rademacher": "rademacher", "gaussian": "normal"}
MATRIX_BUDGET = 4.5e9  # bytes of a materialised P we allow for torch-matrix


def peer_traker(p, k, kind, device):
    from trak.projectors import BasicProjector, ProjectionType

    proj = BasicProjector(p, k, 0, ProjectionType(PEER_KIND[kind]), device)
    return lambda x: proj.project(x, 0)


def peer_traker_cuda(p, k, kind, device):
    from trak.projectors import CudaProjector, ProjectionType

    proj = CudaProjector(p, k, 0, ProjectionType(PEER_KIND[kind]), device, max_batch_size=32)
    return lambda x: proj.project(x.half(), 0)


def peer_dattri(p, k, kind, device, B):
    from dattri.func.projection import random_project

    example = torch.zeros(B, p, device=device)
    fn = random_project(example, B, k, 32, proj_seed=0, proj_type=PEER_KIND[kind], device=device)
    return fn


def peer_torch_matrix(p, k, kind, device):
    if p * k * 4 > MATRIX_BUDGET:
        raise MemoryError(f"P would take {p * k * 4 / 1e9:.1f} GB")
    gen = torch.Generator(device=device).manual_seed(0)
    P = torch.randn(p, k, device=device, generator=gen)
    if kind == "rademacher":
        P.sign_()
    P /= math.sqrt(k)
    return lambda x: x @ P


def implementations(device, p, k, kind, B, peers: bool):
    """(name, builder) pairs; a builder returns fn(x) or raises to skip the row."""
    out = []
    for backend in (("cpu",) if device.type == "cpu" else ("cuda", "triton")):
        out.append((f"ours-{backend}",
                    lambda b=backend: (lambda x: ak.sketch(x, k, seed=0, kind=kind, backend=b))))
    if peers:
        out.append(("traker-basic", lambda: peer_traker(p, k, kind, device)))
        if device.type == "cuda":
            out.append(("traker-cuda", lambda: peer_traker_cuda(p, k, kind, device)))
        out.append(("dattri-basic", lambda: peer_dattri(p, k, kind, device, B)))
        out.append(("torch-matrix", lambda: peer_torch_matrix(p, k, kind, device)))
    return out


def kernel_variant(device) -> str:
    """The CPU kernel's instruction set and variant (chosen per microarchitecture), or ''."""
    if device.type != "cpu":
        return ""
    from attrkernels import _C

    return f"{_C.isa('')}/{_C.sketch_variant()}"


def run(shapes, device, peers, reps):
    print(f"device {provenance(device)['device']}" + (f", kernel {kernel_variant(device)}"
                                                     if device.type == "cpu" else ""), flush=True)
    peak = matmul_peak_gflops(device)
    bw = bandwidth_gbs(device)
    print(f"matmul peak {peak:.1f} GFLOP/s, copy bandwidth {bw:.1f} GB/s", flush=True)
    rows = []
    for (B, p, k, with_peers) in shapes:
        gen = torch.Generator(device="cpu").manual_seed(B + p + k)
        x = torch.randn(B, p, generator=gen).to(device)
        flops = 2 * B * p * k
        floor = max(flops / (peak * 1e9), 4 * (B * p + B * k) / (bw * 1e9))
        for kind in KINDS:
            ours_time = None
            for name, build in implementations(device, p, k, kind, B, peers and with_peers):
                row = dict(impl=name, kind=kind, B=B, p=p, k=k)
                gc.collect()
                base = reset_peak_rss() if device.type == "cpu" else None
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                try:
                    fn = build()
                    slow = name != "torch-matrix" and not name.startswith("ours")
                    t = time_call(lambda: fn(x), device, reps=reps, warmup=0 if slow else 1)
                except Exception as err:  # noqa: BLE001  (a peer failing is a result, not a crash)
                    row.update(time_s="", note=f"skipped: {type(err).__name__}: {err}"[:120])
                    rows.append(row)
                    print(row, flush=True)
                    continue
                sync(device)
                extra = (peak_rss() - base) if device.type == "cpu" else (
                    torch.cuda.max_memory_allocated(device) - base)
                paired = None
                if name.startswith("ours"):  # each call next to a peak measurement
                    _, ratio, pair_peak = time_paired_with_peak(lambda: fn(x), device, flops,
                                                                reps=max(reps, 5))
                    paired = (ratio, pair_peak)
                if name.startswith("ours") and ours_time is None:
                    ours_time = t
                row.update(
                    time_s=f"{t:.4f}", gflops=f"{flops / t / 1e9:.1f}",
                    pct_peak=f"{100 * flops / t / 1e9 / peak:.0f}", floor_s=f"{floor:.4f}",
                    extra_mem_mb=f"{max(extra, 0) / 2**20:.0f}",
                    ours_speedup=f"{t / ours_time:.1f}" if ours_time else "",
                )
                if paired:
                    row.update(pct_peak_paired=f"{100 * paired[0]:.0f}",
                               pair_peak_gflops=f"{paired[1]:.1f}")
                rows.append(row)
                print(row, flush=True)
                del fn
        del x
    return rows, peak, bw


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only B=32, p=2^20, k=1024")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        shapes = [(32, 2**20, 1024, True)]
    else:
        shapes = [(B, 2**20, k, True) for k in (1024, 4096) for B in (1, 32, 256)]
        shapes.append((32, 2**24, 1024, False))  # at scale: ours only (peers take minutes here)
    rows, peak, bw = run(shapes, device, not args.no_peers, args.reps)
    peak_end = matmul_peak_gflops(device)
    if peak_end > peak:  # a busy machine at the start would understate the peak
        print(f"matmul peak at the end {peak_end:.1f} GFLOP/s; using it")
        for row in rows:
            if row.get("gflops"):
                row["pct_peak"] = f"{100 * float(row['gflops']) / peak_end:.0f}"
        peak = peak_end

    info = provenance(device)
    columns = ["impl", "kind", "B", "p", "k", "time_s", "gflops", "pct_peak", "pct_peak_paired",
               "pair_peak_gflops", "floor_s", "extra_mem_mb", "ours_speedup", "note"]
    variant = kernel_variant(device)
    intro = (f"Sketch benchmark on {info['device']} ({info['cores']} cores, torch threads "
             f"{info['torch_threads']}), {info['date']}, commit {info['commit']}"
             + (f", CPU kernel {variant}" if variant else "") + ".\n"
             f"fp32 matmul peak {peak:.1f} GFLOP/s (torch.mm 4096^3, same run), copy bandwidth "
             f"{bw:.1f} GB/s. `pct_peak` = GFLOP/s as % of that peak; `pct_peak_paired` (ours) = median "
             f"over {max(args.reps, 5)} calls of GFLOP/s as % of a peak measured just before that "
             f"call (`pair_peak_gflops`: their median), robust to other jobs on the machine; "
             f"`ours_speedup` = that row's time / ours (same kind and shape).")
    extra = {"matmul_peak_gflops": f"{peak:.1f}", "copy_bandwidth_gbs": f"{bw:.1f}"}
    if variant:
        extra["kernel_variant"] = variant
    write_results(RESULTS / f"sketch_{device.type}{'_quick' if args.quick else ''}", rows, columns, info,
                  intro, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
