"""Step ``throughput`` of the GPU check: sketch speed as a share of this card's matmul rates.

First the rates the sketch is judged by, measured in this run on random data: ``torch.mm`` of
8192 x 8192 matrices in bfloat16 and in float32 (TF32 off, as the sketch's float32 path is
IEEE), and the device-to-device copy bandwidth. Then, for each shape (B, p, k), dtype (bf16,
fp32), kind and backend (cuda, triton), the median time of ``ak.sketch`` (CUDA events, after a
warm-up that includes compilation and the self-check), its TFLOP/s (2 B p k / time), that as a
percentage of the bf16 and of the fp32 matmul rate, the floor max(2 B p k / the matmul rate of
x's dtype, bytes of x / copy bandwidth), and the time of ``x @ P`` with P materialised in x's
dtype beforehand (generation not timed; where P fits in 40 GB) -- the cost of the matmul that
the on-the-fly generation replaces.

    python -m benchmarks.gpu.throughput --out DIR [--device cuda] [--smoke]

Writes throughput.csv / .json / .md.
"""
from __future__ import annotations

import sys

import torch

import attrkernels as ak

from .common import median_time, parse, time_left, write_table

SHAPES = [(32, 2**24, 1024), (256, 2**22, 4096), (4096, 2**20, 2048)]
SMOKE_SHAPES = [(8, 4096, 128)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
P_BUDGET = 40 * 2**30  # bytes of a materialised P for the matmul baseline


def mm_rate(dtype, n, device) -> float:
    """TFLOP/s of torch.mm on n x n random matrices."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = median_time(lambda: torch.mm(a, b), device, reps=10, warmup=3, budget_s=5)
    return 2 * n**3 / t / 1e12


def copy_bandwidth(nbytes, device) -> float:
    """GB/s of a device-to-device copy, bytes read + written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, reps=10, warmup=2, budget_s=5)
    return 2 * nbytes / t / 1e9


def main() -> int:
    args = parse(__doc__)
    dev = args.device
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    n = 256 if args.smoke else 8192
    rates = {"bf16": mm_rate(torch.bfloat16, n, dev), "fp32": mm_rate(torch.float32, n, dev)}
    bw = copy_bandwidth((1 << 22) if args.smoke else (4 << 30), dev)
    print(f"torch.mm {n}^3: bf16 {rates['bf16']:.1f} TFLOP/s, fp32 {rates['fp32']:.1f} TFLOP/s; "
          f"copy {bw:.0f} GB/s", flush=True)
    backends = ["cuda", "triton"] if dev == "cuda" else ["cpu"]
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rows, stopped = [], ""
    meta = {"device": dev, "mm_n": n, "mm_tflops_bf16": rates["bf16"], "mm_tflops_fp32": rates["fp32"],
            "copy_gbs": bw, "smoke": args.smoke}

    def flush():
        intro = (f"Sketch throughput on {dev}{' (smoke: tiny inputs)' if args.smoke else ''}. Rates of this "
                 f"run: torch.mm {n}^3 bf16 {rates['bf16']:.1f} TFLOP/s, fp32 (no TF32) {rates['fp32']:.1f} "
                 f"TFLOP/s, copy {bw:.0f} GB/s. `pct_mm_bf16` / `pct_mm_fp32`: the sketch's FLOP rate as a "
                 f"percentage of those; `floor_ms`: max(FLOPs / the mm rate of x's dtype, bytes of x / copy "
                 f"bandwidth); `matmul_ms`: x @ P with P materialised in x's dtype (not generated in the "
                 f"timing). {stopped}")
        write_table(args.out, "throughput", rows,
                    ["B", "p", "k", "dtype", "kind", "backend", "ms", "tflops", "pct_mm_bf16", "pct_mm_fp32",
                     "floor_ms", "matmul_ms", "note"], intro, meta)

    for B, p, k in shapes:
        for dname, dtype in DTYPES.items():
            if time_left() < 15:
                stopped = stopped or f"stopped early: {time_left():.0f} s left of the step's time"
                break
            gen = torch.Generator(device=dev).manual_seed(B + p + k)
            x = torch.randn(B, p, device=dev, generator=gen, dtype=dtype)
            flops = 2 * B * p * k
            floor = max(flops / (rates[dname] * 1e12), x.numel() * x.element_size() / (bw * 1e9))
            matmul_ms = ""
            if p * k * x.element_size() <= P_BUDGET:
                try:
                    P = torch.randn(p, k, device=dev, generator=gen, dtype=dtype)
                    matmul_ms = round(1e3 * median_time(lambda: x @ P, dev, reps=5, budget_s=2), 3)
                    del P
                except torch.OutOfMemoryError:
                    matmul_ms = "out of memory"
            for kind in ("rademacher", "gaussian"):
                for backend in backends:
                    if time_left() < 5:
                        stopped = stopped or f"stopped early: {time_left():.0f} s left of the step's time"
                        break
                    row = dict(B=B, p=p, k=k, dtype=dname, kind=kind, backend=backend,
                               floor_ms=round(floor * 1e3, 3), matmul_ms=matmul_ms)
                    out = torch.empty(B, k, device=dev)
                    try:
                        t = median_time(lambda: ak.sketch(x, k, seed=1, kind=kind, backend=backend, out=out),
                                        dev, reps=5, warmup=1, budget_s=1.5)
                        tf = flops / t / 1e12
                        row.update(ms=round(t * 1e3, 3), tflops=round(tf, 2),
                                   pct_mm_bf16=round(100 * tf / rates["bf16"], 1),
                                   pct_mm_fp32=round(100 * tf / rates["fp32"], 1))
                    except Exception as err:  # noqa: BLE001  (a failing backend is a result)
                        row["note"] = f"failed: {type(err).__name__}: {err}"[:200]
                    rows.append(row)
                    print(row, flush=True)
                    flush()
            del x
            if dev == "cuda":
                torch.cuda.empty_cache()
    flush()
    return 0 if rows and all("failed" not in str(r.get("note", "")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
